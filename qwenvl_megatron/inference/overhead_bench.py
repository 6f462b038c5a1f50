"""The trainer and the generator against an independent plain-PyTorch model doing the same work (issue 11;
`tools/bench_step.py --vs-reference` is the CLI). The reference model is test-owned
(tests/reference_qwenvl.py: it shares no code with the model under test); the caller loads it and passes
the module in.

Step: one trainer step (`train.train_step`) against the reference's forward + backward + AdamW on the
same global batch (`training.step_bench.vs_reference`); ratio = ours / reference, target <= 1.25 on the
tiny preset and <= 1.05 on the small config.

Decode: three ways to produce the same new tokens after one prompt (an image span and a few text tokens), timed
interleaved: `greedy_generate` with the cache (prompt once, then one token per step), `greedy_generate`
with `use_cache=False` (the whole sequence, images included, every step) and the independent reference
model doing the same full recomputation. Every one runs a fixed number of steps (no stop id).
"""
from __future__ import annotations

import torch

from ..runtime import bench
from .generation import greedy_generate


def reference_generate(ref_model, input_ids: torch.Tensor, images: torch.Tensor | None, steps: int) -> list:
    """Greedy tokens of the reference model, recomputing the whole sequence every step."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(steps):
            token = ref_model(ids, images)[:, -1].argmax(-1)
            ids = torch.cat([ids, token[:, None]], dim=1)
    return ids[:, input_ids.shape[1]:].tolist()


def decode(config_name: str, ref_module, repeats: int, device, new_tokens: int = 16, text_tokens: int = 8) -> dict:
    """Seconds per generation of `new_tokens` tokens (batch 1) in the three ways, and the speed-up of the
    cache over each recomputation."""
    from ..data.loader import MockLoader
    from ..models.parallel import ParallelPlan
    from ..training.step import build_model
    from ..training.step_bench import build_reference, config
    from ..training.optimizer import OptimizerSettings
    cfg, _, image_size, _, _ = config(config_name)
    cfg = cfg.replace(vit={"image_size": image_size})
    q = cfg.adapter.num_queries
    loader = MockLoader(1, q + 4 + text_tokens, cfg.llm.vocab_size, image_size, cfg.image_start_id, q)
    tokens, _, image = loader.sample(0)
    prompt = torch.from_numpy(tokens[: q + 3 + text_tokens])[None].to(device)
    images = image[None].to(device)
    (model,) = build_model(cfg, ParallelPlan(), wrap_ddp=False, device=device)
    ref_model, _ = build_reference(ref_module, cfg, OptimizerSettings())
    ref_model.eval()
    cases = {"cache": lambda: greedy_generate(model, prompt, images, new_tokens),
             "recompute": lambda: greedy_generate(model, prompt, images, new_tokens, use_cache=False),
             "reference_recompute": lambda: reference_generate(ref_model, prompt, images, new_tokens)}
    same = greedy_generate(model, prompt, images, new_tokens).tokens == \
        greedy_generate(model, prompt, images, new_tokens, use_cache=False).tokens
    cpu = {}
    times = bench.interleaved(cases, device, repeats, warmup=1, cpu_times=cpu)
    s = {k: bench.summary(v) for k, v in times.items()}
    c = {k: bench.summary(v) for k, v in cpu.items()}
    return {"config": config_name, "prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens,
            "repeats": repeats, "generate_s": s, "generate_cpu_s": c, "cache_equals_recompute": same,
            "speedup_vs_recompute": s["recompute"]["median"] / s["cache"]["median"],
            "speedup_vs_reference_recompute": s["reference_recompute"]["median"] / s["cache"]["median"],
            "cpu_speedup_vs_recompute": c["recompute"]["median"] / c["cache"]["median"],
            "cpu_speedup_vs_reference_recompute": c["reference_recompute"]["median"] / c["cache"]["median"]}


TARGETS = {"tiny": 1.25, "small": 1.05}  # step_time_ratio at most this (issue 11)


def vs_reference(configs, ref_module, repeats: int, decode_repeats: int, device) -> dict:
    """{config: {"step_time_ratio", "paired_ratio", "step_s", "reference_step_s", ..., "decode": {...}}}."""
    from ..training import step_bench
    out = {}
    for name in configs:
        row = step_bench.vs_reference(name, ref_module, repeats, device)
        row["target_ratio"] = TARGETS.get(name)
        row["decode"] = decode(name, ref_module, decode_repeats, device)
        out[name] = row
    return out


def chart(result: dict, configs, json_path: str) -> str:
    """Ratios per config (x = 1, 2, ... in the order given): step ours / reference against the target, and
    the cache's speed-up over both recomputations (above 1: the cache is faster)."""
    xs = list(enumerate(configs, 1))
    series = {"step ours/ref": [(x, result[c]["step_time_ratio"]) for x, c in xs],
              "step CPU ours/ref": [(x, result[c]["cpu_time_ratio"]) for x, c in xs],
              "~target": [(x, result[c]["target_ratio"]) for x, c in xs if result[c]["target_ratio"]],
              "decode recomp/cache": [(x, result[c]["decode"]["speedup_vs_recompute"]) for x, c in xs],
              "decode ref/cache": [
                  (x, result[c]["decode"]["speedup_vs_reference_recompute"]) for x, c in xs]}
    return bench.chart(bench.png_path(json_path), series, lines=False, xlabel="config",
                       title="ours vs plain PyTorch: " + ", ".join(f"{x} {c}" for x, c in xs), ylabel="ratio")


__all__ = ["decode", "reference_generate", "vs_reference", "chart", "TARGETS"]
