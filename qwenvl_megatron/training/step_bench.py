"""One training step broken into phases, and the 1F1B pipeline bubble (tools/bench_step.py is the CLI).

Phases of a step, timed on the trainer's own code (`step.forward_backward`, `train.optimizer_update`,
`checkpoint.save_checkpoint`):

- data wait: the next global batch from the loader onto the device (the mock loader builds it in the loop,
  with no background thread: an upper bound of what the real loader's thread leaves to wait for);
- forward / backward: the time inside megatron's `schedules.forward_step` / `schedules.backward_step` (the
  loss included in the forward of the last stage);
- gradient reduction: `finalize_model_grads` (data-parallel all-reduce or reduce-scatter, the
  layer-norm / embedding reductions);
- optimizer: `train.optimizer_update` (the gradient norm, which is also the finite check, clipping, AdamW);
  schedule other: the rest of the schedule (p2p sends and waits, bookkeeping);
- checkpoint: one save of model and optimizer (a separate figure: it is paid once per --save-interval).

Pipeline bubble: with PP p and m microbatches, 1F1B keeps each stage idle for (p-1)/(m+p-1) of the
schedule if the stages' work is equal. Measured per rank as 1 - (forward + backward time) / schedule
time, averaged over the stages (stage 0 also holds the ViT and embedding, the last the LM head).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import torch

from ..runtime import bench

PHASES = ("data_wait", "forward", "backward", "grad_reduction", "schedule_other", "optimizer")


def bubble_formula(pp: int, microbatches: int) -> float:
    """The 1F1B pipeline bubble: idle share of each stage, (p - 1) / (m + p - 1)."""
    return (pp - 1) / (microbatches + pp - 1)


def config(name: str, seq_length: int | None = None):
    """(model config, seq length, image size, micro batch size, microbatches) of a named benchmark config."""
    from ..models.config import tiny
    if name == "tiny":
        return tiny(), seq_length or 128, 112, 2, 2
    if name == "small":  # LLM 512 x 8 layers, ViT 256 x 4 (issue 11)
        cfg = tiny(vocab_size=4096, image_start_id=4000).replace(
            llm={"num_layers": 8, "hidden_size": 512, "num_attention_heads": 8, "kv_channels": 64,
                 "ffn_hidden_size": 1376, "max_position_embeddings": 2048, "seq_length": 512},
            vit={"width": 256, "num_layers": 4, "num_heads": 4, "mlp_ratio": 4.0, "image_size": 224, "pos_grid": 16},
            adapter={"num_queries": 64, "num_heads": 8})
        return cfg, seq_length or 512, 224, 1, 2
    if name == "pipeline":  # 8 equal LLM layers (PP 1, 2, 4 divide them), a small ViT
        cfg = tiny().replace(llm={"num_layers": 8, "hidden_size": 128, "num_attention_heads": 4, "kv_channels": 32,
                                  "ffn_hidden_size": 256})
        return cfg, seq_length or 128, 56, 1, 8
    if name == "smoke":
        return tiny().replace(llm={"num_layers": 4}), seq_length or 48, 56, 1, 4
    raise ValueError(f"unknown benchmark config {name!r}: tiny, small, pipeline, smoke")


class _PhaseTimer:
    """Wraps megatron's schedule functions and the finalize hook, adding their time to `totals`."""

    def __init__(self, device):
        self.device, self.totals = device, dict.fromkeys(("forward", "backward", "grad_reduction"), 0.0)

    def _wrap(self, key, fn):
        def timed(*args, **kwargs):
            bench.sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                bench.sync(self.device)
                self.totals[key] += time.perf_counter() - t0
        return timed

    @contextlib.contextmanager
    def installed(self, model):
        from megatron.core.pipeline_parallel import schedules
        config = model[0].config
        saved = schedules.forward_step, schedules.backward_step, config.finalize_model_grads_func
        schedules.forward_step = self._wrap("forward", saved[0])
        schedules.backward_step = self._wrap("backward", saved[1])
        config.finalize_model_grads_func = self._wrap("grad_reduction", saved[2])
        try:
            yield self
        finally:
            schedules.forward_step, schedules.backward_step, config.finalize_model_grads_func = saved

    def reset(self):
        self.totals = dict.fromkeys(self.totals, 0.0)


def _build(cfg, seq, image_size, mbs, microbatches, device, seed=1):
    from megatron.core import parallel_state

    from ..data.loader import MockLoader
    from ..models.parallel import ParallelPlan
    from .layout import Layout
    from .optimizer import OptimizerSettings, build_optimizer, build_scheduler
    from .step import build_model
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    model = build_model(cfg, ParallelPlan(pipeline_parallel=pp), device=device)
    settings = OptimizerSettings(lr=1e-4, min_lr=1e-5)
    opt = build_optimizer(model, cfg, settings)
    sched = build_scheduler(opt, settings, 1, 1000)
    dp = parallel_state.get_data_parallel_world_size()
    loader = MockLoader(mbs, seq, cfg.llm.vocab_size, image_size, cfg.image_start_id, cfg.adapter.num_queries,
                        seed=seed, data_parallel_rank=parallel_state.get_data_parallel_rank(), data_parallel_size=dp)
    layout = Layout(torch.distributed.get_world_size(), 1, pp, dp, mbs, mbs * dp * microbatches, microbatches, seq)
    return model, opt, sched, loader, layout


def _one_step(model, opt, sched, batches, layout, timer, device) -> dict:
    from ..data.loader import gather_images
    from .step import forward_backward
    from .train import _to_device, optimizer_update
    times = {}
    timer.reset()
    bench.sync(device)
    t0 = time.perf_counter()
    host = next(batches)
    batch = [gather_images(_to_device(b, device)) for b in host]
    bench.sync(device)
    times["data_wait"] = time.perf_counter() - t0
    for chunk in model:
        chunk.zero_grad_buffer()
    opt.zero_grad()
    t1 = time.perf_counter()
    forward_backward(model, batch, layout.num_microbatches, layout.seq_length, layout.micro_batch_size)
    bench.sync(device)
    schedule = time.perf_counter() - t1
    times.update(timer.totals)
    times["schedule_other"] = schedule - sum(timer.totals.values())
    times["schedule"] = schedule
    t2 = time.perf_counter()
    optimizer_update(opt)
    sched.step(1)
    bench.sync(device)
    times["optimizer"] = time.perf_counter() - t2
    times["step"] = time.perf_counter() - t0
    return times


def _timed_steps(cfg, seq, image_size, mbs, m, steps, device):
    """Build the model of `cfg` and run one warm-up then `steps` timed steps: (model, opt, sched, [phase times])."""
    model, opt, sched, loader, layout = _build(cfg, seq, image_size, mbs, m, device)
    batches = loader.iterate(0, m, layout.global_batch_size)
    timer = _PhaseTimer(device)
    with timer.installed(model):
        _one_step(model, opt, sched, batches, layout, timer, device)  # warm-up
        per_step = [_one_step(model, opt, sched, batches, layout, timer, device) for _ in range(steps)]
    return model, opt, sched, per_step


def phases(config_name: str, steps: int, device, checkpoint: bool = True, seq_length: int | None = None) -> dict:
    """Phase times of `steps` training steps (after one warm-up step) of a config, world of this process."""
    cfg, seq, image_size, mbs, m = config(config_name, seq_length)
    cfg = cfg.replace(vit={"image_size": image_size})
    model, opt, sched, per_step = _timed_steps(cfg, seq, image_size, mbs, m, steps, device)
    out = {"config": config_name, "seq_length": seq, "image_size": image_size, "micro_batch_size": mbs,
           "microbatches": m, "steps": steps,
           "model": {"llm_layers": cfg.llm.num_layers, "hidden": cfg.llm.hidden_size, "vit_width": cfg.vit.width,
                     "vit_layers": cfg.vit.num_layers, "queries": cfg.adapter.num_queries,
                     "vocab": cfg.llm.vocab_size},
           "phases_s": {k: bench.summary([s[k] for s in per_step]) for k in PHASES + ("schedule", "step")}}
    med = statistics.median([s["step"] for s in per_step])
    out["share_of_step"] = {k: statistics.median([s[k] for s in per_step]) / med for k in PHASES}
    if checkpoint:
        from .checkpoint import iter_dir, save_checkpoint
        saves = []
        with tempfile.TemporaryDirectory(prefix="bench_step_ckpt_") as d:
            for k in range(2):
                t0 = time.perf_counter()
                save_checkpoint(d, k + 1, model, cfg, opt, sched, consumed_samples=0)
                saves.append(time.perf_counter() - t0)
            last = iter_dir(d, 2)
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(last) for f in fs)
        out["checkpoint_s"] = bench.summary(saves)
        out["checkpoint_bytes"] = int(size)
    return out


def bubble(config_name: str, steps: int, device, microbatches: int | None = None) -> dict | None:
    """Under torchrun with world = PP (TP 1, DP 1): per stage busy and schedule time; rank 0 gets the dict."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    cfg, seq, image_size, mbs, m = config(config_name)
    m = microbatches or m
    cfg = cfg.replace(vit={"image_size": image_size})
    _, _, _, per_step = _timed_steps(cfg, seq, image_size, mbs, m, steps, device)
    rows = [(t["schedule"], t["forward"] + t["backward"]) for t in per_step]
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    mine = torch.tensor([[s, b] for s, b in rows], dtype=torch.float64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    if dist.get_rank() != 0:
        return None
    stages = []
    for rank, part in enumerate(parts):
        bubbles = [1 - b / s for s, b in part.tolist()]
        stages.append({"stage": rank, "schedule_s": bench.summary([s for s, _ in part.tolist()]),
                       "busy_s": bench.summary([b for _, b in part.tolist()]), "bubble": bench.summary(bubbles)})
    measured = [statistics.median([1 - b / s for s, b in parts[r].tolist()]) for r in range(len(parts))]
    return {"pp": pp, "microbatches": m, "config": config_name, "steps": steps,
            "bubble_formula": bubble_formula(pp, m), "bubble_measured": statistics.mean(measured),
            "bubble_measured_per_stage": measured, "stages": stages}


def charts(result: dict, json_path: str) -> list[str]:
    paths = []
    if result.get("phases"):
        series = {}
        for name, ph in result["phases"].items():
            series[name] = [(k + 1, ph["share_of_step"][p]) for k, p in enumerate(PHASES)]
        short = ("data", "fwd", "bwd", "reduce", "sched", "optim")
        paths.append(bench.chart(bench.png_path(json_path), series,
                                 title="share of step: " + " ".join(f"{k + 1} {p}" for k, p in enumerate(short)),
                                 xlabel="phase", ylabel="share of step", lines=False))
    if result.get("bubble"):
        rows = sorted(result["bubble"], key=lambda r: r["pp"])
        paths.append(bench.chart(bench.png_path(json_path, "bubble"), {
            "measured": [(r["pp"], r["bubble_measured"]) for r in rows],
            "~1F1B (p-1)/(m+p-1)": [(r["pp"], r["bubble_formula"]) for r in rows]},
            title=f"pipeline bubble, m = {rows[0]['microbatches']} microbatches", xlabel="pipeline stages",
            ylabel="idle share"))
    return paths




# ---- one trainer step against an independent plain-PyTorch model doing the same work (issue 11) ----

def reference_step(ref_model, ref_opt, batch: list, clip_grad: float) -> float:
    """The reference's step on the trainer's global batch: loss over the supervised tokens only (the trainer
    sends only those through the LM head), mean over the global batch, gradient clipping, AdamW."""
    import torch.nn.functional as F
    from .step import IGNORE_INDEX
    ref_opt.zero_grad(set_to_none=True)
    count = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batch)
    total = 0.0
    for b in batch:
        x = ref_model.embed(b["input_ids"], b.get("images"))
        for block in ref_model.transformer.h:
            x = block(x)
        keep = b["targets"] != IGNORE_INDEX
        logits = ref_model.lm_head(ref_model.transformer.ln_f(x[keep])).float()
        loss = F.cross_entropy(logits, b["targets"][keep], reduction="sum")
        (loss / count).backward()
        total += float(loss)
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip_grad)
    ref_opt.step()
    return total / count


def build_reference(ref_module, cfg, settings):
    """The reference model of `cfg` (random HF weights) and torch's AdamW with the trainer's hyperparameters:
    weight decay on matrices only, as `training.optimizer` groups them."""
    ref_model = ref_module.ReferenceQwenVL(cfg.to_hf_config())
    ref_model.load_state_dict(ref_module.random_hf_state_dict(cfg.to_hf_config()), strict=False)
    decay = [p for p in ref_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref_model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr,
                            betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps)
    return ref_model, opt


def vs_reference(config_name: str, ref_module, repeats: int, device) -> dict:
    """One trainer step (`train.train_step`: megatron schedule, DDP buffers, its AdamW) against the reference
    model's forward + backward + AdamW on the same batch, interleaved; ratio = ours / reference."""
    from .optimizer import OptimizerSettings
    from .train import _to_device, train_step
    cfg, seq, image_size, mbs, m = config(config_name)
    cfg = cfg.replace(vit={"image_size": image_size})
    model, opt, sched, loader, layout = _build(cfg, seq, image_size, mbs, m, device)
    batch = [_to_device(b, device) for b in loader.global_batch(0, m)]
    ref_model, ref_opt = build_reference(ref_module, cfg, OptimizerSettings())
    clip = opt.config.clip_grad
    cases = {"ours": lambda: train_step(model, opt, sched, batch, layout),
             "reference": lambda: reference_step(ref_model, ref_opt, batch, clip)}
    cpu = {}
    times = bench.interleaved(cases, device, repeats, warmup=2, cpu_times=cpu)
    ratios = [a / b for a, b in zip(times["ours"], times["reference"])]  # neighbours in time: paired
    ours, ref = bench.summary(times["ours"]), bench.summary(times["reference"])
    cpu_ours, cpu_ref = bench.summary(cpu["ours"]), bench.summary(cpu["reference"])
    return {"config": config_name, "seq_length": seq, "image_size": image_size, "micro_batch_size": mbs,
            "microbatches": m, "repeats": repeats, "step_s": ours, "reference_step_s": ref,
            "step_time_ratio": ours["median"] / ref["median"], "paired_ratio": bench.summary(ratios),
            "step_cpu_s": cpu_ours, "reference_step_cpu_s": cpu_ref,
            "cpu_time_ratio": cpu_ours["median"] / cpu_ref["median"],
            "paired_cpu_ratio": bench.summary([a / b for a, b in zip(cpu["ours"], cpu["reference"])])}


__all__ = ["PHASES", "bubble_formula", "config", "phases", "bubble", "charts", "vs_reference", "reference_step",
           "build_reference"]
