"""How a training run is laid out over the processes, and what it costs per GPU (the `--dry-run` plan).

`plan_layout` refuses impossible layouts up front with a message saying what would work (which
micro-batch sizes divide the global batch, which world sizes fit TP x PP), instead of letting a
40-minute job start and die in a collective. `estimate_memory` is arithmetic on the config (no model is
built), so the 7B plan for 256 GPUs prints in a second on a laptop.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.config import QwenVLConfig
from ..models.parallel import ParallelPlan, padded_vocab_size

GiB = 1024 ** 3


class LayoutError(ValueError):
    """The requested parallel layout cannot run; the message names the flags and what would work."""


@dataclass
class Layout:
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    seq_length: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


def parallel_plan(args) -> ParallelPlan:
    """The run's plan. A dry run plans for the GPU cluster, where `auto` resolves to TE: only an explicit
    `--transformer-impl local` plans local layers (and is refused with `--sequence-parallel`, as the run
    would be). Fused kernels: those this machine has, less the ones turned off by flag."""
    from ..runtime.layer_impl import available_fusions, resolve_impl
    import torch
    return ParallelPlan(
        fusions=available_fusions() - set(args.disabled_fusions),
        tensor_parallel=args.tensor_model_parallel_size, pipeline_parallel=args.pipeline_model_parallel_size,
        first_stage_layers=args.decoder_first_pipeline_num_layers, sequence_parallel=args.sequence_parallel,
        recompute=tuple(args.recompute), bf16=args.bf16, init_std=args.init_method_std,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        impl=resolve_impl(args.transformer_impl) if not args.dry_run else
        ("local" if args.transformer_impl == "local" else "te"))


def plan_layout(args, world_size: int) -> Layout:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    if tp < 1 or pp < 1 or mbs < 1 or gbs < 1:
        raise LayoutError("--tensor-model-parallel-size, --pipeline-model-parallel-size, --micro-batch-size "
                          "and --global-batch-size must all be >= 1")
    if world_size % (tp * pp):
        raise LayoutError(f"world size {world_size} is not divisible by TP {tp} x PP {pp} = {tp * pp}; "
                          f"run on a multiple of {tp * pp} processes, or pick TP x PP among "
                          f"{_divisor_pairs(world_size)}")
    try:
        parallel_plan(args).validate(args.model_cfg)
    except ValueError as e:
        raise LayoutError(str(e)) from None
    dp = world_size // (tp * pp)
    if gbs % (mbs * dp):
        if gbs % dp:
            fits = [d for d in range(1, min(gbs, 4096) + 1) if gbs % d == 0]
            raise LayoutError(
                f"--global-batch-size {gbs} is not divisible by the data-parallel size {dp} "
                f"(world {world_size} / TP {tp} / PP {pp}); no --micro-batch-size can fix that. Use a "
                f"data-parallel size among {fits[:24]}{' ...' if len(fits) > 24 else ''}")
        valid = [m for m in range(1, gbs // dp + 1) if (gbs // dp) % m == 0]
        raise LayoutError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size "
            f"{dp} = {mbs * dp}; valid --micro-batch-size values for DP {dp}: "
            f"{valid[:24]}{' ...' if len(valid) > 24 else ''}")
    return Layout(world_size, tp, pp, dp, mbs, gbs, gbs // (mbs * dp), args.seq_length)


def _divisor_pairs(n: int) -> list[tuple[int, int]]:
    return [(t, p) for t in (1, 2, 4, 8) for p in range(1, n + 1) if n % (t * p) == 0][:12]


# ------------------------------------------------------------------------------------ parameter counts
def part_parameters(cfg: QwenVLConfig, tp: int = 1) -> dict[str, int]:
    """Parameters per tensor-parallel rank: 'vit', 'adapter', 'llm_layer' (one decoder layer),
    'embedding', 'head', 'final_norm'. With tp=1 these sum to the model's numel (tested)."""
    v, a, l = cfg.vit, cfg.adapter, cfg.llm
    w, fv, h, f = v.width, v.ffn_hidden_size, l.hidden_size, l.ffn_hidden_size
    vit_layer = 4 * w + (3 * w * w + 3 * w) // tp + w * w // tp + w + (w * fv + fv) // tp + fv * w // tp + w
    vit = 3 * v.patch_size ** 2 * w + v.pos_grid ** 2 * w + 2 * w + v.num_layers * vit_layer
    adapter = a.num_queries * h + w * h + 6 * h + 3 * (h * h + h) // tp + h * h // tp + h + h * h
    llm_layer = 2 * h + (3 * h * h + 3 * h) // tp + h * h // tp + 3 * f * h // tp
    vocab = padded_vocab_size(l.vocab_size, tp) * h // tp
    return {"vit": vit, "adapter": adapter, "llm_layer": llm_layer, "embedding": vocab, "head": vocab,
            "final_norm": h}


def _stage_layers(cfg: QwenVLConfig, pp: int, first: int | None) -> list[int]:
    n = cfg.llm.num_layers
    if pp == 1:
        return [n]
    if first is None:
        return [n // pp] * pp
    return [first] + [(n - first) // (pp - 1)] * (pp - 1)


def estimate_memory(args, layout: Layout) -> list[dict]:
    """Per pipeline stage, bytes per GPU for weights, grads, optimizer state and activations."""
    cfg, tp, pp = args.model_cfg, layout.tensor_parallel, layout.pipeline_parallel
    counts = part_parameters(cfg, tp)
    frozen = set(args.freeze)
    wbytes = 2 if args.bf16 else 4
    opt_bytes = 12 if args.bf16 else 8  # Adam moments (+ fp32 master copy with bf16)
    opt_div = layout.data_parallel if args.use_distributed_optimizer else 1
    stages = []
    for s, layers in enumerate(_stage_layers(cfg, pp, args.decoder_first_pipeline_num_layers)):
        parts = {"llm": layers * counts["llm_layer"]}
        if s == 0:  # ln_post + proj sit in the adapter module but freeze with the ViT (optimizer.part_of)
            tail = 2 * cfg.llm.hidden_size + cfg.llm.hidden_size ** 2
            parts.update(vit=counts["vit"] + tail, adapter=counts["adapter"] - tail)
            parts["llm"] += counts["embedding"]
        if s == pp - 1:
            parts["llm"] += counts["head"] + counts["final_norm"]
        total = sum(parts.values())
        trainable = sum(n for part, n in parts.items() if part not in frozen)
        act = _activation_bytes(args, layout, s, layers)
        stages.append({"stage": s, "llm_layers": layers, "params": total, "trainable": trainable,
                       "weights": total * wbytes, "grads": trainable * 4,
                       "optimizer": trainable * opt_bytes // opt_div, "activations": act})
    for st in stages:
        st["total"] = st["weights"] + st["grads"] + st["optimizer"] + st["activations"]
    return stages


def _layer_activation_bytes(s: int, b: int, h: int, heads: int, tp: int, sp: bool, flash: bool,
                            recompute: bool, bytes_per: int) -> tuple[float, float]:
    """(kept per layer, peak of one layer) for one microbatch, after Korthikanti et al. 2022."""
    full = s * b * h * ((34 / tp) if sp else (10 + 24 / tp)) * bytes_per / 2
    if not flash:
        full += 5 * heads * s * s * b / tp * bytes_per / 2
    kept = 2 * s * b * h * bytes_per / 2 / (tp if sp else 1) if recompute else full
    return kept, full


def _activation_bytes(args, layout: Layout, stage: int, llm_layers: int) -> int:
    cfg, tp, pp = args.model_cfg, layout.tensor_parallel, layout.pipeline_parallel
    b, s, bp = layout.micro_batch_size, layout.seq_length, (2 if args.bf16 else 4)
    flash = args.transformer_impl != "local"  # TE (what auto is on GPUs) uses flash attention: no s^2 scores
    in_flight = min(pp - stage, layout.num_microbatches)  # 1F1B: stage i holds pp - i microbatches
    kept, peak = _layer_activation_bytes(s, b, cfg.llm.hidden_size, cfg.llm.num_attention_heads, tp,
                                         args.sequence_parallel, flash, "llm" in args.recompute, bp)
    total = llm_layers * kept * in_flight + (peak if "llm" in args.recompute else 0)
    if stage == 0:
        v = cfg.vit
        grid = (args.image_size // v.patch_size) ** 2
        vk, vpk = _layer_activation_bytes(grid, b, v.width, v.num_heads, tp, False, flash,
                                          "vit" in args.recompute, bp)
        if "vit" not in args.freeze or "adapter" not in args.freeze or "llm" not in args.freeze:
            total += v.num_layers * vk * in_flight + (vpk if "vit" in args.recompute else 0)
    if stage == pp - 1:  # fp32 logits and their gradient
        total += 2 * s * b * padded_vocab_size(cfg.llm.vocab_size, tp) / tp * 4
    return int(total)


def forward_flops(cfg: QwenVLConfig, seq_length: int, image_size: int) -> dict[str, float]:
    """Matmul FLOPs of one forward pass, by piece (2 per multiply-add; norms, softmax, RoPE not counted).

    'vit' and 'adapter_per_image' per image; 'adapter_queries' the queries' own projection (the model runs
    it once per microbatch and broadcasts it over the images); 'llm_per_row' one row of `seq_length`
    through the decoder layers (causal attention: half the scores); 'head_per_position' one position
    through the LM head with the real vocabulary, 'head_per_position_padded' with megatron's padded one.
    """
    v, a, l = cfg.vit, cfg.adapter, cfg.llm
    patches, w, fv, h, q = (image_size // v.patch_size) ** 2, v.width, v.ffn_hidden_size, l.hidden_size, a.num_queries
    vit = (2 * patches * 3 * v.patch_size ** 2 * w                            # patch embedding (conv)
           + v.num_layers * (2 * patches * (4 * w * w + 2 * w * fv)            # qkv, out, fc1, fc2
                             + 4 * patches * patches * w))                      # scores and context
    adapter = (2 * patches * w * h                    # kv_proj on the patches
               + 2 * 2 * patches * h * h              # k and v projections on the patches
               + 4 * q * patches * h                  # scores and context
               + 2 * q * h * h                        # output projection
               + 2 * q * h * h)                       # ln_post(out) @ proj
    attn = l.num_attention_heads * l.kv_channels
    layer = 2 * seq_length * (3 * h * attn + attn * h + 3 * h * l.ffn_hidden_size) \
        + 4 * seq_length * seq_length * attn / 2
    return {"vit": float(vit), "adapter_per_image": float(adapter), "adapter_queries": float(2 * q * h * h),
            "llm_per_row": float(l.num_layers * layer), "head_per_position": float(2 * h * l.vocab_size),
            "head_per_position_padded": float(2 * h * padded_vocab_size(l.vocab_size, 1))}


def _multipliers(freeze) -> dict[str, int]:
    """Forward + backward cost of each part in forwards: 3 when it trains (input and weight gradients), 2
    when frozen but a part upstream trains (input gradients only), 1 when nothing upstream trains."""
    out, upstream = {}, False
    for part in ("vit", "adapter", "llm"):
        trains = part not in freeze
        out[part] = 3 if trains else 2 if upstream else 1
        upstream = upstream or trains
    return out


def batch_flops(cfg: QwenVLConfig, seq_length: int, image_size: int, *, rows: int, images: int,
                supervised_tokens: int, microbatches: int, freeze=(), recompute=(), tensor_parallel: int = 1,
                sequence_parallel: bool = False) -> dict[str, float]:
    """FLOPs of `rows` rows of `seq_length` with `images` images, forward and backward.

    'model': the paper's (MFU) convention: every position of every row through the decoder and the LM
    head (real vocabulary), each image through ViT and adapter, recompute not counted.
    'executed': what this trainer runs (hardware FLOPs): the LM head only on the supervised positions (every
    position under sequence parallelism) over the padded vocabulary, the queries' projection once per
    microbatch with images, and the recomputed forward of each part in `recompute` that has a backward.
    """
    f, mult = forward_flops(cfg, seq_length, image_size), _multipliers(freeze)
    model = (images * (f["vit"] * mult["vit"] + (f["adapter_per_image"] + f["adapter_queries"]) * mult["adapter"])
             + rows * (f["llm_per_row"] + seq_length * f["head_per_position"]) * mult["llm"])
    head_positions = rows * seq_length if sequence_parallel else supervised_tokens
    vocab = padded_vocab_size(cfg.llm.vocab_size, tensor_parallel) * 2 * cfg.llm.hidden_size
    redo = {p: 1 if p in recompute and mult[p] > 1 else 0 for p in mult}
    executed = (images * (f["vit"] - 2 * (image_size // cfg.vit.patch_size) ** 2 * 3 * cfg.vit.patch_size ** 2
                          * cfg.vit.width) * redo["vit"]  # recompute covers the layers, not the patch embedding
                + images * f["vit"] * mult["vit"]
                + images * f["adapter_per_image"] * (mult["adapter"] + redo["adapter"])
                - images * 2 * cfg.adapter.num_queries * cfg.llm.hidden_size ** 2 * redo["adapter"]  # proj not recomputed
                + min(images, microbatches) * f["adapter_queries"] * (mult["adapter"] + redo["adapter"])
                + rows * f["llm_per_row"] * (mult["llm"] + redo["llm"])
                + head_positions * vocab * mult["llm"])
    return {"model": float(model), "executed": float(executed)}


def flops_per_sample(cfg: QwenVLConfig, seq_length: int, image_size: int, freeze=(), images_per_sample: int = 1) -> float:
    """Model FLOPs (the MFU convention of `batch_flops`) of one training sample of `seq_length`."""
    return batch_flops(cfg, seq_length, image_size, rows=1, images=images_per_sample,
                       supervised_tokens=seq_length, microbatches=1, freeze=freeze)["model"]


def dry_run_report(args, layout: Layout) -> str:
    cfg = args.model_cfg
    stages = estimate_memory(args, layout)
    lines = [
        f"plan: world {layout.world_size} = TP {layout.tensor_parallel} x PP {layout.pipeline_parallel} "
        f"x DP {layout.data_parallel}",
        f"batch: global {layout.global_batch_size} = micro {layout.micro_batch_size} x DP "
        f"{layout.data_parallel} x {layout.num_microbatches} microbatches per step",
        f"per step: {layout.global_batch_size} samples, {layout.tokens_per_step:,} tokens "
        f"(seq {layout.seq_length}); {args.train_iters} iters = "
        f"{args.train_iters * layout.global_batch_size:,} samples",
        f"model: LLM {cfg.llm.num_layers} layers x {cfg.llm.hidden_size}, ViT {cfg.vit.num_layers} x "
        f"{cfg.vit.width} at {args.image_size}px, {cfg.adapter.num_queries} queries; "
        f"frozen: {','.join(args.freeze) or 'none'}; recompute: {','.join(args.recompute) or 'none'}",
        f"schedule: lr {args.lr:g} -> {args.min_lr:g} ({args.lr_decay_style}), warmup {args.lr_warmup_iters}, "
        f"ViT layer decay {args.vit_lr_decay:g}; {'bf16' if args.bf16 else 'fp32'}, "
        f"{'distributed' if args.use_distributed_optimizer else 'replicated'} optimizer",
        "memory per GPU (GiB, estimate):  stage  weights  grads  optimizer  activations  total",
    ]
    for st in stages:
        lines.append(f"{'':32}{st['stage']:>5}  {st['weights'] / GiB:7.2f}  {st['grads'] / GiB:5.2f}  "
                     f"{st['optimizer'] / GiB:9.2f}  {st['activations'] / GiB:11.2f}  {st['total'] / GiB:5.2f}")
    limit = args.gpu_memory_gib
    over = [st for st in stages if st["total"] / GiB > limit]
    for st in over:
        lines.append(f"does not fit: stage {st['stage']} needs {st['total'] / GiB:.2f} GiB per GPU, "
                     f"{st['total'] / GiB - limit:.2f} GiB over --gpu-memory-gib {limit:g}")
    if not over:
        top = max(stages, key=lambda st: st["total"])
        lines.append(f"fits: every stage within --gpu-memory-gib {limit:g} (largest: stage {top['stage']}, "
                     f"{top['total'] / GiB:.2f} GiB)")
    t = run_time(args, layout)
    lines.append(f"time at MFU {args.assumed_mfu:g} of --peak-tflops {args.peak_tflops:g}: "
                 f"{t['flops_per_step'] / 1e15:,.1f} PFLOP per step (1 image per sample), "
                 f"{t['step_s']:.2f} s per step; {args.train_iters} iters = {t['hours']:,.1f} h on "
                 f"{layout.world_size} GPUs = {t['gpu_hours']:,.0f} GPU-hours")
    return "\n".join(lines)


def run_time(args, layout: Layout) -> dict:
    """Step time and GPU-hours from the model FLOPs at `--assumed-mfu` of `--peak-tflops` per GPU."""
    flops = flops_per_sample(args.model_cfg, layout.seq_length, args.image_size, args.freeze) \
        * layout.global_batch_size
    step_s = flops / (layout.world_size * args.peak_tflops * 1e12 * args.assumed_mfu)
    hours = step_s * args.train_iters / 3600
    return {"flops_per_step": flops, "step_s": step_s, "hours": hours, "gpu_hours": hours * layout.world_size}


__all__ = ["Layout", "LayoutError", "plan_layout", "parallel_plan", "part_parameters", "estimate_memory",
           "dry_run_report", "flops_per_sample", "forward_flops", "batch_flops", "run_time"]
