"""The training loop. Run under torchrun:

    torchrun --nproc_per_node 8 -m qwenvl_megatron.training.train --stage 1 --data-path ... --save ckpt/s1

Each iteration is one global batch: GBS / (MBS x DP) microbatches through megatron's schedule, one
optimizer update, one LR-scheduler step. A non-finite loss or gradient skips the update (the data is
still consumed, as in Megatron-LM); `--max-skipped-iters` in a row stops the run. SIGTERM (e.g. Slurm's
pre-emption warning) saves a checkpoint and exits cleanly. The marker moves to a checkpoint only once a
finite loss on its weights proves it (the next step's, or a forward-only pass for the last save).
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
from ..runtime.distributed import launch_env
from . import checkpoint as ckpt
from .arguments import args_record, parse_args
from .layout import Layout, LayoutError, batch_flops, dry_run_report, parallel_plan, plan_layout
from .optimizer import OptimizerSettings, build_optimizer, build_scheduler, freeze
from .scalar_log import check_wandb, scalar_sinks
from .step import build_model, forward_backward, unwrap


def log(msg: str) -> None:
    """Rank 0's line, in one write: unbuffered (python -u), print writes the text and the newline apart,
    and another rank's output sharing the stream could land between them."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        sys.stdout.write(f"{msg}\n")
        sys.stdout.flush()


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
                            seed=args.seed, data_parallel_rank=dp_rank, data_parallel_size=layout.data_parallel,
                            pack_sequences=args.pack_sequences, pack_same_task=args.pack_same_task,
                            packed_attention=args.packed_attention or "per-sample")


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def optimizer_update(optimizer) -> tuple[bool, float]:
    """megatron's `optimizer.step()`, split so that nothing is applied unless the gradient norm is finite:
    (updated, grad norm). The norm is the one clipping needs anyway, reduced over every rank holding a part
    of the gradients (a fully frozen pipeline stage joins with zero), so it is non-finite on every rank
    exactly when some reduced gradient is (or when the norm itself overflows fp32, past ~1e19): the finite
    check costs no extra pass over the gradients."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    if optimizer.prepare_grads():  # fp16 loss scaling found an inf (and lowered the scale)
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(part, "is_stub_optimizer", False) else part.get_parameters()
        if params and part.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, part.config.clip_grad, grad_norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_step(model, optimizer, scheduler, batches: list, layout: Layout,
               stats: dict | None = None) -> tuple[float, float, bool]:
    """One global batch -> (loss, grad norm, updated). Skips the update on non-finite loss/grads.
    `stats` receives the batch's supervised / real (non-padding) token counts (step.forward_backward)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss, _ = forward_backward(model, batches, layout.num_microbatches, layout.seq_length,
                               layout.micro_batch_size, stats=stats)
    if not math.isfinite(loss):  # the same on every rank: forward_backward reduced it
        return loss, float("nan"), False
    updated, grad_norm = optimizer_update(optimizer)
    if updated:
        scheduler.step(1)
    return loss, grad_norm, updated


def current_lr(optimizer) -> float:
    groups = [g for g in optimizer.param_groups if g.get("lr_mult", 1.0) == 1.0] or optimizer.param_groups
    return float(groups[0]["lr"]) if groups else 0.0


def train(args, layout: Layout) -> dict:
    """Build everything, resume if asked, iterate. Returns {"history": [(iteration, loss, grad_norm, lr)],
    "iteration", "consumed_samples", "skipped"} (identical on every rank)."""
    device = initialize(layout.tensor_parallel, layout.pipeline_parallel, seed=args.seed)
    cfg, plan = args.model_cfg, parallel_plan(args)
    peak_tflops, peak_source = resolve_peak_tflops(args, device)
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
            try:
                info = ckpt.load_checkpoint(args.load, model, optimizer, scheduler,
                                            weights_only=args.load_weights_only, verify=args.verify_checksums)
            except ckpt.CheckpointError as e:
                raise SystemExit(f"--load: {e}") from None
            iteration, consumed = info["iteration"], info["consumed_samples"]
            log(f"loaded {'weights from ' if args.load_weights_only else ''}{info['path']} "
                f"(iteration {iteration}, consumed samples {consumed})")
    check_no_rollback(args, iteration)

    loader = build_loader(args, layout, device)
    batches = loader.iterate(consumed, layout.num_microbatches, layout.global_batch_size)
    stop = StopRequest()

    def step_flops(stats) -> dict:
        return batch_flops(cfg, layout.seq_length, args.image_size, rows=stats["positions"] // layout.seq_length,
                           images=stats["images"], supervised_tokens=stats["supervised_tokens"],
                           microbatches=stats["image_microbatches"], freeze=args.freeze, recompute=args.recompute,
                           tensor_parallel=layout.tensor_parallel, sequence_parallel=args.sequence_parallel)
    record = args_record(args)
    sinks = scalar_sinks(args, record, warn=log)

    def save(it, done) -> str:
        """Write the checkpoint; the marker stays where it is until `prove` moves it."""
        try:
            path = ckpt.save_checkpoint(args.save, it, model, cfg, optimizer, scheduler, consumed_samples=done,
                                        args=record, move_marker=False)
        except ckpt.CheckpointSaveError as e:
            raise SystemExit(f"--save {args.save}: {e}") from None
        log(f"saved checkpoint {path} (the marker moves to it once a finite loss on its weights proves it)")
        return path

    def prove(it, how):
        try:
            ckpt.mark_proven(args.save, it)
        except ckpt.CheckpointSaveError as e:
            raise SystemExit(f"--save {args.save}: {e}") from None
        log(f"checkpoint {ckpt.iter_dir(args.save, it)} proven ({how}): {ckpt.MARKER} -> {it}")

    def last_proven() -> str:
        if not args.save:
            return "none (no --save)"
        it = ckpt.latest_iteration(args.save)
        return "none" if it is None else f"{ckpt.iter_dir(args.save, it)} (iteration {it})"

    history, skipped_in_row, skipped_total = [], 0, 0
    unproven = None  # iteration of the newest checkpoint saved but not yet proven
    start = window_start = time.time()
    start_iteration, window_iters = iteration, 0
    window = {"supervised_tokens": 0, "real_tokens": 0, "positions": 0, "samples": 0, "data_wait": 0.0,
              "model_flops": 0.0, "executed_flops": 0.0}
    log(f"MFU denominator: --peak-tflops {peak_tflops:.4g} per device ({peak_source})")
    log(f"training {cfg.llm.num_layers}-layer LLM, world {layout.world_size} (TP {layout.tensor_parallel} "
        f"PP {layout.pipeline_parallel} DP {layout.data_parallel}), {layout.num_microbatches} microbatches "
        f"of {layout.micro_batch_size}, from iteration {iteration} to {args.train_iters}")
    while iteration < args.train_iters:
        wait_start = time.perf_counter()  # data wait: until this step's batch is on the device
        host_batch = next(batches)
        global_batch = [gather_images(_to_device(b, device)) for b in host_batch]  # TP image shares
        window["data_wait"] += time.perf_counter() - wait_start
        stats = {}
        loss, grad_norm, updated = train_step(model, optimizer, scheduler, global_batch, layout, stats)
        iteration += 1
        window["samples"] += host_batch.consumed_after - consumed
        consumed = host_batch.consumed_after  # + GBS samples, or the packer's cursor
        for key in ("supervised_tokens", "real_tokens", "positions"):
            window[key] += stats[key]
        flops = step_flops(stats)
        window["model_flops"] += flops["model"]
        window["executed_flops"] += flops["executed"]
        window_iters += 1
        lr = current_lr(optimizer)
        history.append((iteration, loss, grad_norm, lr))
        if updated:
            skipped_in_row = 0
            if unproven is not None:  # this step's loss was computed on the checkpoint's weights
                prove(unproven, f"loss {loss:.4f} at iteration {iteration}")
                unproven = None
        else:
            skipped_in_row += 1
            skipped_total += 1
            log(f"iteration {iteration}: non-finite loss {loss} or gradient, update skipped "
                f"({skipped_in_row} in a row, {skipped_total} total)")
            if skipped_in_row >= args.max_skipped_iters:
                raise SystemExit(f"stopping: {skipped_in_row} consecutive iterations had a non-finite loss or "
                                 f"gradient (--max-skipped-iters {args.max_skipped_iters}); last proven checkpoint: "
                                 f"{last_proven()}; lower --lr or check the data")
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            now = time.time()
            per_iter = (now - window_start) / window_iters
            span = now - window_start
            tflops = window["model_flops"] / span / layout.world_size / 1e12
            executed = window["executed_flops"] / span / layout.world_size / 1e12
            eta = (args.train_iters - iteration) * (now - start) / (iteration - start_iteration)
            supervised_per_s = window["supervised_tokens"] / span
            padding = 1 - window["real_tokens"] / max(window["positions"], 1)
            data_wait = window["data_wait"] / span
            log(f"iter {iteration}/{args.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                f"{window['samples'] / span:.1f} samples/s | {layout.tokens_per_step / per_iter:,.0f} "
                f"tokens/s | {tflops:.3g} TFLOP/s/GPU | MFU {100 * tflops / peak_tflops:.3g}% | "
                f"executed {executed:.3g} TFLOP/s/GPU (HFU {100 * executed / peak_tflops:.3g}%) | "
                f"supervised {supervised_per_s:,.0f} tokens/s | padding {100 * padding:.1f}% | "
                f"data wait {100 * data_wait:.1f}% | "
                f"skipped {skipped_total} | elapsed {_hms(now - start)} | ETA {_hms(eta)}")
            scalars = {f"train/{name}": value for name, value in (
                ("loss", loss), ("lr", lr), ("grad_norm", grad_norm),
                ("samples_per_s", window["samples"] / span),
                ("supervised_tokens_per_s", supervised_per_s), ("padding_fraction", padding),
                ("tflops_per_gpu", tflops), ("executed_tflops_per_gpu", executed),
                ("data_wait_fraction", data_wait), ("skipped", skipped_total))}
            for sink in sinks:
                sink.log(scalars, iteration)
            window_start, window_iters = now, 0
            window = dict.fromkeys(window, 0)
        stopping = stop.agreed(device)
        exiting = bool(args.exit_interval and iteration % args.exit_interval == 0)
        if args.save and (stopping or exiting or iteration % args.save_interval == 0
                          or iteration == args.train_iters):
            save(iteration, consumed)
            if stopping or exiting or iteration == args.train_iters:
                # No next step will prove these weights: one forward-only pass on this step's batch does.
                check, _ = forward_backward(model, global_batch, layout.num_microbatches, layout.seq_length,
                                            layout.micro_batch_size, forward_only=True)
                if math.isfinite(check):
                    prove(iteration, f"forward-only loss {check:.4f} on its weights")
                    unproven = None
                else:
                    log(f"checkpoint {ckpt.iter_dir(args.save, iteration)} NOT proven: the loss on its weights "
                        f"is {check}; {ckpt.MARKER} stays at {last_proven()}")
            else:
                unproven = iteration
        if stopping:
            log(f"SIGTERM: saved at iteration {iteration}, exiting")
            break
        if exiting:
            log(f"--exit-interval {args.exit_interval}: exiting at iteration {iteration}")
            break
    for sink in sinks:
        sink.close()
    return {"history": history, "iteration": iteration, "consumed_samples": consumed, "skipped": skipped_total}


def resolve_peak_tflops(args, device) -> tuple[float, str]:
    """--peak-tflops, or the detected device's peak (a GPU table; on a CPU a matmul measured on every rank at
    once, since they share the cores, and averaged over the ranks)."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    from ..runtime.peak import detect_peak_tflops
    peak, source = detect_peak_tflops(device, bf16=args.bf16, seconds=0.5)
    if device.type == "cpu" and dist.is_initialized() and dist.get_world_size() > 1:
        mean = torch.tensor([peak], dtype=torch.float64, device=device)
        dist.all_reduce(mean)
        peak = float(mean.item()) / dist.get_world_size()
        source += f", mean of {dist.get_world_size()} ranks measuring at once"
    return peak, source


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def planned_start_iteration(args) -> int | None:
    """The iteration a run will start from, known before building anything: 0 without --load or with
    --load-weights-only (or an empty --load that is --save), else the iteration of the iter_* directory
    --load resolves to (None when its name does not say; the check after loading covers that)."""
    if not args.load or args.load_weights_only:
        return 0
    try:
        path = ckpt.resolve_checkpoint_dir(args.load)
    except ckpt.CheckpointError:
        return 0  # the --load == --save case with nothing saved yet (check_input_paths refused the others)
    name = os.path.basename(os.path.normpath(path))
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def check_no_rollback(args, start: int | None) -> None:
    """Refuse to write into a --save directory whose marker names a newer iteration than the run starts
    from: its saves would move the marker back (a relaunch without --load restarting from 0)."""
    if not args.save or start is None or args.overwrite_checkpoints:
        return
    try:
        newest = ckpt.latest_iteration(args.save)
    except ckpt.CheckpointError as e:
        raise SystemExit(f"--save: {e}") from None
    if newest is not None and newest > start:
        raise SystemExit(f"--save {args.save} holds a checkpoint of iteration {newest}, newer than this run's "
                         f"start (iteration {start}); its saves would move {ckpt.MARKER} back. Resume with "
                         f"--load {args.save}, pick another --save, or pass --overwrite-checkpoints")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)  # checks every input path (data, tokenizer, --load, --model-config) first
    check_wandb(args)
    if not args.dry_run:
        check_no_rollback(args, planned_start_iteration(args))
    launched = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    world = args.world_size or launch_env(launched)[1]  # torchrun's WORLD_SIZE, or a bare srun's SLURM_NTASKS
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
