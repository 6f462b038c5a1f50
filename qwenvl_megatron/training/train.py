"""The training loop. Run under torchrun:

    torchrun --nproc_per_node 8 -m qwenvl_megatron.training.train --stage 1 --data-path ... --save ckpt/s1

Each iteration is one global batch: GBS / (MBS x DP) microbatches through megatron's schedule, one
optimizer update, one LR-scheduler step. A non-finite loss or gradient skips the update (the data is
still consumed, as in Megatron-LM); `--max-skipped-iters` in a row stops the run. SIGTERM (e.g. Slurm's
pre-emption warning) saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..data.images import ImageTransform
from ..data.loader import MicroBatchLoader, MockLoader, gather_images
from ..runtime import device as runtime_device, initialize
from . import checkpoint as ckpt
from .arguments import args_record, parse_args
from .layout import Layout, LayoutError, dry_run_report, flops_per_sample, parallel_plan, plan_layout
from .optimizer import OptimizerSettings, build_optimizer, build_scheduler, freeze
from .step import build_model, forward_backward, unwrap


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


class StopRequest:
    """SIGTERM sets a flag; ranks agree on it once per iteration so every rank saves at the same step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def build_loader(args, layout: Layout, device):
    dp_rank = parallel_state.get_data_parallel_rank()
    cfg = args.model_cfg
    if args.mock_data:
        return MockLoader(layout.micro_batch_size, layout.seq_length, cfg.llm.vocab_size, args.image_size,
                          cfg.image_start_id, cfg.adapter.num_queries, seed=args.seed,
                          data_parallel_rank=dp_rank, data_parallel_size=layout.data_parallel)
    pad_id = 0
    if args.tokenizer_model:
        from ..data.tokenizer import build_tokenizer
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        if tok.img_start_id != cfg.image_start_id:
            raise SystemExit(f"tokenizer {args.tokenizer_model}: <img> is id {tok.img_start_id} but the model "
                             f"config says image_start_id={cfg.image_start_id}")
        if tok.vocab_size > cfg.llm.vocab_size:
            raise SystemExit(f"tokenizer {args.tokenizer_model} has {tok.vocab_size} ids, more than the "
                             f"model's vocab_size {cfg.llm.vocab_size}")
        pad_id = tok.pad_id
    else:
        log("note: no --tokenizer-model, so the image token ids are not checked against a tokenizer; "
            "padding uses id 0 (padded positions carry no loss and come after the text)")
    transform = ImageTransform(args.image_size, backend=args.image_backend,
                               device=device if device.type == "cuda" else None)
    return MicroBatchLoader(args.data_paths, layout.micro_batch_size, layout.seq_length, transform, pad_id,
                            cfg.image_start_id, cfg.adapter.num_queries, weights=args.data_weights,
                            seed=args.seed, data_parallel_rank=dp_rank, data_parallel_size=layout.data_parallel)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def grads_finite(model) -> bool:
    """True when every gradient of every rank is finite (checked on the reduced grad buffers). A pipeline
    stage with every parameter frozen (stage 1's LLM-only stages) has no buffer but still takes part."""
    bad = 0.0
    for chunk in model:
        for buf in getattr(chunk, "buffers", []):
            bad += float(not torch.isfinite(buf.grad_data).all())
    flag = torch.tensor([bad], device=runtime_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def train_step(model, optimizer, scheduler, batches: list, layout: Layout) -> tuple[float, float, bool]:
    """One global batch -> (loss, grad norm, updated). Skips the update on non-finite loss/grads."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss, _ = forward_backward(model, batches, layout.num_microbatches, layout.seq_length,
                               layout.micro_batch_size)
    if not math.isfinite(loss) or not grads_finite(model):
        return loss, float("nan"), False
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(1)
    return loss, float(grad_norm) if grad_norm is not None else float("nan"), bool(updated)


def current_lr(optimizer) -> float:
    groups = [g for g in optimizer.param_groups if g.get("lr_mult", 1.0) == 1.0] or optimizer.param_groups
    return float(groups[0]["lr"]) if groups else 0.0


class _TensorBoardSink:
    def __init__(self, writer):
        self.writer = writer

    def log(self, scalars: dict, step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandbSink:
    """Megatron-LM's W&B logging: one run per job on the logging rank, the same scalars and steps as
    TensorBoard."""

    def __init__(self, args, record: dict):
        import wandb

        save_dir = args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        self.wandb = wandb
        wandb.init(project=args.wandb_project, name=args.wandb_exp_name or None, dir=save_dir, config=record)

    def log(self, scalars: dict, step: int) -> None:
        self.wandb.log(dict(scalars), step=step)

    def close(self) -> None:
        self.wandb.finish()


def check_wandb(args) -> None:
    """--wandb-project without the optional package: a one-line error before anything is built."""
    if getattr(args, "wandb_project", None):
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise SystemExit("--wandb-project needs the `wandb` package, which is not installed: "
                             "pip install wandb (or drop --wandb-project)")


def _scalar_sinks(args, record: dict) -> list:
    """Where the log step's scalars go on rank 0: TensorBoard (--tensorboard-dir), W&B (--wandb-project)."""
    if dist.get_rank() != 0:
        return []
    sinks = []
    if args.tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
            sinks.append(_TensorBoardSink(SummaryWriter(args.tensorboard_dir)))
        except Exception as e:  # noqa: BLE001 - logging must not stop training
            log(f"warning: TensorBoard unavailable ({type(e).__name__}: {e}); logging to stdout only")
    if args.wandb_project:
        sinks.append(_WandbSink(args, record))
    return sinks


def train(args, layout: Layout) -> dict:
    """Build everything, resume if asked, iterate. Returns {"history": [(iteration, loss, grad_norm, lr)],
    "iteration", "consumed_samples", "skipped"} (identical on every rank)."""
    device = initialize(layout.tensor_parallel, layout.pipeline_parallel, seed=args.seed)
    cfg, plan = args.model_cfg, parallel_plan(args)
    model = build_model(cfg, plan, freeze=lambda m: freeze(m, args.freeze), device=device,
                        use_distributed_optimizer=args.use_distributed_optimizer,
                        overlap_grad_reduce=args.overlap_grad_reduce)
    settings = OptimizerSettings(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                                 adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                                 clip_grad=args.clip_grad, vit_lr_decay=args.vit_lr_decay, bf16=args.bf16,
                                 use_distributed_optimizer=args.use_distributed_optimizer)
    optimizer = build_optimizer(model, cfg, settings)
    scheduler = build_scheduler(optimizer, settings, args.lr_warmup_iters, args.train_iters, args.lr_decay_style)

    iteration, consumed = 0, 0
    if args.load:
        have = (os.path.isfile(os.path.join(args.load, "metadata.json"))
                or ckpt.latest_iteration(args.load) is not None)
        if not have and args.save and os.path.abspath(args.load) == os.path.abspath(args.save):
            log(f"no checkpoint in {args.load} yet: starting from scratch")
        else:
            info = ckpt.load_checkpoint(args.load, model, optimizer, scheduler, weights_only=args.load_weights_only)
            iteration, consumed = info["iteration"], info["consumed_samples"]
            log(f"loaded {'weights from ' if args.load_weights_only else ''}{info['path']} "
                f"(iteration {iteration}, consumed samples {consumed})")

    loader = build_loader(args, layout, device)
    batches = loader.iterate(consumed, layout.num_microbatches, layout.global_batch_size)
    stop = StopRequest()
    flops_step = flops_per_sample(cfg, layout.seq_length, args.image_size, args.freeze) * layout.global_batch_size
    record = args_record(args)
    sinks = _scalar_sinks(args, record)

    def save(it, done):
        if args.save:
            path = ckpt.save_checkpoint(args.save, it, model, cfg, optimizer, scheduler, consumed_samples=done,
                                        args=record)
            log(f"saved checkpoint {path}")

    history, skipped_in_row, skipped_total = [], 0, 0
    start = window_start = time.time()
    start_iteration, window_iters = iteration, 0
    log(f"training {cfg.llm.num_layers}-layer LLM, world {layout.world_size} (TP {layout.tensor_parallel} "
        f"PP {layout.pipeline_parallel} DP {layout.data_parallel}), {layout.num_microbatches} microbatches "
        f"of {layout.micro_batch_size}, from iteration {iteration} to {args.train_iters}")
    while iteration < args.train_iters:
        global_batch = [gather_images(_to_device(b, device)) for b in next(batches)]  # TP image shares
        loss, grad_norm, updated = train_step(model, optimizer, scheduler, global_batch, layout)
        iteration += 1
        consumed += layout.global_batch_size
        window_iters += 1
        lr = current_lr(optimizer)
        history.append((iteration, loss, grad_norm, lr))
        if updated:
            skipped_in_row = 0
        else:
            skipped_in_row += 1
            skipped_total += 1
            log(f"iteration {iteration}: non-finite loss {loss} or gradient, update skipped "
                f"({skipped_in_row} in a row, {skipped_total} total)")
            if skipped_in_row >= args.max_skipped_iters:
                raise SystemExit(f"stopping: {skipped_in_row} consecutive iterations had a non-finite loss or "
                                 f"gradient (--max-skipped-iters {args.max_skipped_iters}); last good checkpoint "
                                 f"is in {args.save or '(no --save)'}; lower --lr or check the data")
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            now = time.time()
            per_iter = (now - window_start) / window_iters
            tflops = flops_step / per_iter / layout.world_size / 1e12
            eta = (args.train_iters - iteration) * (now - start) / (iteration - start_iteration)
            log(f"iter {iteration}/{args.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                f"{layout.global_batch_size / per_iter:.1f} samples/s | {layout.tokens_per_step / per_iter:,.0f} "
                f"tokens/s | {tflops:.3g} TFLOP/s/GPU | MFU {100 * tflops / args.peak_tflops:.3g}% | "
                f"skipped {skipped_total} | elapsed {_hms(now - start)} | ETA {_hms(eta)}")
            scalars = {f"train/{name}": value for name, value in (
                ("loss", loss), ("lr", lr), ("grad_norm", grad_norm),
                ("samples_per_s", layout.global_batch_size / per_iter), ("tflops_per_gpu", tflops),
                ("skipped", skipped_total))}
            for sink in sinks:
                sink.log(scalars, iteration)
            window_start, window_iters = now, 0
        stopping = stop.agreed(device)
        exiting = bool(args.exit_interval and iteration % args.exit_interval == 0)
        if stopping or exiting or iteration % args.save_interval == 0 or iteration == args.train_iters:
            save(iteration, consumed)
        if stopping:
            log(f"SIGTERM: saved at iteration {iteration}, exiting")
            break
        if exiting:
            log(f"--exit-interval {args.exit_interval}: exiting at iteration {iteration}")
            break
    for sink in sinks:
        sink.close()
    return {"history": history, "iteration": iteration, "consumed_samples": consumed, "skipped": skipped_total}


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    check_wandb(args)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        layout = plan_layout(args, world)
    except LayoutError as e:
        raise SystemExit(f"impossible layout: {e}") from None
    if args.dry_run:
        print(dry_run_report(args, layout), flush=True)
        return None
    return train(args, layout)


if __name__ == "__main__":
    main(sys.argv[1:])
