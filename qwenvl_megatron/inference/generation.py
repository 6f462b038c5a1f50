"""Greedy decoding with a KV cache, on any TP x PP layout.

The cache is megatron-core's `StaticInferenceContext`: every attention layer keeps its keys/values there
and takes rotary positions from its `sequence_len_offset`, so after the prompt (with its images) each
step feeds one token per row. Pipeline stages pass hidden states point-to-point; the last stage's
next-token logits are broadcast over the pipeline so every rank picks the same token (TP ranks compute the
same logits already: the model gathers them).

Rows of a batch share one prompt length (callers group prompts by length): positions are 0..L-1 per row
with no padding, exactly as in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from ..runtime.cpu_compat import plain_torch


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row, cut before the first stop id
    stopped: list[bool]  # whether the row ended with a stop id (else it hit max_new_tokens)
    step_logits: torch.Tensor  # [b, steps, vocab] fp32: the logits each new token was chosen from


def _device(model) -> torch.device:
    return next(model.parameters()).device


def stage_forward(model, input_ids: torch.Tensor, images: torch.Tensor | None,
                  inference_context: StaticInferenceContext | None = None) -> torch.Tensor | None:
    """One forward of the whole pipeline for `input_ids` [b, s]. Returns logits [b, s, vocab] on the last
    stage, None elsewhere. Collective over the pipeline group."""
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    b, s = input_ids.shape
    dtype = next(model.parameters()).dtype
    if not first:
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=dtype, device=_device(model))
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with plain_torch():  # the model's math asks for no CUDA tensor: no per-op hook (runtime.cpu_compat)
        out = model(input_ids, images if first else None, inference_context=inference_context)
    if not last:
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return out.float()


def _share_from_last_stage(t: torch.Tensor | None, shape, device) -> torch.Tensor:
    """The last pipeline stage's tensor on every rank of the pipeline group."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    if t is None:
        t = torch.empty(shape, dtype=torch.float32, device=device)
    dist.broadcast(t.contiguous(), src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return t


@torch.no_grad()
def prompt_logits(model, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
    """Teacher-forced logits [b, s, vocab] of the prompt itself (fp32), on every rank."""
    model.eval()
    input_ids = input_ids.to(_device(model))
    out = stage_forward(model, input_ids, images)
    vocab = model.cfg.llm.vocab_size
    return _share_from_last_stage(out, (*input_ids.shape, vocab), _device(model))


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, images: torch.Tensor | None, max_new_tokens: int,
                    stop_ids=(), banned_ids=(), use_cache: bool = True) -> Generation:
    """Greedy continuation of `input_ids` [b, s] (images [n, 3, H, W] for its `<img>` spans, row-major).

    `banned_ids` are never chosen (generation cannot open an image span: pass the image marker ids).
    `use_cache=False` recomputes the whole sequence every step (the reference for the cached path).
    """
    model.eval()
    device = _device(model)
    ids = input_ids.to(device)
    b, s = ids.shape
    vocab = model.cfg.llm.vocab_size
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=s + max_new_tokens) if use_cache else None
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    step_logits, new = [], []
    step_input, step_images = ids, images
    for _ in range(max_new_tokens):
        out = stage_forward(model, step_input, step_images, ctx)
        logits = _share_from_last_stage(None if out is None else out[:, -1].contiguous(), (b, vocab), device)
        if ctx is not None:
            ctx.sequence_len_offset += step_input.shape[1]
            ctx.enable_decode_mode()
        step_logits.append(logits)
        choose = logits.clone()
        if banned_ids:
            choose[:, list(banned_ids)] = float("-inf")
        token = choose.argmax(dim=-1)
        new.append(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()):
            break
        if ctx is not None:
            step_input, step_images = token[:, None], None
        else:
            step_input = torch.cat([ids, torch.stack(new, dim=1)], dim=1)
    if not new:  # max_new_tokens == 0: nothing to decode (the caller may want only the prompt's logits)
        return Generation([[] for _ in range(b)], [False] * b, torch.empty(b, 0, vocab, device=device))
    tokens = torch.stack(new, dim=1).tolist()
    stop_set = set(stop.tolist())
    cut, stopped = [], []
    for row in tokens:
        end = next((i for i, t in enumerate(row) if t in stop_set), None)
        cut.append(row if end is None else row[:end])
        stopped.append(end is not None)
    return Generation(cut, stopped, torch.stack(step_logits, dim=1))
