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


def hf_to_model(hf: dict[str, torch.Tensor], cfg: QwenVLConfig, partial: bool = False) -> dict[str, torch.Tensor]:
    """HF state dict -> full model state dict. Every HF key must be consumed and every model key produced:
    an unknown or missing key is an error, never a silent skip. `partial=True` allows a subset (one
    rank's share, see `hf_sources`); unknown keys are still an error."""
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
    for wb in ("weight", "bias"):
        if k + wb in hf:
            for name, t in zip("qkv", hf[k + wb].chunk(3)):
                out[f"adapter.linear_{name}.{wb}"] = t
            used.add(k + wb)
    unknown = sorted(set(hf) - used)
    if unknown:
        raise UnknownKeyError(f"{len(unknown)} HF keys not part of this config's model, e.g. {unknown[:5]}")
    missing = sorted(set(hf_keys(cfg)) - set(hf))
    if missing and not partial:
        raise KeyError(f"{len(missing)} HF keys missing, e.g. {missing[:5]}")
    return out


def hf_sources(cfg: QwenVLConfig) -> dict[str, tuple[str, ...]]:
    """Model key -> the HF keys it is built from, so a rank can read just the tensors of its shards."""
    src = {mk: (hk,) for hk, mk in _direct_map(cfg).items()}
    for i in range(cfg.llm.num_layers):
        h, g = f"transformer.h.{i}.", f"language.decoder.layers.{i}."
        for wb in ("weight", "bias"):
            src[g + f"self_attention.linear_qkv.{wb}"] = (h + f"attn.c_attn.{wb}",)
        src[g + "mlp.linear_fc1.weight"] = (h + "mlp.w2.weight", h + "mlp.w1.weight")
    for n in "qkv":
        src[f"adapter.linear_{n}.weight"] = (V + "attn_pool.attn.in_proj_weight",)
        src[f"adapter.linear_{n}.bias"] = (V + "attn_pool.attn.in_proj_bias",)
    return src


def hf_key_shapes(cfg: QwenVLConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF key -> (shape the config implies, the config.json fields that decide it), for checking a
    checkpoint against its config before any tensor is read."""
    l, v, a = cfg.llm, cfg.vit, cfg.adapter
    h, proj, ffn, w, vffn, q = (l.hidden_size, l.num_attention_heads * l.kv_channels, l.ffn_hidden_size,
                                v.width, v.ffn_hidden_size, a.num_queries)
    LH, LA, LF = "hidden_size", "num_attention_heads*kv_channels, hidden_size", "intermediate_size/2, hidden_size"
    VW, VF = "visual.width", "visual.width, visual.mlp_ratio"
    AQ = "visual.n_queries (256), visual.output_dim"
    shapes = {"transformer.wte.weight": ((l.vocab_size, h), "vocab_size, hidden_size"),
              "lm_head.weight": ((l.vocab_size, h), "vocab_size, hidden_size"),
              "transformer.ln_f.weight": ((h,), LH)}
    for i in range(l.num_layers):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": ((h,), LH), p + "ln_2.weight": ((h,), LH),
                       p + "attn.c_attn.weight": ((3 * proj, h), LA), p + "attn.c_attn.bias": ((3 * proj,), LA),
                       p + "attn.c_proj.weight": ((h, proj), LA),
                       p + "mlp.w1.weight": ((ffn, h), LF), p + "mlp.w2.weight": ((ffn, h), LF),
                       p + "mlp.c_proj.weight": ((h, ffn), LF)})
    shapes.update({V + "conv1.weight": ((w, 3, v.patch_size, v.patch_size), "visual.width, visual.patch_size"),
                   V + "positional_embedding": ((v.pos_grid ** 2, w), "visual.width (a 16x16 position grid)"),
                   V + "ln_pre.weight": ((w,), VW), V + "ln_pre.bias": ((w,), VW)})
    for j in range(v.num_layers):
        p = V + f"transformer.resblocks.{j}."
        for wb in ("weight", "bias"):
            shapes.update({p + f"ln_1.{wb}": ((w,), VW), p + f"ln_2.{wb}": ((w,), VW)})
        for name, (o, i) in {"attn.in_proj": (3 * w, w), "attn.out_proj": (w, w),
                             "mlp.c_fc": (vffn, w), "mlp.c_proj": (w, vffn)}.items():
            fields = VF if name.startswith("mlp") else VW
            shapes.update({p + f"{name}.weight": ((o, i), fields), p + f"{name}.bias": ((o,), fields)})
    p = V + "attn_pool."
    shapes.update({p + "query": ((q, h), AQ), p + "pos_embed": ((q, h), AQ),
                   p + "kv_proj.weight": ((h, w), "visual.output_dim, visual.width"),
                   p + "attn.in_proj_weight": ((3 * h, h), "visual.output_dim"),
                   p + "attn.in_proj_bias": ((3 * h,), "visual.output_dim"),
                   p + "attn.out_proj.weight": ((h, h), "visual.output_dim"),
                   p + "attn.out_proj.bias": ((h,), "visual.output_dim")})
    for name in ("attn_pool.ln_q", "attn_pool.ln_kv", "ln_post"):
        for wb in ("weight", "bias"):
            shapes[V + f"{name}.{wb}"] = ((h,), "visual.output_dim")
    shapes[V + "proj"] = ((h, h), "visual.output_dim")
    return shapes


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
