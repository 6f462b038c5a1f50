"""One optimisation step on megatron-core: model chunks in DDP, its schedules, per-token loss.

The loss is the mean over every supervised token of the global batch. Each microbatch returns its loss
*sum* and token count; megatron's schedules add the counts over microbatches, `finalize_model_grads`
adds them over data-parallel ranks and divides the summed gradients once. So an update does not depend
on how the global batch is split into microbatches or ranks.
"""
from __future__ import annotations

from typing import Iterable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..models.config import QwenVLConfig
from ..models.parallel import ParallelPlan
from ..models.qwen_vl import QwenVLModel
from ..runtime import device as runtime_device, misplaced_tensors

IGNORE_INDEX = -100


def build_model(cfg: QwenVLConfig, plan: ParallelPlan, *, freeze=None, wrap_ddp: bool = True,
                use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                device: torch.device | None = None) -> list[torch.nn.Module]:
    """This rank's pipeline stage of the model on `device` (default: the training device), as a list of
    chunks (megatron's convention).

    Built under the device (the full-size init of megatron's CPU-initialisation mode then runs there too)
    and moved there whole before DDP wraps it: megatron's DDP moves only the trainable parameters, but
    frozen parts and buffers must be on the GPU as well. `freeze(model)` runs before DDP wraps the model,
    so frozen parameters get no gradient buffer.
    """
    device = device or runtime_device()
    with torch.device(device):
        model = QwenVLModel(cfg, plan, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage())
    model.to(device=device, dtype=plan.params_dtype)  # local norms are built fp32: bf16 means all bf16, as in Megatron-LM
    if freeze is not None:
        freeze(model)
    config = model.config
    config.calculate_per_token_loss = True
    if not wrap_ddp:
        return [_placed(model, device)]
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
            use_distributed_optimizer=use_distributed_optimizer),
        module=model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:  # the schedule starts each bucket's reduction as its gradients are ready
        config.grad_sync_func = ddp.start_grad_sync
    return [_placed(ddp, device)]


def _placed(chunk: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`chunk`, once every parameter, gradient buffer, buffer and tensor attribute is on `device`."""
    misplaced = misplaced_tensors(chunk, device)
    if misplaced:
        raise RuntimeError(f"model tensors not on {device} after placement: {', '.join(misplaced[:8])}"
                           f"{' ...' if len(misplaced) > 8 else ''}")
    return chunk


def unwrap(chunk: torch.nn.Module) -> QwenVLModel:
    while not isinstance(chunk, QwenVLModel):
        chunk = chunk.module
    return chunk


def forward_step(data_iterator, model):
    """megatron schedule callback: one microbatch through this stage; the loss closure on the last."""
    batch = next(data_iterator)
    targets = batch["targets"]
    output = model(batch["input_ids"], batch.get("images"), targets, position_ids=batch.get("position_ids"))
    positions = targets.numel()
    real = batch.get("real_tokens", positions)  # the loader counts non-padding positions
    images = batch.get("images")
    n_images = 0 if images is None else int(images.shape[0])

    def loss_func(per_token_loss: torch.Tensor):
        num_tokens = (targets != IGNORE_INDEX).sum().to(torch.int)
        loss_sum = per_token_loss.float().sum()
        counts = torch.tensor([real, positions, n_images, float(n_images > 0)], dtype=torch.float32,
                              device=loss_sum.device)
        report = torch.cat([torch.stack([loss_sum.detach(), num_tokens.float()]), counts])
        return loss_sum, num_tokens, {"lm loss": report}

    return output, loss_func


def forward_backward(model: list, batches: Iterable[dict], num_microbatches: int, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False, stats: dict | None = None
                     ) -> tuple[float, int]:
    """Run the schedule over `num_microbatches` batches. Returns (mean loss over the global batch's
    supervised tokens, token count), identical on every rank. `stats`, when given, receives the global
    batch's `supervised_tokens`, `real_tokens` (not padding), `positions` (rows x seq), `images` and
    `image_microbatches` (microbatches with at least one image; the FLOP count of training.layout needs them)."""
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)
    total = torch.zeros(6, dtype=torch.float64, device=runtime_device())  # NCCL reduces device tensors only
    for item in losses:
        total += item["lm loss"].double()
    # Sum over data-parallel replicas, then share the last stage's numbers with the whole pipeline.
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    if stats is not None:
        values = total.tolist()
        stats.update(supervised_tokens=int(values[1]), real_tokens=int(values[2]), positions=int(values[3]),
                     images=int(values[4]), image_microbatches=int(values[5]))
    return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item())
