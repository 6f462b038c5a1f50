#!/usr/bin/env python
"""All-reduce, all-gather, reduce-scatter and send/recv bandwidth over message sizes (nccl-tests' algbw and
busbw), gloo on CPU, NCCL on GPUs.

    torchrun --nproc-per-node 8 tools/bench_comm.py --json OUT.json
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python tools/bench_comm.py --json OUT.json   # starts torchrun itself (--nproc 2)

Writes OUT.json (rank 0: every size's time and bandwidths, the device and versions) and OUT.png (busbw
against size). Not under torchrun it launches itself under `torch.distributed.run` with --nproc processes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the figures here (the PNG goes beside it)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes when not already under torchrun (default: the GPUs, else 2)")
    p.add_argument("--sizes", type=int, nargs="+", help="message sizes in bytes (default: 4 KiB..64 MiB on CPU, "
                                                         "1 KiB..1 GiB on GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, help="calls per timing (default: 20 for small messages, fewer for large)")
    p.add_argument("--smoke", action="store_true", help="two small sizes, seconds (the tests' mode)")
    args_list = sys.argv[1:] if argv is None else argv
    a = p.parse_args(args_list)
    if "LOCAL_RANK" not in os.environ:
        import torch
        nproc = a.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
        child = []  # this command line without --nproc (torchrun's own parser would take it for --nproc-per-node)
        skip = False
        for x in args_list:
            if skip:
                skip = False
            elif x == "--nproc":
                skip = True
            elif not x.startswith("--nproc="):
                child.append(x)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.abspath(__file__), *child]
        return subprocess.call(cmd, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x])))

    import torch.distributed as dist

    from qwenvl_megatron.runtime import bench, comm_bench, initialize
    device = initialize(1, 1)
    result = comm_bench.run(device, sizes=a.sizes, repeats=a.repeats if not a.smoke else 2, iters=a.iters,
                            smoke=a.smoke)
    if result is not None:
        result["command"] = "tools/bench_comm.py " + " ".join(args_list)
        result["charts"] = comm_bench.charts(result, a.json)
        bench.write_json(a.json, result)
        env = result["environment"]
        print(f"{result['backend']} x {result['world_size']} ranks | {env['device']} | torch {env['torch']}")
        print(f"{'op':15s} {'bytes':>11s} {'time us':>11s} {'algbw GB/s':>11s} {'busbw GB/s':>11s}")
        for op, rows in result["results"].items():
            for r in rows:
                print(f"{op:15s} {r['bytes']:11d} {r['time_us']['median']:11.1f} {r['algbw_gbps']:11.3f} "
                      f"{r['busbw_gbps']:11.3f}")
        for op, why in result["skipped"].items():
            print(f"{op:15s} skipped: {why}")
        print(f"wrote {a.json} and {', '.join(result['charts'])}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
