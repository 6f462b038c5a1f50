"""Collective bandwidth over message sizes, in nccl-tests' convention (tools/bench_comm.py is the CLI).

Run in every rank of a torchrun job (gloo on CPU, NCCL on GPUs). For a message of `size` bytes (nccl-tests'
"size": the all-reduce buffer, the all-gather *output*, the reduce-scatter *input*, the send buffer):

    algbw = size / time        busbw = algbw x factor
    factor: all-reduce 2(n-1)/n, all-gather (n-1)/n, reduce-scatter (n-1)/n, send/recv 1

so busbw is comparable to the link's bandwidth whatever n is. send/recv is a ring: each rank sends to
rank + 1 and receives from rank - 1 at the same time. Each timing is the mean of `iters` back-to-back
calls (after `warmup`), the slowest rank's; repeats run the operations interleaved (the order rotates)
and the figures are the median with min and max over repeats.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from . import bench

OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


def bus_factor(op: str, n: int) -> float:
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "send_recv": 1.0}[op]


def default_sizes(device: torch.device, smoke: bool = False) -> list[int]:
    if smoke:
        return [1024, 64 * 1024]
    if device.type == "cuda":
        return [2 ** k for k in range(10, 31, 2)]  # 1 KiB .. 1 GiB
    return [4 ** k for k in range(6, 14)]  # 4 KiB .. 64 MiB


def _op_call(op: str, size: int, device, dtype=torch.float32):
    n, rank, es = dist.get_world_size(), dist.get_rank(), dtype.itemsize
    count = max(size // es // n * n, n)  # divisible by n (all-gather / reduce-scatter chunks)
    if op == "all_reduce":
        buf = torch.ones(count, device=device, dtype=dtype)
        return lambda: dist.all_reduce(buf)
    if op == "all_gather":
        out = torch.empty(count, device=device, dtype=dtype)
        inp = torch.ones(count // n, device=device, dtype=dtype)
        return lambda: dist.all_gather_into_tensor(out, inp)
    if op == "reduce_scatter":
        inp = torch.ones(count, device=device, dtype=dtype)
        out = torch.empty(count // n, device=device, dtype=dtype)
        return lambda: dist.reduce_scatter_tensor(out, inp)
    send = torch.ones(count, device=device, dtype=dtype)
    recv = torch.empty(count, device=device, dtype=dtype)

    def send_recv():
        ops = [dist.P2POp(dist.isend, send, (rank + 1) % n), dist.P2POp(dist.irecv, recv, (rank - 1) % n)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return send_recv


def _supported(op: str, device) -> bool:
    """gloo lacks reduce_scatter_tensor in some torch builds: probe once."""
    try:
        _op_call(op, 1024, device)()
        bench.sync(device)
        return True
    except Exception:  # noqa: BLE001
        return False


def run(device, sizes: list[int] | None = None, repeats: int = 3, iters: int | None = None, warmup: int = 2,
        ops=OPS, smoke: bool = False) -> dict | None:
    """Every rank calls this; rank 0 gets the result dict, the others None."""
    n, rank = dist.get_world_size(), dist.get_rank()
    sizes = sizes or default_sizes(device, smoke)
    usable, skipped = [], {}
    for op in ops:
        if n < 2 and op == "send_recv":
            skipped[op] = "needs 2 ranks"
        elif _supported(op, device):
            usable.append(op)
        else:
            skipped[op] = f"not supported by {dist.get_backend()}"
    times: dict[tuple[str, int], list[float]] = {(op, s): [] for op in usable for s in sizes}
    calls = {(op, s): _op_call(op, s, device) for op in usable for s in sizes}
    for (op, s), call in calls.items():
        for _ in range(warmup):
            call()
    for r in range(repeats):
        order = usable[r % len(usable):] + usable[:r % len(usable)] if usable else []
        for op in order:
            for s in sizes:
                k = iters or max(2, min(20, int(2 ** 24 // max(s, 1))))  # fewer calls for big messages
                dist.barrier()
                bench.sync(device)
                t0 = time.perf_counter()
                for _ in range(k):
                    calls[(op, s)]()
                bench.sync(device)
                dt = torch.tensor([(time.perf_counter() - t0) / k], dtype=torch.float64, device=device)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                times[(op, s)].append(float(dt.item()))
    if rank != 0:
        return None
    results = {}
    for op in usable:
        rows = []
        for s in sizes:
            t = bench.summary(times[(op, s)])
            es = 4
            real = max(s // es // n * n, n) * es
            alg = real / t["median"] / 1e9
            rows.append({"bytes": real, "time_us": {k: (v * 1e6 if k != "n" else v) for k, v in t.items()},
                         "algbw_gbps": alg, "busbw_gbps": alg * bus_factor(op, n)})
        results[op] = rows
    return {"environment": bench.environment(device), "backend": dist.get_backend(), "world_size": n,
            "repeats": repeats, "convention": "nccl-tests algbw = size / time, busbw = algbw x bus factor",
            "bus_factor": {op: bus_factor(op, n) for op in ops}, "results": results, "skipped": skipped}


def charts(result: dict, json_path: str) -> list[str]:
    series = {op: [(r["bytes"], r["busbw_gbps"]) for r in rows] for op, rows in result["results"].items()}
    return [bench.chart(bench.png_path(json_path), series,
                        title=f"{result['backend']} busbw, {result['world_size']} ranks ({result['environment']['device'][:30]})",
                        xlabel="message bytes", ylabel="busbw GB/s", logx=True, logy=True)]


__all__ = ["OPS", "bus_factor", "default_sizes", "run", "charts"]
