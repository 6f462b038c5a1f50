"""Conversion cost against its I/O floor (tools/bench_convert.py), and random HF checkpoints of any size.

The floor reads every tensor of the HF directory (safetensors, one at a time) and writes the same tensors
back (streamed, fsynced): the bytes any conversion must move. `hf-to-mcore` and `mcore-to-hf` run
interleaved with it, each case in a child process (a torchrun group for TP x PP > 1) that times only its
work (not interpreter start and imports) and reports its peak RSS above the RSS it had just before (the
kernel's high-water mark, reset with /proc/self/clear_refs). The memory bound of a conversion is one
(TP rank, PP stage) shard of the weights plus one input shard file.

Random checkpoints are written shard by shard, every tensor from a seed of its own (`tensor_seed`), so
a round trip can be checked against regenerated tensors after the original is deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from typing import Callable

import torch

from ..models.config import AdapterConfig, LLMConfig, QwenVLConfig, ViTConfig, qwen_vl_7b
from .hf_checkpoint import DTYPES, HFCheckpointReader, HFShardWriter, finalize_hf_dir
from .hf_layout import hf_key_shapes, hf_keys

CASES = ("floor", "hf_to_mcore", "mcore_to_hf")


# ------------------------------------------------------------------------------------ random checkpoints
def scaled_config(params: float) -> QwenVLConfig:
    """A Qwen-VL-shaped config (8 LLM layers, 8 ViT layers, widths in the release's ratios) with about
    `params` parameters."""
    def make(h: int) -> QwenVLConfig:
        w = max(64, (h * 13 // 32) // 64 * 64)  # ViT width / LLM width = 1664 / 4096
        vocab = 16384 if h >= 512 else 2048
        return QwenVLConfig(
            llm=LLMConfig(num_layers=8, hidden_size=h, num_attention_heads=h // 64, kv_channels=64,
                          ffn_hidden_size=(h * 43 // 16) // 64 * 64, vocab_size=vocab,
                          max_position_embeddings=512, seq_length=128),
            vit=ViTConfig(width=w, num_layers=8, num_heads=w // 64, mlp_ratio=4.0, image_size=112, pos_grid=8),
            adapter=AdapterConfig(num_queries=16, num_heads=h // 64), image_start_id=vocab - 384).validate()

    best = min(range(64, 8192 + 1, 64), key=lambda h: abs(count_params(make(h)) - params))
    return make(best)


def layout_config(layout: str, params: float) -> QwenVLConfig:
    if layout == "qwen-vl-7b":
        return qwen_vl_7b()
    if layout == "scaled":
        return scaled_config(params)
    raise ValueError(f"unknown --layout {layout!r}: scaled or qwen-vl-7b")


def count_params(cfg: QwenVLConfig) -> int:
    total = 0
    for shape, _ in hf_key_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def tensor_seed(key: str, seed: int) -> int:
    return zlib.crc32(key.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The tensor `write_random_hf` stores under `key` (regenerated for comparisons)."""
    g = torch.Generator(device="cpu").manual_seed(tensor_seed(key, seed))
    return (torch.randn(shape, generator=g, dtype=torch.float32, device="cpu") * 0.02).to(dtype)


def write_random_hf(out_dir: str, cfg: QwenVLConfig, dtype: torch.dtype, seed: int = 0,
                    max_shard_bytes: int = 2 * 2 ** 30, progress: Callable | None = None) -> dict:
    """An HF Qwen-VL directory of random tensors, generated and written one tensor at a time."""
    shapes = hf_key_shapes(cfg)
    keys = hf_keys(cfg)
    writer = HFShardWriter(out_dir, [(k, shapes[k][0], dtype) for k in keys], 0, max_shard_bytes)
    for n, k in enumerate(keys, 1):
        writer.add(k, random_tensor(k, shapes[k][0], dtype, seed))
        if progress and (n % 50 == 0 or n == len(keys)):
            progress(n, len(keys), f"tensors, {writer.bytes_written / 2 ** 30:.2f} GB written")
    writer.flush()
    return finalize_hf_dir(out_dir, cfg, dtype)


def differences(hf_dir: str, want: Callable[[str], torch.Tensor], keys: list[str]) -> list[str]:
    """Keys of `hf_dir` whose tensor is not bit for bit `want(key)` (or missing / extra), one at a time."""
    reader = HFCheckpointReader(hf_dir)
    bad = sorted(set(reader.keys()) ^ set(keys))
    for k in sorted(set(reader.keys()) & set(keys), key=lambda k: (reader.weight_map[k], k)):
        got, ref = reader.get(k), want(k)
        if got.dtype != ref.dtype or got.shape != ref.shape or not torch.equal(
                got.reshape(-1).view(torch.uint8), ref.contiguous().reshape(-1).view(torch.uint8)):
            bad.append(k)
    reader.close()
    return bad


# ----------------------------------------------------------------------------------------- the floor
def io_floor(hf_dir: str, out_dir: str, max_shard_bytes: int = 2 * 2 ** 30) -> int:
    """Read every tensor of `hf_dir` and write it again (streamed, fsynced); returns the bytes moved."""
    reader = HFCheckpointReader(hf_dir)
    keys = sorted(reader.keys(), key=lambda k: (reader.weight_map[k], k))
    from safetensors import safe_open
    specs = []
    for path in sorted(set(reader.weight_map.values())):
        with safe_open(path, framework="pt") as f:
            specs += [(k, tuple(f.get_slice(k).get_shape()), None) for k in f.keys()]
    order = {k: i for i, k in enumerate(keys)}
    specs.sort(key=lambda s: order[s[0]])
    writer = None
    for k in keys:
        t = reader.get(k)
        if writer is None:  # every tensor of a checkpoint here has one dtype
            writer = HFShardWriter(out_dir, [(key, shape, t.dtype) for key, shape, _ in specs], 0, max_shard_bytes)
        writer.add(k, t)
    writer.flush()
    reader.close()
    return writer.bytes_written


# ------------------------------------------------------------------------------------ child processes
def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_main(argv: list[str]) -> None:
    """One timed case on this rank: `case src dst report_dir tp pp dtype`."""
    case, src, dst, report, tp, pp, dtype = argv
    tp, pp = int(tp), int(pp)
    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401 - what the save and load import lazily belongs to
    from megatron.core.dist_checkpointing.strategies import torch as _  # noqa: F401 - the start, not the work

    from . import conversion
    from ..runtime import initialize
    from ..training import checkpoint  # noqa: F401

    if case != "floor":
        initialize(tp, pp)
        dist.barrier()
    reset = _reset_peak()
    base = _status()
    t0 = time.perf_counter()
    if case == "floor":
        io_floor(src, dst)
    elif case == "hf_to_mcore":
        conversion.hf_to_mcore(src, dst, dtype)
    else:
        conversion.mcore_to_hf(src, dst)
    wall = time.perf_counter() - t0
    import resource
    end = _status()
    peak = end["VmHWM"] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stage = _stage_bytes(src, dtype) if case != "floor" else 0  # counted after the peak was read
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(report, f"rank{rank}.json"), "w") as f:
        json.dump({"wall_s": wall, "peak_rss": peak, "base_rss": base["VmRSS"], "peak_reset": reset,
                   "stage_bytes": stage}, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _stage_bytes(src: str, dtype: str) -> int:
    """Bytes of this rank's (TP rank, PP stage) shard of the model converted from `src` (an HF directory
    or a Megatron checkpoint)."""
    from .conversion import build_stage, checkpoint_dtype
    from .hf_checkpoint import read_hf_config
    if os.path.isfile(os.path.join(src, "config.json")):
        cfg, tdtype = read_hf_config(src)[1], DTYPES[dtype]
    else:
        from ..training.checkpoint import read_model_config, resolve_checkpoint_dir
        cfg, tdtype = read_model_config(src), checkpoint_dtype(resolve_checkpoint_dir(src))
    model = build_stage(cfg, tdtype, init=False)
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if isinstance(t, torch.Tensor) and not k.endswith("_extra_state"))


def run_case(case: str, src: str, dst: str, work: str, tp: int = 1, pp: int = 1, dtype: str = "fp32",
             timeout: float = 3600) -> dict:
    """Run one case in a child (torchrun for TP x PP > 1): {"wall_s": slowest rank's work time,
    "peak_rss_delta": largest rank's peak RSS above its start, "peak_rss": largest absolute peak}."""
    report = os.path.join(work, "report")
    shutil.rmtree(report, ignore_errors=True)
    os.makedirs(report)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    nproc = 1 if case == "floor" else tp * pp
    args = [case, src, dst, report, str(tp), str(pp), dtype]
    mod = ["-m", "qwenvl_megatron.convert.benchmark", "child"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *mod, *args]
           if nproc > 1 else [sys.executable, *mod, *args])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_root(), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{case} failed ({run.returncode}): {run.stderr[-4000:]}")
    ranks = []
    for name in sorted(os.listdir(report)):
        with open(os.path.join(report, name)) as f:
            ranks.append(json.load(f))
    return {"wall_s": max(r["wall_s"] for r in ranks),
            "peak_rss_delta": max(r["peak_rss"] - r["base_rss"] for r in ranks),
            "peak_rss": max(r["peak_rss"] for r in ranks), "ranks": len(ranks),
            "stage_bytes": max(r["stage_bytes"] for r in ranks),
            "rank_deltas": [r["peak_rss"] - r["base_rss"] for r in ranks],
            "rank_stage_bytes": [r["stage_bytes"] for r in ranks]}


def bound_ratio(case: dict, input_shard: int) -> float:
    """max over ranks of peak RSS above start / (its stage shard + one input shard)."""
    return max(d / (s + input_shard) for d, s in zip(case["rank_deltas"], case["rank_stage_bytes"]))


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------ bounds
def _file_sizes(paths) -> list[int]:
    return [os.path.getsize(p) for p in paths]


def input_shard_bytes(path: str) -> int:
    """The largest weights file of an HF directory or of a dist-checkpoint (`__*.distcp`)."""
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return max(_file_sizes(set(HFCheckpointReader(path).weight_map.values())))
    from ..training.checkpoint import resolve_checkpoint_dir
    ckpt = resolve_checkpoint_dir(path)
    return max(_file_sizes(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".distcp")))


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ------------------------------------------------------------------------------------------- bench
def run_bench(work: str, params: float = 6e7, layout: str = "scaled", dtype: str = "fp32", tp: int = 1,
              pp: int = 1, repeats: int = 3, max_shard_bytes: int = 64 * 2 ** 20, seed: int = 0,
              warmup: int = 1, log: Callable[[str], None] = print) -> dict:
    """Synthetic checkpoint -> floor, hf-to-mcore and mcore-to-hf interleaved (order rotated per repeat)
    -> medians, spreads, ratios and the round-trip check."""
    from ..runtime import bench
    cfg = layout_config(layout, params)
    tdtype = DTYPES[dtype]
    hf, mcore, back, floor_out = (os.path.join(work, n) for n in ("hf", "mcore", "hf_back", "floor"))
    shutil.rmtree(hf, ignore_errors=True)
    t0 = time.perf_counter()
    write_random_hf(hf, cfg, tdtype, seed, max_shard_bytes)
    weights = dir_bytes(hf)
    log(f"[bench_convert] {count_params(cfg) / 1e6:.1f}M parameters, {weights / 2 ** 20:.0f} MiB {dtype} written "
        f"in {time.perf_counter() - t0:.1f}s")
    run = {"floor": lambda: run_case("floor", hf, floor_out, work),
           "hf_to_mcore": lambda: run_case("hf_to_mcore", hf, mcore, work, tp, pp, dtype),
           "mcore_to_hf": lambda: run_case("mcore_to_hf", mcore, back, work, tp, pp, dtype)}
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    for _ in range(warmup):  # page cache; the first repeat's order makes the checkpoint mcore-to-hf reads
        for c in CASES:
            run[c]()
    for r in range(repeats):
        order = CASES[r % 3:] + CASES[:r % 3]
        for c in order:
            runs[c].append(run[c]())
            log(f"[bench_convert] repeat {r + 1}/{repeats} {c}: {runs[c][-1]['wall_s']:.2f}s, peak RSS "
                f"+{runs[c][-1]['peak_rss_delta'] / 2 ** 20:.0f} MiB")
    mismatched = differences(back, lambda k: random_tensor(k, hf_key_shapes(cfg)[k][0], tdtype, seed), hf_keys(cfg))
    inputs = {"hf_to_mcore": input_shard_bytes(hf), "mcore_to_hf": input_shard_bytes(mcore)}
    result = {"env": bench.environment(), "params": count_params(cfg), "layout": layout, "dtype": dtype,
              "tp": tp, "pp": pp, "repeats": repeats, "weights_bytes": weights,
              "stage_shard_bytes": runs["hf_to_mcore"][0]["stage_bytes"],
              "input_shard_bytes": {"hf": inputs["hf_to_mcore"], "mcore": inputs["mcore_to_hf"]},
              "round_trip_bit_exact": not mismatched, "round_trip_mismatches": mismatched[:10], "cases": {}}
    floor_wall = statistics.median(x["wall_s"] for x in runs["floor"])
    floor_peak = statistics.median(x["peak_rss_delta"] for x in runs["floor"])
    for c in CASES:
        walls = [x["wall_s"] for x in runs[c]]
        peaks = [x["peak_rss_delta"] for x in runs[c]]
        result["cases"][c] = {"wall_s": bench.summary(walls), "peak_rss_delta_bytes": bench.summary(peaks),
                              "peak_rss_bytes": max(x["peak_rss"] for x in runs[c]),
                              "gb_per_s": weights / statistics.median(walls) / 1e9}
        if c != "floor":
            result[f"{c}_wall_ratio"] = statistics.median(walls) / floor_wall
            result[f"{c}_peak_rss_ratio"] = statistics.median(peaks) / weights
            result[f"{c}_peak_rss_bound_bytes"] = runs[c][0]["stage_bytes"] + inputs[c]
            result[f"{c}_peak_rss_bound_ratio"] = statistics.median(bound_ratio(x, inputs[c]) for x in runs[c])
    result["floor_peak_rss_ratio"] = floor_peak / weights
    return result


def chart(json_path: str, result: dict) -> str:
    """Per case: wall time (s) against peak RSS above start (MiB), one point per repeat."""
    from ..runtime import bench
    series = {}
    for c in CASES:
        info = result["cases"][c]
        series[c] = [(info["peak_rss_delta_bytes"]["median"] / 2 ** 20, info["wall_s"]["median"]),
                     (info["peak_rss_delta_bytes"]["min"] / 2 ** 20, info["wall_s"]["min"]),
                     (info["peak_rss_delta_bytes"]["max"] / 2 ** 20, info["wall_s"]["max"])]
    bound = max(result["hf_to_mcore_peak_rss_bound_bytes"], result["mcore_to_hf_peak_rss_bound_bytes"]) / 2 ** 20
    top = max(y for s in series.values() for _, y in s)
    series["~stage + input shard"] = [(bound, 0.0), (bound, top)]
    series["~1.5x floor"] = [(0.0, 1.5 * result["cases"]["floor"]["wall_s"]["median"]),
                            (bound, 1.5 * result["cases"]["floor"]["wall_s"]["median"])]
    return bench.chart(bench.png_path(json_path), series, lines=False,
                       title=f"conversion vs I/O floor: {result['params'] / 1e6:.0f}M params {result['dtype']} "
                             f"TP{result['tp']} PP{result['pp']}",
                       xlabel="peak RSS above start (MiB)", ylabel="wall time (s)")


# ------------------------------------------------------------------------------------------- proof
class MemorySampler:
    """Samples, every `every` s, the summed RSS of the benchmark's child processes and the machine's
    MemAvailable (a thread of the parent); `peak_children` and `min_available` in bytes."""

    def __init__(self, every: float = 0.5):
        import threading
        self.every, self.peak_children, self.min_available = every, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            total = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"qwenvl_megatron.convert.benchmark\0child" not in f.read():
                            continue
                    with open(f"/proc/{pid}/status") as f:
                        total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
                except (OSError, StopIteration):
                    continue
            self.peak_children = max(self.peak_children, total)
            with open("/proc/meminfo") as f:
                avail = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:")) * 1024
            self.min_available = avail if self.min_available is None else min(self.min_available, avail)


def run_proof(work: str, layout: str = "qwen-vl-7b", params: float = 9.6e9, dtype: str = "bf16", tp: int = 2,
              pp: int = 2, max_shard_bytes: int = 2 * 2 ** 30, seed: int = 0,
              log: Callable[[str], None] = print) -> dict:
    """Write a random checkpoint shard by shard, convert it to TP x PP, delete it, convert back and compare
    every tensor with the one regenerated from its seed (so at most two copies are ever on disk)."""
    from ..runtime import bench
    cfg = layout_config(layout, params)
    tdtype = DTYPES[dtype]
    hf, mcore, back = (os.path.join(work, n) for n in ("hf", "mcore", "hf_back"))
    for d in (hf, mcore, back):
        shutil.rmtree(d, ignore_errors=True)
    with open("/proc/meminfo") as f:
        mem = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}
    result = {"env": bench.environment(), "layout": layout, "params": count_params(cfg), "dtype": dtype, "tp": tp,
              "pp": pp, "mem_total": mem["MemTotal"], "mem_available_at_start": mem["MemAvailable"]}
    show = lambda done, total, what: log(f"[proof] write {done}/{total} {what}")
    t0 = time.perf_counter()
    write_random_hf(hf, cfg, tdtype, seed, max_shard_bytes, show)
    result["write_s"] = time.perf_counter() - t0
    result["hf_bytes"] = dir_bytes(hf)
    result["input_shard_bytes"] = input_shard_bytes(hf)
    log(f"[proof] {result['params'] / 1e9:.2f}B parameters, {result['hf_bytes'] / 1e9:.1f} GB written in "
        f"{result['write_s']:.0f}s")
    for case, src, dst in (("hf_to_mcore", hf, mcore), ("mcore_to_hf", mcore, back)):
        t0 = time.perf_counter()
        with MemorySampler() as mem_sampler:
            info = run_case(case, src, dst, work, tp, pp, dtype, timeout=6 * 3600)
        info["process_s"] = time.perf_counter() - t0
        info["children_rss_peak_sampled"] = mem_sampler.peak_children
        info["mem_available_min"] = mem_sampler.min_available
        info["input_shard_bytes"] = input_shard_bytes(src)
        info["output_bytes"] = dir_bytes(dst)
        result[case] = info
        log(f"[proof] {case}: {info['wall_s']:.0f}s of work ({info['process_s']:.0f}s with start-up), peak RSS "
            f"per rank +{max(info['rank_deltas']) / 2 ** 30:.2f} GiB (stage {max(info['rank_stage_bytes']) / 2 ** 30:.2f} "
            f"GiB), all ranks together <= {mem_sampler.peak_children / 2 ** 30:.2f} GiB sampled")
        if case == "hf_to_mcore":
            shutil.rmtree(hf)  # the disk holds at most two copies: the original is regenerated to compare
    t0 = time.perf_counter()
    shapes = hf_key_shapes(cfg)
    bad = differences(back, lambda k: random_tensor(k, shapes[k][0], tdtype, seed), hf_keys(cfg))
    result["compare_s"] = time.perf_counter() - t0
    result["round_trip_bit_exact"] = not bad
    result["round_trip_mismatches"] = bad[:10]
    log(f"[proof] round trip bit-exact: {not bad} ({len(bad)} tensors differ), compared in {result['compare_s']:.0f}s")
    return result


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    child_main(sys.argv[2:])
