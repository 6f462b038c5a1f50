"""Streaming conversion: memory bounded by one (TP rank, PP stage) shard + one input shard, and the
conversion benchmark (tools/bench_convert.py) in smoke mode.

Each conversion runs in a child process (qwenvl_megatron/convert/benchmark.run_case) that reports its peak
RSS above the RSS it had before converting (the kernel's high-water mark, reset just before). A converter
that builds a randomly initialised model and holds the HF dict, the mapped dict and the model at once
peaks near 2.5x the weights; the bound here is the weights of the stage + the largest input file + 48 MiB.
Neither direction ever fills a stage (the import makes each tensor when the checkpoint writer reaches it,
the export reads one tensor group at a time), so both stay under half of one (+ the slack), and above the
largest tensor (the measurement sees what is held).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from qwenvl_megatron.convert import benchmark
from qwenvl_megatron.convert.hf_checkpoint import DTYPES
from qwenvl_megatron.convert.hf_layout import hf_key_shapes, hf_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLACK = 48 * 2 ** 20

if not os.path.exists("/proc/self/clear_refs"):
    pytest.skip("peak RSS is reset through /proc/self/clear_refs (Linux)", allow_module_level=True)


@pytest.fixture(scope="module")
def hf200(tmp_path_factory):
    """A ~200 MB fp32 random checkpoint in 24 MiB shards."""
    w = tmp_path_factory.mktemp("stream")
    cfg = benchmark.scaled_config(5e7)
    benchmark.write_random_hf(str(w / "hf"), cfg, torch.float32, seed=3, max_shard_bytes=24 * 2 ** 20)
    return w, cfg


def test_hf_to_mcore_and_back_stay_within_one_shard_plus_one_input_shard(hf200):
    w, cfg = hf200
    weights = benchmark.dir_bytes(str(w / "hf"))
    assert weights > 150 * 2 ** 20
    there = benchmark.run_case("hf_to_mcore", str(w / "hf"), str(w / "m"), str(w))
    back = benchmark.run_case("mcore_to_hf", str(w / "m"), str(w / "back"), str(w))
    for case, src in ((there, w / "hf"), (back, w / "m")):
        bound = case["stage_bytes"] + benchmark.input_shard_bytes(str(src)) + SLACK
        assert case["stage_bytes"] > 0.95 * weights  # one rank holds the whole model
        assert case["peak_rss_delta"] <= bound, (case, bound)
    shapes = hf_key_shapes(cfg)
    largest = max(math.prod(shape) for shape, _ in shapes.values()) * 4
    for case in (there, back):
        assert largest < case["peak_rss_delta"] < 0.5 * case["stage_bytes"] + SLACK, (case, largest)
    bad = benchmark.differences(str(w / "back"), lambda k: benchmark.random_tensor(k, shapes[k][0], torch.float32, 3),
                                hf_keys(cfg))
    assert bad == []


def test_streamed_shards_are_plain_safetensors(tmp_path):
    """The streaming writer's files load with the safetensors library, tensor for tensor."""
    from safetensors.torch import load_file

    from qwenvl_megatron.convert.hf_checkpoint import HFShardWriter
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.randn(2, 2, 2, generator=g).half(), "d": torch.randn(40, generator=g)}
    w = HFShardWriter(str(tmp_path), [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], 0, max_shard_bytes=64)
    for k, t in tensors.items():
        w.add(k, t)
    w.flush()
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3  # a (60 B) + b (14 B) > 64 B: b starts the second file; d (160 B) alone
    got = {}
    for f in files:
        got.update(load_file(str(tmp_path / f)))
    assert sorted(got) == sorted(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_streamed_writer_refuses_what_was_not_announced(tmp_path):
    from qwenvl_megatron.convert.hf_checkpoint import HFCheckpointError, HFShardWriter
    w = HFShardWriter(str(tmp_path), [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    with pytest.raises(HFCheckpointError, match="expected a"):
        w.add("b", torch.zeros(2))
    w.add("a", torch.zeros(2))
    with pytest.raises(HFCheckpointError, match="expected b .* got b \\(3,\\)"):
        w.add("b", torch.zeros(3))
    with pytest.raises(HFCheckpointError, match="never added, e.g. b"):
        w.flush()


def test_bench_convert_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "tools/bench_convert.py", "--json", str(out), "--params", "3e6",
                          "--repeats", "1", "--warmup", "0", "--shard-mb", "2", "--work", str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("hf_to_mcore_wall_ratio", "mcore_to_hf_wall_ratio", "hf_to_mcore_peak_rss_ratio",
                "mcore_to_hf_peak_rss_ratio", "hf_to_mcore_peak_rss_bound_ratio", "mcore_to_hf_peak_rss_bound_ratio"):
        assert result[key] > 0, key
    assert result["round_trip_bit_exact"] is True and result["round_trip_mismatches"] == []
    for case in benchmark.CASES:
        assert result["cases"][case]["wall_s"]["n"] == 1
    assert 2e6 < result["params"] < 5e6
    # the round trip really happened: the export is there and is the regenerated checkpoint
    back = tmp_path / "w" / "hf_back"
    assert (back / "model.safetensors.index.json").is_file()
    cfg = benchmark.scaled_config(3e6)
    assert benchmark.differences(str(back), lambda k: benchmark.random_tensor(
        k, hf_key_shapes(cfg)[k][0], DTYPES["fp32"], 0), hf_keys(cfg)) == []
    from qwenvl_megatron.runtime.png import read_png
    assert read_png(str(tmp_path / "bench.png")) is not None


def test_a_changed_tensor_is_a_difference(tmp_path):
    """The round-trip check itself can fail."""
    cfg = benchmark.scaled_config(1e6)
    benchmark.write_random_hf(str(tmp_path / "hf"), cfg, torch.float32, seed=1)
    shapes = hf_key_shapes(cfg)
    want = lambda k: benchmark.random_tensor(k, shapes[k][0], torch.float32, 1)
    assert benchmark.differences(str(tmp_path / "hf"), want, hf_keys(cfg)) == []
    other = lambda k: benchmark.random_tensor(k, shapes[k][0], torch.float32, 2 if k == "lm_head.weight" else 1)
    assert benchmark.differences(str(tmp_path / "hf"), other, hf_keys(cfg)) == ["lm_head.weight"]
