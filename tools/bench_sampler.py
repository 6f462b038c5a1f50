#!/usr/bin/env python
"""Benchmark the on-the-fly sample order at stage-1 scale: set-up time, lookup rate and RSS per DP rank.

Each rank runs in its own process (as in training), builds the order, resumes at a point deep into the
run, walks its micro batches, and reports its resident memory (psutil RSS).

    python tools/bench_sampler.py --samples 1540000000 --datasets-sizes 1400000000 [--json OUT.json]

With --json, every rank's figures, the machine and versions go to OUT.json and a chart of the rates per
rank to OUT.png.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_rank(rank: int, args: argparse.Namespace, queue) -> None:
    import numpy as np
    import psutil

    from qwenvl_megatron.data.sampler import DataParallelSampler, SampleOrder

    proc = psutil.Process(os.getpid())
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    order = SampleOrder(args.datasets_sizes, args.weights, seed=args.seed)
    step = args.micro_batch_size * args.dp_size
    resume_at = (int(args.samples * 0.9) // step) * step  # resume 90% into the run
    sampler = DataParallelSampler(order, args.micro_batch_size, rank, args.dp_size, consumed_samples=resume_at,
                                  total_samples=args.samples)
    first = next(iter(sampler))
    setup = time.perf_counter() - t0

    t0 = time.perf_counter()
    taken = 0
    for ds, ids in sampler:
        taken += len(ids)
        if taken >= args.measure_samples:
            break
    micro_rate = taken / (time.perf_counter() - t0)

    rng = np.random.default_rng(rank)
    ks = rng.integers(0, args.samples, args.random_lookups)
    t0 = time.perf_counter()
    for k in ks:
        order.lookup(int(k))
    random_rate = len(ks) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    ds, ids = order.lookup_range(args.samples - args.measure_samples, args.measure_samples)
    range_rate = args.measure_samples / (time.perf_counter() - t0)
    assert ids.max() < max(args.datasets_sizes) and len(first[1]) == args.micro_batch_size
    queue.put((rank, setup, micro_rate, random_rate, range_rate, proc.memory_info().rss, rss0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1_540_000_000, help="total samples of the run")
    p.add_argument("--datasets-sizes", type=int, nargs="+", default=[1_400_000_000])
    p.add_argument("--weights", type=float, nargs="+", default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dp-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--measure-samples", type=int, default=2_000_000, help="samples walked per rank")
    p.add_argument("--random-lookups", type=int, default=100_000)
    p.add_argument("--parallel-ranks", type=int, default=2, help="rank processes run at the same time")
    p.add_argument("--json", default=None, help="also write the figures here (the PNG chart goes beside it)")
    args = p.parse_args(argv)
    print(f"[bench_sampler] {args.samples} samples over datasets {args.datasets_sizes} "
          f"(weights {args.weights or 'equal'}), DP {args.dp_size} x micro batch {args.micro_batch_size}",
          file=sys.stderr, flush=True)
    ctx = mp.get_context("spawn")  # a fresh interpreter per rank, so RSS is what one rank really holds
    queue = ctx.Queue()
    results = []
    for first in range(0, args.dp_size, args.parallel_ranks):
        procs = [ctx.Process(target=run_rank, args=(r, args, queue))
                 for r in range(first, min(first + args.parallel_ranks, args.dp_size))]
        for proc in procs:
            proc.start()
        for _ in procs:
            results.append(queue.get())
        for proc in procs:
            proc.join()
            if proc.exitcode:
                raise SystemExit(f"bench_sampler: a rank process failed with exit code {proc.exitcode}")
    for rank, setup, micro, rnd, rng_rate, rss, rss0 in sorted(results):
        print(f"rank {rank}: setup+resume {setup * 1e3:.2f} ms | micro-batch walk {micro / 1e6:.2f} M samples/s | "
              f"lookup_range {rng_rate / 1e6:.2f} M samples/s | random lookup {rnd / 1e3:.0f} k/s | "
              f"RSS {rss / 2**20:.1f} MiB (interpreter+imports before order {rss0 / 2**20:.1f} MiB)")
    if args.json:
        from qwenvl_megatron.runtime import bench
        ranks = [{"rank": r, "setup_s": setup, "micro_batch_walk_per_s": micro, "random_lookup_per_s": rnd,
                  "lookup_range_per_s": rng_rate, "rss_bytes": rss, "rss_before_order_bytes": rss0}
                 for r, setup, micro, rnd, rng_rate, rss, rss0 in sorted(results)]
        series = {label: [(row["rank"], row[key] / 1e6) for row in ranks] for label, key in (
            ("micro-batch walk", "micro_batch_walk_per_s"), ("lookup_range", "lookup_range_per_s"),
            ("random lookup", "random_lookup_per_s"))}
        result = {"environment": bench.environment(), "command": "tools/bench_sampler.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]), "args": {k: v for k, v in vars(args).items() if k != "json"},
                  "ranks": ranks, "charts": [bench.chart(bench.png_path(args.json), series, title="sample order per rank",
                                                         xlabel="rank", ylabel="M samples/s", lines=False)]}
        bench.write_json(args.json, result)
        print(f"wrote {args.json} and {result['charts'][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
