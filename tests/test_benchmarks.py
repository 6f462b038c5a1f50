"""The benchmarks' logic (issue 11): each runs in --smoke mode and writes its JSON keys and PNG charts; the
bus-bandwidth factors and the 1F1B bubble formula. Never timings: those are figures, not tests."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run(tool, out, *extra, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--smoke", "--json", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for chart in result["charts"]:
        with open(chart, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", chart
        assert os.path.dirname(chart) == str(out.parent)
    env = result["environment"]
    assert {"device", "torch", "megatron_core", "transformer_engine", "date", "threads"} <= set(env)
    return result


def test_bench_kernels_smoke(tmp_path):
    r = _run("bench_kernels.py", tmp_path / "kernels.json")
    assert {"attention", "ops", "gemm", "dtype", "repeats", "command"} <= set(r)
    impls = {(a["case"], a["impl"]) for a in r["attention"]}
    assert {("llm_s64", "sdpa"), ("llm_s64", "eager"), ("adapter_k64", "sdpa")} <= impls
    for a in r["attention"]:
        if "skipped" not in a:
            assert {"fwd_s", "bwd_s", "fwd_tflops", "bwd_tflops"} <= set(a) and a["fwd_s"]["n"] == r["repeats"]
    assert {o["op"] for o in r["ops"]} == {"rmsnorm", "layernorm", "swiglu", "rope", "cross_entropy"}
    assert "megatron_vocab_parallel" in {o["impl"] for o in r["ops"] if o["op"] == "cross_entropy"}
    assert all({"fwd_gbps", "bwd_gbps"} <= set(o) for o in r["ops"] if "skipped" not in o)
    g = r["gemm"]
    assert g["peak_tflops"] > 0 and g["bandwidth_gbps"] > 0
    assert all({"M", "N", "K", "intensity", "tflops", "roof_tflops"} <= set(x) for x in g["gemms"])


def test_bench_image_decode_smoke(tmp_path):
    r = _run("bench_image_decode.py", tmp_path / "decode.json")
    assert "pil-cpu" in r["images_per_s"] and r["images_per_s"]["pil-cpu"]["n"] == 2
    assert r["images_per_s"]["pil-cpu"]["median"] > 0
    assert set(r["images_per_s"]) | set(r["skipped"]) == {"pil-cpu", "dali-cpu", "dali-cuda"}


def test_bench_sampler_writes_json_and_png(tmp_path):
    out = tmp_path / "sampler.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_sampler.py"), "--samples", "100000",
                           "--datasets-sizes", "50000", "--dp-size", "2", "--measure-samples", "2000",
                           "--random-lookups", "100", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [row["rank"] for row in r["ranks"]] == [0, 1] and all(row["lookup_range_per_s"] > 0 for row in r["ranks"])
    with open(r["charts"][0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_gpu_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "bench_gpu.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", BENCH_OUT=str(tmp_path / "o")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("no NVIDIA GPU found") and len(proc.stdout.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bench_gpu_runs_each_benchmark_and_reports_a_failure(tmp_path):
    """With two (stand-in) GPUs: every benchmark once, the bubble and collectives too; a failing one is a
    FAIL line and exit 1. The stand-in interpreter records its calls instead of running them."""
    (tmp_path / "nvidia-smi").write_text('#!/bin/bash\necho "GPU 0: A"\necho "GPU 1: B"\n')
    (tmp_path / "py").write_text(f'#!/bin/bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
                                 f'echo "$@" >> {tmp_path}/calls\n[[ "$1" != *bench_comm* ]]\n')
    for f in ("nvidia-smi", "py"):
        os.chmod(tmp_path / f, 0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", PYTHON=str(tmp_path / "py"),
               BENCH_OUT=str(tmp_path / "o"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "bench_gpu.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [line.split()[:2] for line in proc.stdout.splitlines()] == [
        ["OK", "kernels"], ["OK", "step"], ["OK", "image_decode"], ["FAIL", "comm"], ["OK", "bubble"]]
    calls = [c for c in (tmp_path / "calls").read_text().splitlines() if c.startswith("tools/")]  # not the set-up
    assert calls[0].startswith("tools/bench_kernels.py --paper-shapes --json ")
    assert "tools/bench_comm.py --nproc 2 --json" in calls[3] and "--configs --pp 2 --json" in calls[4]


def test_attention_and_gemm_shapes_are_the_models():
    from qwenvl_megatron.models.kernel_bench import attention_cases, attention_flops, gemm_shapes
    paper = {c["name"]: c for c in attention_cases(paper=True)}
    assert (paper["llm_s2048"]["heads"], paper["llm_s2048"]["dim"], paper["llm_s2048"]["causal"]) == (32, 128, True)
    assert (paper["vit_s1024"]["heads"], paper["vit_s1024"]["dim"], paper["vit_s1024"]["causal"]) == (16, 104, False)
    assert (paper["adapter_k1024"]["sq"], paper["adapter_k1024"]["sk"]) == (256, 1024)
    fwd, bwd = attention_flops(paper["llm_s512"])
    assert fwd == 4 * 32 * 512 * 512 * 128 / 2 and bwd == 2 * fwd
    head = {g["name"]: g for g in gemm_shapes(paper=True)}["lm_head"]
    assert (head["N"], head["K"]) == (152576, 4096)  # 151936 ids padded to a multiple of 1024


def test_bench_comm_smoke(tmp_path):
    r = _run("bench_comm.py", tmp_path / "comm.json", "--nproc", "2")
    assert r["backend"] == "gloo" and r["world_size"] == 2
    assert set(r["results"]) | set(r["skipped"]) == {"all_reduce", "all_gather", "reduce_scatter", "send_recv"}
    assert {"all_reduce", "send_recv"} <= set(r["results"])
    for op, rows in r["results"].items():
        for row in rows:
            assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * r["bus_factor"][op])
            assert row["algbw_gbps"] == pytest.approx(row["bytes"] / (row["time_us"]["median"] * 1e-6) / 1e9)


def test_bus_factors_follow_nccl_tests():
    from qwenvl_megatron.runtime.comm_bench import bus_factor
    assert bus_factor("all_reduce", 8) == 2 * 7 / 8
    assert bus_factor("all_gather", 8) == bus_factor("reduce_scatter", 8) == 7 / 8
    assert bus_factor("send_recv", 8) == 1.0


def test_bench_step_smoke(tmp_path):
    r = _run("bench_step.py", tmp_path / "step.json")
    ph = r["phases"]["smoke"]
    assert {"data_wait", "forward", "backward", "grad_reduction", "optimizer", "step"} <= set(ph["phases_s"])
    assert ph["checkpoint_s"]["n"] == 2 and ph["checkpoint_bytes"] > 0
    assert sum(ph["share_of_step"].values()) == pytest.approx(1.0, abs=0.2)
    (pp2,) = r["bubble"]
    assert pp2["pp"] == 2 and len(pp2["stages"]) == 2 and pp2["bubble_formula"] == pytest.approx(1 / 5)
    assert 0 <= pp2["bubble_measured"] < 1


def test_bubble_formula():
    from qwenvl_megatron.training.step_bench import bubble_formula
    assert bubble_formula(1, 8) == 0
    assert bubble_formula(2, 8) == pytest.approx(1 / 9)
    assert bubble_formula(4, 8) == pytest.approx(3 / 11)
    assert bubble_formula(4, 1) == pytest.approx(3 / 4)


def test_peak_table_and_cpu_measurement():
    from qwenvl_megatron.runtime.peak import detect_peak_tflops, table_peak
    assert table_peak("NVIDIA H100 80GB HBM3") == table_peak("NVIDIA H200") == 989.0
    assert table_peak("NVIDIA H100 PCIe") == 756.0 and table_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert table_peak("NVIDIA A100-SXM4-80GB", bf16=False) == 156.0 and table_peak("Some GPU") is None
    peak, source = detect_peak_tflops("cpu", seconds=0.05)
    assert peak > 0 and "measured" in source


def test_measuring_the_peak_leaves_the_seeded_rng_alone():
    """The trainer measures a CPU's peak before building the model: the initial weights must not depend on it."""
    import torch
    from qwenvl_megatron.runtime.peak import measure_matmul_tflops
    torch.manual_seed(7)
    state = torch.get_rng_state()
    assert measure_matmul_tflops(seconds=0.05, n=64) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_bench_step_vs_reference_smoke(tmp_path):
    r = _run("bench_step.py", tmp_path / "vs.json", "--vs-reference")
    s = r["smoke"]
    assert s["step_s"]["n"] == s["reference_step_s"]["n"] == 2
    assert s["step_time_ratio"] == pytest.approx(s["step_s"]["median"] / s["reference_step_s"]["median"])
    assert s["paired_ratio"]["min"] <= s["paired_ratio"]["median"] <= s["paired_ratio"]["max"]
    d = s["decode"]
    assert d["cache_equals_recompute"] is True
    assert set(d["generate_s"]) == {"cache", "recompute", "reference_recompute"}
    assert d["speedup_vs_recompute"] == pytest.approx(d["generate_s"]["recompute"]["median"]
                                                      / d["generate_s"]["cache"]["median"])
