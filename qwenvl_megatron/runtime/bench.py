"""What every benchmark shares: the machine and versions it ran on, interleaved timing, JSON + PNG output.

Machines here are shared and noisy, so cases are never timed one after another: each repeat runs every
case once, in an order that rotates from repeat to repeat (A B C, B C A, ...), and the figures are the
median with min and max over the repeats.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from . import png


def environment(device: torch.device | None = None) -> dict:
    """Device, versions and date of this run."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "device_type": device.type,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import megatron.core
        out["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001
        out["megatron_core"] = None
    try:
        import transformer_engine
        out["transformer_engine"] = transformer_engine.__version__
    except Exception:  # noqa: BLE001
        out["transformer_engine"] = None
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            pass
    else:
        out["device"] = _cpu_model()
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def interleaved(cases: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                warmup: int = 1, cpu_times: dict | None = None) -> dict[str, list[float]]:
    """{name: [seconds per repeat]}: every case once per repeat, the order rotated each repeat.

    `cpu_times`, when given, receives {name: [CPU seconds of this process per repeat]}: on a shared machine
    a single-threaded CPU case's CPU time hardly depends on what else runs, its wall time does."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu_times is not None:
        cpu_times.update({n: [] for n in names})
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            c0 = time.process_time()
            times[name].append(timed(cases[name], device))
            if cpu_times is not None:
                cpu_times[name].append(time.process_time() - c0)
    return times


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)


def png_path(json_path: str, suffix: str = "") -> str:
    """The chart beside a JSON file: OUT.json -> OUT.png (OUT_suffix.png)."""
    base = json_path[:-5] if json_path.endswith(".json") else json_path
    return f"{base}{'_' + suffix if suffix else ''}.png"


def chart(path: str, series: dict, **kwargs) -> str:
    """A line/point chart (runtime.png, no plotting package needed); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    png.line_chart(path, series, **kwargs)
    return path


__all__ = ["environment", "timed", "sync", "summary", "interleaved", "write_json", "png_path", "chart"]
