"""OpenCLIP ViT-bigG/14 -> the Qwen-VL vision encoder (stage-1 initialisation, reference 1.2).

OpenCLIP's visual tower differs from Qwen-VL's: it has a class token and a 257-row position table (class
row first), a blocked `in_proj_weight` [Wq; Wk; Wv] (torch MultiheadAttention), and its own `ln_post` /
`proj` (width 1664 -> 1280). The import drops the class token and the class row, permutes q/k/v to the
per-head layout of megatron's `linear_qkv`, and leaves OpenCLIP's `ln_post`/`proj` out (Qwen-VL's live
after the adapter, at the LLM width). The text tower (keys without `visual.`) is not part of the import.
"""
from __future__ import annotations

import torch

from ..models.config import QwenVLConfig
from .hf_checkpoint import HFCheckpointError, HFCheckpointReader
from .hf_layout import UnknownKeyError, blocked_to_interleaved

P = "visual."
DROPPED = (P + "class_embedding", P + "ln_post.weight", P + "ln_post.bias", P + "proj")


def openclip_key_shapes(cfg: QwenVLConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """OpenCLIP `visual.*` key -> (shape the Qwen-VL config implies, fields that decide it)."""
    v = cfg.vit
    w, f = v.width, v.ffn_hidden_size
    shapes = {P + "class_embedding": ((w,), "visual.width"),
              P + "positional_embedding": ((v.pos_grid ** 2 + 1, w), "visual.width (16x16 grid + class row)"),
              P + "conv1.weight": ((w, 3, v.patch_size, v.patch_size), "visual.width, visual.patch_size"),
              P + "ln_pre.weight": ((w,), "visual.width"), P + "ln_pre.bias": ((w,), "visual.width"),
              P + "ln_post.weight": ((w,), "visual.width"), P + "ln_post.bias": ((w,), "visual.width")}
    for j in range(v.num_layers):
        b = P + f"transformer.resblocks.{j}."
        for ln in ("ln_1", "ln_2"):
            for wb in ("weight", "bias"):
                shapes[f"{b}{ln}.{wb}"] = ((w,), "visual.width")
        shapes.update({b + "attn.in_proj_weight": ((3 * w, w), "visual.width"),
                       b + "attn.in_proj_bias": ((3 * w,), "visual.width"),
                       b + "attn.out_proj.weight": ((w, w), "visual.width"),
                       b + "attn.out_proj.bias": ((w,), "visual.width"),
                       b + "mlp.c_fc.weight": ((f, w), "visual.width, visual.mlp_ratio"),
                       b + "mlp.c_fc.bias": ((f,), "visual.width, visual.mlp_ratio"),
                       b + "mlp.c_proj.weight": ((w, f), "visual.width, visual.mlp_ratio"),
                       b + "mlp.c_proj.bias": ((w,), "visual.width, visual.mlp_ratio")})
    return shapes  # `visual.proj` [width, embed_dim] is dropped whatever its second size


def read_openclip_visual(path: str) -> tuple[HFCheckpointReader, list[str]]:
    """A reader over an OpenCLIP checkpoint (.bin/.pt/.safetensors) and its `visual.*` keys."""
    reader = HFCheckpointReader(path)
    keys = [k for k in reader.keys() if k.startswith(P)]
    if not keys:
        raise HFCheckpointError(f"{path} has no 'visual.*' keys: not an OpenCLIP CLIP checkpoint")
    return reader, keys


def check_openclip(shapes: dict[str, tuple[int, ...]], cfg: QwenVLConfig, path: str) -> None:
    expected = openclip_key_shapes(cfg)
    unknown = sorted(k for k in shapes if k not in expected and k != P + "proj")
    if unknown:
        raise UnknownKeyError(f"{path}: {len(unknown)} visual keys have no place in the Qwen-VL ViT "
                              f"({cfg.vit.num_layers} layers): {unknown[:5]}")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise HFCheckpointError(f"{path}: {len(missing)} visual keys missing: {missing[:5]}")
    for k, (want, fields) in expected.items():
        if tuple(shapes[k]) != want:
            raise HFCheckpointError(f"{path}: {k} has shape {tuple(shapes[k])} but the Qwen-VL config "
                                    f"({fields}) implies {want}")


def openclip_to_model(visual: dict[str, torch.Tensor], cfg: QwenVLConfig) -> dict[str, torch.Tensor]:
    """OpenCLIP `visual.*` tensors -> full model keys of `vision.*`."""
    heads = cfg.vit.num_heads
    out = {"vision.conv1.weight": visual[P + "conv1.weight"],
           "vision.positional_embedding": visual[P + "positional_embedding"][1:],  # drop the class row
           "vision.ln_pre.weight": visual[P + "ln_pre.weight"], "vision.ln_pre.bias": visual[P + "ln_pre.bias"]}
    for j in range(cfg.vit.num_layers):
        b, g = P + f"transformer.resblocks.{j}.", f"vision.decoder.layers.{j}."
        for wb in ("weight", "bias"):
            out[g + f"input_layernorm.{wb}"] = visual[b + f"ln_1.{wb}"]
            out[g + f"pre_mlp_layernorm.{wb}"] = visual[b + f"ln_2.{wb}"]
            out[g + f"self_attention.linear_qkv.{wb}"] = blocked_to_interleaved(visual[b + f"attn.in_proj_{wb}"], heads)
            out[g + f"self_attention.linear_proj.{wb}"] = visual[b + f"attn.out_proj.{wb}"]
            out[g + f"mlp.linear_fc1.{wb}"] = visual[b + f"mlp.c_fc.{wb}"]
            out[g + f"mlp.linear_fc2.{wb}"] = visual[b + f"mlp.c_proj.{wb}"]
    return out


def imported_openclip_keys(cfg: QwenVLConfig) -> list[str]:
    """The OpenCLIP keys the import reads (everything in `visual.*` except the dropped ones)."""
    return [k for k in openclip_key_shapes(cfg) if k not in DROPPED]
