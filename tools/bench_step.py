#!/usr/bin/env python
"""One training step broken into phases (data wait, forward, backward, gradient reduction, optimizer,
checkpoint) and the pipeline bubble for PP 1/2/4 against the 1F1B formula (p-1)/(m+p-1); or, with
--vs-reference, one trainer step and KV-cache decoding against the test suite's plain-PyTorch model.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python tools/bench_step.py --json OUT.json
    python tools/bench_step.py --configs small --pp 1 2 4 --json OUT.json
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python tools/bench_step.py --vs-reference --json OUT.json

--vs-reference writes {"tiny": {"step_time_ratio": ours / reference, "paired_ratio": {...}, "decode":
{...}}, "small": {...}} (fp32, 1 thread, interleaved; definitions: qwenvl_megatron/inference/overhead_bench.py).

Writes OUT.json (every figure, the device and versions), OUT.png (phases) and OUT_bubble.png. The phase
breakdown runs in this process (world of one); each PP size runs as its own torchrun job of PP processes
(TP 1, DP 1) on the `pipeline` config (8 equal LLM layers). Definitions: qwenvl_megatron/training/step_bench.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the figures here (the PNG charts go beside it)")
    p.add_argument("--configs", nargs="*", default=["tiny", "small"], help="phase breakdown configs: tiny, small (none: skip)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per config (after one warm-up)")
    p.add_argument("--pp", type=int, nargs="*", default=[1, 2, 4], help="pipeline sizes for the bubble (none: skip)")
    p.add_argument("--bubble-config", default="pipeline")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step for the bubble")
    p.add_argument("--bubble-steps", type=int, default=3)
    p.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint phase")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, PP 2 only, seconds (the tests' mode)")
    p.add_argument("--vs-reference", action="store_true",
                   help="one trainer step and greedy decoding against tests/reference_qwenvl.py (plain PyTorch)")
    p.add_argument("--repeats", type=int, default=15, help="--vs-reference: interleaved repeats of the step")
    p.add_argument("--decode-repeats", type=int, default=5, help="--vs-reference: interleaved generations")
    p.add_argument("--bubble-worker", action="store_true", help=argparse.SUPPRESS)
    args_list = sys.argv[1:] if argv is None else argv
    a = p.parse_args(args_list)
    from qwenvl_megatron.runtime import bench, initialize
    from qwenvl_megatron.training import step_bench

    if a.bubble_worker:  # one torchrun rank of a PP job
        import torch.distributed as dist
        pp = int(os.environ["WORLD_SIZE"])
        device = initialize(1, pp)
        out = step_bench.bubble(a.bubble_config, a.bubble_steps, device, a.microbatches)
        if out is not None:
            bench.write_json(a.json, out)
        dist.barrier()
        dist.destroy_process_group()
        return 0

    if a.vs_reference:
        return _vs_reference(a, args_list)
    if a.smoke:
        a.configs, a.steps, a.pp, a.bubble_config, a.microbatches, a.bubble_steps = ["smoke"], 1, [2], "smoke", 4, 1
    device = initialize(1, 1)
    result = {"environment": bench.environment(device), "command": "tools/bench_step.py " + " ".join(args_list),
              "phases": {}, "bubble": []}
    for name in a.configs:
        result["phases"][name] = step_bench.phases(name, a.steps, device, checkpoint=not a.no_checkpoint)
        ph = result["phases"][name]
        print(f"{name}: step {ph['phases_s']['step']['median'] * 1e3:.1f} ms (min {ph['phases_s']['step']['min'] * 1e3:.1f}, "
              f"max {ph['phases_s']['step']['max'] * 1e3:.1f}) | " + " | ".join(
                  f"{k} {ph['phases_s'][k]['median'] * 1e3:.1f} ms ({100 * ph['share_of_step'][k]:.0f}%)"
                  for k in step_bench.PHASES)
              + (f" | checkpoint {ph['checkpoint_s']['median'] * 1e3:.0f} ms ({ph['checkpoint_bytes'] / 2**20:.1f} MiB)"
                 if "checkpoint_s" in ph else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as d:
        for pp in a.pp or []:
            part = os.path.join(d, f"pp{pp}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={pp}",
                   os.path.abspath(__file__), "--bubble-worker", "--json", part, "--bubble-config", a.bubble_config,
                   "--microbatches", str(a.microbatches), "--bubble-steps", str(a.bubble_steps)]
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"bench_step: the PP {pp} job failed:\n{proc.stderr[-3000:]}")
            with open(part) as f:
                row = json.load(f)
            result["bubble"].append(row)
            print(f"PP {pp}, m {row['microbatches']}: bubble measured {row['bubble_measured']:.3f} (stages "
                  f"{', '.join(f'{b:.3f}' for b in row['bubble_measured_per_stage'])}), 1F1B formula "
                  f"{row['bubble_formula']:.3f}", flush=True)
    result["charts"] = step_bench.charts(result, a.json)
    bench.write_json(a.json, result)
    print(f"wrote {a.json} and {', '.join(result['charts'])}")
    return 0


def _load_reference():
    """The test suite's reference model, loaded by path: it stays test-owned and independent of the package."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("reference_qwenvl", os.path.join(ROOT, "tests", "reference_qwenvl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vs_reference(a, args_list) -> int:
    import torch

    from qwenvl_megatron.inference import overhead_bench
    from qwenvl_megatron.runtime import bench, initialize
    torch.set_num_threads(1)  # the comparison is defined at one thread (issue 11)
    configs = ["smoke"] if a.smoke else [c for c in a.configs]
    repeats, decode_repeats = (2, 1) if a.smoke else (a.repeats, a.decode_repeats)
    device = initialize(1, 1)
    if device.type != "cpu":
        raise SystemExit("--vs-reference compares on the CPU: the reference model (tests/reference_qwenvl.py) "
                         "builds its tensors there")
    rows = overhead_bench.vs_reference(configs, _load_reference(), repeats, decode_repeats, device)
    result = {"environment": bench.environment(device), "command": "tools/bench_step.py " + " ".join(args_list),
              **rows}
    for name in configs:
        r, d = rows[name], rows[name]["decode"]
        print(f"{name}: step ours {r['step_s']['median'] * 1e3:.1f} ms, reference {r['reference_step_s']['median'] * 1e3:.1f} ms: "
              f"ratio {r['step_time_ratio']:.3f} (paired {r['paired_ratio']['min']:.2f}-{r['paired_ratio']['max']:.2f}, "
              f"target {r['target_ratio']}; CPU time ratio {r['cpu_time_ratio']:.3f}) | decode {d['new_tokens']} tokens: cache {d['generate_s']['cache']['median'] * 1e3:.1f} ms, "
              f"recompute {d['generate_s']['recompute']['median'] * 1e3:.1f} ms, reference recompute "
              f"{d['generate_s']['reference_recompute']['median'] * 1e3:.1f} ms", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    result["charts"] = [overhead_bench.chart(rows, configs, a.json)]
    bench.write_json(a.json, result)
    print(f"wrote {a.json} and {', '.join(result['charts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
