"""The per-device peak that MFU divides by: a table of GPU datasheet peaks, a measured matmul peak elsewhere.

GPU figures are dense (no sparsity) tensor-core peaks in TFLOP/s for bf16 and for tf32 (what an fp32 run's
matmuls use on Ampere and later). A GPU not in the table, and a CPU, get a measured peak: the best rate of
a square fp32 (or bf16) matmul over about `seconds`, with the threads this process has.
"""
from __future__ import annotations

import time

import torch

# name fragment (lower case, most specific first) -> (bf16 dense, tf32 dense) TFLOP/s, from the datasheets
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("gh200", 989.0, 494.0), ("h200", 989.0, 494.0), ("h100 pcie", 756.0, 378.0), ("h100 nvl", 835.0, 418.0),
    ("h100", 989.0, 494.0), ("h800", 989.0, 494.0), ("b200", 2250.0, 1100.0), ("b100", 1750.0, 875.0),
    ("a100", 312.0, 156.0), ("a800", 312.0, 156.0), ("a40", 150.0, 75.0), ("a30", 165.0, 82.0),
    ("a10g", 70.0, 35.0), ("a10", 125.0, 62.5), ("l40s", 362.0, 183.0), ("l40", 181.0, 90.5),
    ("l4", 121.0, 60.0), ("rtx 4090", 165.0, 82.6), ("rtx 3090", 71.0, 35.6), ("v100", 125.0, 15.7),
)


def table_peak(name: str, bf16: bool = True) -> float | None:
    """The datasheet peak of a GPU by its name (`torch.cuda.get_device_name()`), or None if unknown."""
    low = name.lower()
    for fragment, bf, tf in GPU_PEAKS:
        if fragment in low:
            return bf if bf16 else tf
    return None


def measure_matmul_tflops(device=None, dtype=torch.float32, seconds: float = 1.0, n: int | None = None) -> float:
    """Best achieved TFLOP/s of an n x n x n matmul on `device` within about `seconds` (one warm-up first)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    # A generator of its own: the measurement runs before the model is built and must not move the seeded
    # global RNG (the initial weights would depend on whether --peak-tflops was given).
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2 * n ** 3 / dt / 1e12)
        if time.perf_counter() > deadline:
            return best


def detect_peak_tflops(device=None, bf16: bool = True, seconds: float = 1.0) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it comes from) for the MFU denominator."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, bf16)
        if peak is not None:
            return peak, f"{name} datasheet, dense {'bf16' if bf16 else 'tf32'}"
        dtype = torch.bfloat16 if bf16 else torch.float32
        return (measure_matmul_tflops(device, dtype, seconds),
                f"{name} not in the table: measured {'bf16' if bf16 else 'fp32'} matmul")
    if device.type != "cpu":  # meta (placement checks): nothing to measure
        return float("nan"), f"no peak on {device.type}"
    return (measure_matmul_tflops(device, torch.float32, seconds),
            f"CPU: measured fp32 matmul, {torch.get_num_threads()} threads")


__all__ = ["GPU_PEAKS", "table_peak", "measure_matmul_tflops", "detect_peak_tflops"]
