"""Per-sample attention inside packed rows (`--packed-attention per-sample`), from per-token positions.

A packed row holds several samples back to back (data/packing.py); `position_ids` [b, s] restart at 0 with
every sample (and with the padding at the end of the row). Each sample must attend only to itself, causally,
with RoPE positions counted from its own start. Everything here derives from `position_ids` alone:

- local layers (CPU): an explicit boolean mask [b, 1, s, s] (True = masked), causal within a sample and
  closed across samples, for megatron's DotProductAttention (which then uses it instead of its built-in
  causal mask), and the RoPE table gathered per token, [s, b, 1, dim];
- Transformer Engine (GPU): the row-major flattening of the microbatch as one THD sequence with cumulative
  sequence lengths (megatron-core's `PackedSeqParams`, qkv_format "thd"); TE's fused attention and the THD
  RoPE restart at every boundary. Not run on a CPU (no TE there): see docs/gpu.md.
"""
from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] positions -> [b, 1, s, s] bool, True where query i must not see key j."""
    segment = (position_ids == 0).cumsum(dim=1)  # sample number of each token within its row
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    return ~(same & causal).unsqueeze(1)


def rotary_per_token(table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """megatron's RoPE table [S, 1, 1, dim] -> [s, b, 1, dim] at each token's own position."""
    return table[:, 0, 0, :][position_ids].transpose(0, 1).unsqueeze(2)


def packed_seq_params(position_ids: torch.Tensor) -> PackedSeqParams:
    """THD parameters for the microbatch flattened row-major ([b, s] -> b*s tokens, batch dim 1)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1)
    end = torch.full((1,), flat.numel(), dtype=starts.dtype, device=flat.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max().item())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def to_thd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h] -> [b*s, 1, h] (row-major: row 0's tokens, then row 1's)."""
    s, b, h = x.shape
    return x.transpose(0, 1).reshape(b * s, 1, h)


def from_thd(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[b*s, 1, h] -> [s, b, h], contiguous (it may be a pipeline stage's output)."""
    return x.reshape(batch, -1, x.shape[-1]).transpose(0, 1).contiguous()


__all__ = ["attention_mask", "rotary_per_token", "packed_seq_params", "to_thd", "from_thd"]
