#!/usr/bin/env python
"""Checkpoint conversion against its I/O floor: wall time and peak memory of hf-to-mcore and mcore-to-hf.

    python tools/bench_convert.py --json OUT.json [--work DIR] [--params 6e7] [--layout scaled|qwen-vl-7b]
                                  [--dtype fp32|bf16] [--tp T --pp P] [--repeats 3] [--warmup 1]
                                  [--shard-mb 64]

A random HF checkpoint (Qwen-VL layout; `--layout qwen-vl-7b` is the 9.6B release's) is written shard by
shard; the floor (read every tensor of it, write the same tensors), hf-to-mcore and mcore-to-hf then run
interleaved (order rotated per repeat), each in a child process timing only its work and reporting its
peak RSS above its start. OUT.json gets `hf_to_mcore_wall_ratio`, `mcore_to_hf_wall_ratio` (median over the
floor's median), `..._peak_rss_ratio` (peak RSS over the weights' bytes), `..._peak_rss_bound_ratio` (over one
(TP rank, PP stage) shard + one input shard file), and `round_trip_bit_exact`; OUT.png plots time against
memory. `--proof` converts once at full size and back, deleting the original on the way (two copies on
disk at most) and comparing with tensors regenerated from their seeds. Logic: qwenvl_megatron/convert/benchmark.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# torch and the package are imported after the arguments are parsed: `--help` stays fast.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="result file (the chart goes beside it as .png)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--params", type=float, default=6e7, help="parameters of the scaled layout")
    p.add_argument("--layout", choices=("scaled", "qwen-vl-7b"), default="scaled")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every case first")
    p.add_argument("--shard-mb", type=float, default=64, help="input shard size of the random checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proof", action="store_true",
                   help="once, at full size: write the checkpoint, hf-to-mcore, delete it, mcore-to-hf, compare "
                        "with regenerated tensors (e.g. --layout qwen-vl-7b --dtype bf16 --tp 2 --pp 2 --shard-mb "
                        "2048 --work /big/disk); time, per-rank and whole-machine memory into --json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Transparent huge pages for torch's large allocations (read once, before torch allocates; inherited by
    # the ranks): filling a stage 4 KiB page fault at a time cost more than copying it (docs/conversion.md).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from qwenvl_megatron.convert import benchmark
    from qwenvl_megatron.runtime import bench

    work = args.work or tempfile.mkdtemp(prefix="bench_convert_")
    if args.proof:
        try:
            result = benchmark.run_proof(work, args.layout, args.params, args.dtype, args.tp, args.pp,
                                         int(args.shard_mb * 2 ** 20), args.seed,
                                         log=lambda s: print(s, file=sys.stderr, flush=True))
            result["command"] = " ".join(["tools/bench_convert.py", *(argv if argv is not None else sys.argv[1:])])
            bench.write_json(args.json, result)
        finally:
            for d in ("hf", "mcore", "hf_back", "report"):
                shutil.rmtree(os.path.join(work, d), ignore_errors=True)
        sys.exit(0 if result["round_trip_bit_exact"] else 1)
    try:
        result = benchmark.run_bench(work, args.params, args.layout, args.dtype, args.tp, args.pp, args.repeats,
                                     int(args.shard_mb * 2 ** 20), args.seed, args.warmup,
                                     log=lambda s: print(s, file=sys.stderr, flush=True))
        result["command"] = " ".join(["tools/bench_convert.py", *(argv if argv is not None else sys.argv[1:])])
        bench.write_json(args.json, result)
        benchmark.chart(args.json, result)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    keys = [k for k in result if k.endswith(("_ratio",))] + ["round_trip_bit_exact"]
    for k in keys:
        print(f"{k}: {result[k]:.3f}" if isinstance(result[k], float) else f"{k}: {result[k]}")
    if not result["round_trip_bit_exact"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
