"""The one place that knows the HF Qwen-VL state-dict keys and tensor layouts.

Maps an HF state dict to the model's own parameter names in "full" form (unsharded, unpadded, global
layer numbers) and back. Layout differences handled here:
- LLM `c_attn` is blocked [Q | K | V]; megatron's `linear_qkv` interleaves per head [q_h, k_h, v_h].
- LLM MLP: HF `w2` is the SiLU gate and `w1` the up projection; megatron's fused `linear_fc1` holds
  [gate; up] (silu of the first half times the second).
- ViT `in_proj` is already per-head interleaved; the adapter's `in_proj_weight` is blocked and becomes
  three separate projections.
"""
from __future__ import annotations

import re

import torch

from ..models.config import QwenVLConfig

V = "transformer.visual."


def blocked_to_interleaved(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[3*H, ...] as [Q|K|V] blocks -> per head [q_h, k_h, v_h]."""
    q, k, v = t.chunk(3, dim=0)
    per = lambda x: x.reshape(heads, -1, *x.shape[1:])
    return torch.stack([per(q), per(k), per(v)], dim=1).reshape(t.shape)


def interleaved_to_blocked(t: torch.Tensor, heads: int) -> torch.Tensor:
    x = t.reshape(heads, 3, -1, *t.shape[1:])
    return torch.cat([x[:, 0].reshape(-1, *t.shape[1:]), x[:, 1].reshape(-1, *t.shape[1:]),
                      x[:, 2].reshape(-1, *t.shape[1:])], dim=0)


def _direct_map(cfg: QwenVLConfig) -> dict[str, str]:
    """HF key -> model key for tensors copied as they are."""
    m = {
        "transformer.wte.weight": "language.embedding.word_embeddings.weight",
        "transformer.ln_f.weight": "language.decoder.final_layernorm.weight",
        "lm_head.weight": "language.output_layer.weight",
        V + "conv1.weight": "vision.conv1.weight",
        V + "positional_embedding": "vision.positional_embedding",
        V + "attn_pool.query": "adapter.query",
        V + "attn_pool.pos_embed": "adapter.pos_embed",
        V + "attn_pool.kv_proj.weight": "adapter.kv_proj.weight",
        V + "proj": "adapter.proj",
    }
    for wb in ("weight", "bias"):
        m[V + f"ln_pre.{wb}"] = f"vision.ln_pre.{wb}"
        m[V + f"ln_post.{wb}"] = f"adapter.ln_post.{wb}"
        m[V + f"attn_pool.attn.out_proj.{wb}"] = f"adapter.linear_proj.{wb}"
        for ln in ("ln_q", "ln_kv"):
            m[V + f"attn_pool.{ln}.{wb}"] = f"adapter.{ln}.{wb}"
    for i in range(cfg.llm.num_layers):
        h, g = f"transformer.h.{i}.", f"language.decoder.layers.{i}."
        m[h + "ln_1.weight"] = g + "input_layernorm.weight"
        m[h + "ln_2.weight"] = g + "pre_mlp_layernorm.weight"
        m[h + "attn.c_proj.weight"] = g + "self_attention.linear_proj.weight"
        m[h + "mlp.c_proj.weight"] = g + "mlp.linear_fc2.weight"
    for j in range(cfg.vit.num_layers):
        h, g = V + f"transformer.resblocks.{j}.", f"vision.decoder.layers.{j}."
        for wb in ("weight", "bias"):
            m[h + f"ln_1.{wb}"] = g + f"input_layernorm.{wb}"
            m[h + f"ln_2.{wb}"] = g + f"pre_mlp_layernorm.{wb}"
            m[h + f"attn.in_proj.{wb}"] = g + f"self_attention.linear_qkv.{wb}"
            m[h + f"attn.out_proj.{wb}"] = g + f"self_attention.linear_proj.{wb}"
            m[h + f"mlp.c_fc.{wb}"] = g + f"mlp.linear_fc1.{wb}"
            m[h + f"mlp.c_proj.{wb}"] = g + f"mlp.linear_fc2.{wb}"
    return m


def hf_keys(cfg: QwenVLConfig) -> list[str]:
    """Every key of an HF Qwen-VL state dict for this config."""
    keys = list(_direct_map(cfg))
    for i in range(cfg.llm.num_layers):
        h = f"transformer.h.{i}."
        keys += [h + "attn.c_attn.weight", h + "attn.c_attn.bias", h + "mlp.w1.weight", h + "mlp.w2.weight"]
    keys += [V + "attn_pool.attn.in_proj_weight", V + "attn_pool.attn.in_proj_bias"]
    return keys


class UnknownKeyError(KeyError):
    pass


def hf_to_model(hf: dict[str, torch.Tensor], cfg: QwenVLConfig) -> dict[str, torch.Tensor]:
    """HF state dict -> full model state dict. Every HF key must be consumed and every model key produced:
    an unknown or missing key is an error, never a silent skip."""
    direct = _direct_map(cfg)
    out, used = {}, set()
    for hk, mk in direct.items():
        if hk in hf:
            out[mk] = hf[hk]
            used.add(hk)
    heads = cfg.llm.num_attention_heads
    for i in range(cfg.llm.num_layers):
        h, g = f"transformer.h.{i}.", f"language.decoder.layers.{i}."
        for wb in ("weight", "bias"):
            k = h + f"attn.c_attn.{wb}"
            if k in hf:
                out[g + f"self_attention.linear_qkv.{wb}"] = blocked_to_interleaved(hf[k], heads)
                used.add(k)
        if h + "mlp.w1.weight" in hf and h + "mlp.w2.weight" in hf:
            out[g + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.w2.weight"], hf[h + "mlp.w1.weight"]])
            used.update([h + "mlp.w1.weight", h + "mlp.w2.weight"])
    k = V + "attn_pool.attn.in_proj_"
    if k + "weight" in hf:
        for name, t in zip("qkv", hf[k + "weight"].chunk(3)):
            out[f"adapter.linear_{name}.weight"] = t
        for name, t in zip("qkv", hf[k + "bias"].chunk(3)):
            out[f"adapter.linear_{name}.bias"] = t
        used.update([k + "weight", k + "bias"])
    unknown = sorted(set(hf) - used)
    if unknown:
        raise UnknownKeyError(f"{len(unknown)} HF keys not part of this config's model, e.g. {unknown[:5]}")
    missing = sorted(set(hf_keys(cfg)) - set(hf))
    if missing:
        raise KeyError(f"{len(missing)} HF keys missing, e.g. {missing[:5]}")
    return out


def model_to_hf(full: dict[str, torch.Tensor], cfg: QwenVLConfig) -> dict[str, torch.Tensor]:
    """Full model state dict -> HF state dict (inverse of hf_to_model)."""
    inv = {mk: hk for hk, mk in _direct_map(cfg).items()}
    hf = {}
    heads = cfg.llm.num_attention_heads
    for mk, t in full.items():
        if mk in inv:
            hf[inv[mk]] = t
            continue
        m = re.fullmatch(r"language\.decoder\.layers\.(\d+)\.(.+)", mk)
        if m and m.group(2).startswith("self_attention.linear_qkv."):
            hf[f"transformer.h.{m.group(1)}.attn.c_attn.{m.group(2).rsplit('.', 1)[1]}"] = \
                interleaved_to_blocked(t, heads)
        elif m and m.group(2) == "mlp.linear_fc1.weight":
            gate, up = t.chunk(2)
            hf[f"transformer.h.{m.group(1)}.mlp.w2.weight"] = gate
            hf[f"transformer.h.{m.group(1)}.mlp.w1.weight"] = up
        elif re.fullmatch(r"adapter\.linear_[qkv]\.(weight|bias)", mk):
            continue  # assembled below
        else:
            raise UnknownKeyError(f"model key {mk!r} has no HF counterpart")
    for wb, hk in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
        parts = [full.get(f"adapter.linear_{n}.{wb}") for n in "qkv"]
        if all(p is not None for p in parts):
            hf[V + "attn_pool.attn." + hk] = torch.cat(parts)
    return hf
