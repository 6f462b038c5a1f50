"""Full (unsharded, unpadded) model tensors <-> this rank's shards, for any TP/PP layout.

Which dimension a tensor is split on comes from the attributes megatron-core sets on its parallel
parameters (`tensor_model_parallel`, `partition_dim`); the two layout facts megatron does not record
are handled by name: the vocabulary padding and the [gate; up] halves of the gated LLM MLP, which are
split per half so each rank holds its slice of the gate followed by its slice of the up projection.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

VOCAB_KEYS = ("language.embedding.word_embeddings.weight", "language.output_layer.weight")
_LAYER = re.compile(r"^(language\.decoder\.layers\.)(\d+)(\..+)$")


def _global_names(model) -> dict[str, str]:
    """local state-dict name -> full name (global decoder layer numbers under pipeline parallelism)."""
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(model.language.decoder.layers)}
    out = {}
    for name in model.state_dict():
        if name.endswith("_extra_state"):
            continue
        m = _LAYER.match(name)
        out[name] = f"{m.group(1)}{offsets[int(m.group(2))]}{m.group(3)}" if m else name
    return out


def _is_glu_fc1(full_name: str) -> bool:
    return full_name.startswith("language.") and full_name.endswith("mlp.linear_fc1.weight")


def shard(full: torch.Tensor, local_like: torch.Tensor, full_name: str, tp_rank: int, tp: int) -> torch.Tensor:
    """Cut this rank's piece of a full tensor, shaped like the local parameter (a view of `full` where the
    piece is one slice of it)."""
    split = getattr(local_like, "tensor_model_parallel", False) and tp > 1
    if full_name in VOCAB_KEYS:  # padded rows (TP 1 still pads to a multiple of 128)
        rows = local_like.shape[0]
        return _padded_rows(full, tp_rank * rows if split else 0, rows, rows * tp if split else rows)
    if not split:
        return full
    if _is_glu_fc1(full_name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=local_like.partition_dim)[tp_rank]


def _padded_rows(t: torch.Tensor, start: int, rows: int, total: int) -> torch.Tensor:
    """Rows [start, start + rows) of `t` zero-padded to `total` rows; only a piece the padding reaches is a
    copy (the full padded vocabulary is never made)."""
    if t.shape[0] > total:
        raise ValueError(f"vocabulary of {t.shape[0]} rows does not fit the model's {total}")
    piece = t[start:start + rows]
    if piece.shape[0] < rows:
        piece = torch.cat([piece, piece.new_zeros(rows - piece.shape[0], *t.shape[1:])])
    return piece


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of `full` into `model` (any TP/PP). Every local tensor must be found."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local = model.state_dict(keep_vars=True)
    names = _global_names(model)
    missing = [g for g in names.values() if g not in full]
    if missing:
        raise KeyError(f"{len(missing)} model tensors missing from the state dict, e.g. {missing[:5]}")
    for name, gname in names.items():
        dst = local[name]
        src = shard(full[gname], dst, gname, tp_rank, tp)
        if src.shape != dst.shape:
            raise ValueError(f"{gname}: source shape {tuple(src.shape)} does not fit {tuple(dst.shape)} "
                             f"(tp rank {tp_rank}/{tp})")
        dst.copy_(src)


@torch.no_grad()
def gather_full(t: torch.Tensor, gname: str, vocab_size: int, param: torch.Tensor | None = None) -> torch.Tensor:
    """One local tensor (or the gradient of `param`) gathered over tensor parallelism into full form
    (unpadded). Collective over TP; the result may be a view of `t` (no copy when nothing is split)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    param = t if param is None else param
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        if _is_glu_fc1(gname):
            halves = [p.chunk(2, dim=0) for p in parts]
            t = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        else:
            t = torch.cat(parts, dim=param.partition_dim)
        del parts
    t = t.detach()
    return t[:vocab_size] if gname in VOCAB_KEYS else t


@torch.no_grad()
def gather_full_state_dict(model, vocab_size: int, grads: bool = False) -> dict[str, torch.Tensor]:
    """This pipeline stage's tensors, gathered over tensor parallelism into full form (unpadded), cloned.

    With `grads=True`, the gradients of the trainable parameters instead (megatron DDP's `main_grad`
    where present), for comparing parallel layouts."""
    out, names = {}, _global_names(model)
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        param = t
        if grads:
            if not getattr(t, "requires_grad", False):
                continue
            g = getattr(t, "main_grad", None)
            t = t.grad if g is None else g
            if t is None:
                continue
        out[names[name]] = gather_full(t, names[name], vocab_size, param).clone()
    return out
