"""tests/gpu/ (issue #9's GPU acceptance) on this GPU-less machine: run.sh claims nothing without a GPU, and
`checks.py --cpu-smoke` runs every check's code on the CPU (tiny sizes, CPU stand-ins), so that the script
works the first time a GPU machine runs it."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ["te_vs_local_logits", "te_packed_thd", "bf16_step_tiny", "bf16_step_small", "stage_scripts", "dali_vs_pillow", "multi_gpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def test_run_sh_without_a_gpu_says_so_and_claims_nothing(tmp_path):
    report = tmp_path / "gpu_report.json"
    proc = subprocess.run(["bash", os.path.join(ROOT, "tests", "gpu", "run.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=dict(ENV, CUDA_VISIBLE_DEVICES="", GPU_REPORT=str(report)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("no NVIDIA GPU found") and len(proc.stdout.splitlines()) == 1
    assert not report.exists() and not (tmp_path / "gpu_report.json").exists()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    report = tmp_path_factory.mktemp("gpu_smoke") / "report.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu", "checks.py"), "--cpu-smoke",
                           "--report", str(report)], capture_output=True, text=True, timeout=900, env=ENV)
    doc = json.loads(report.read_text()) if report.exists() else {}
    return proc, doc


def test_cpu_smoke_runs_every_check_without_a_failure(smoke):
    proc, doc = smoke
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines] == CHECKS, proc.stdout + proc.stderr
    failed = {name: c.get("reason", "") + "\n" + c.get("log_tail", "") for name, c in doc["checks"].items()
              if c["status"] not in ("PASS", "SKIP")}
    assert not failed, failed
    assert all(line.split()[0] in ("PASS", "SKIP") for line in lines) and proc.returncode == 0
    assert doc["mode"] == "cpu-smoke" and doc["versions"]["torch"] and list(doc["checks"]) == CHECKS


def test_cpu_smoke_records_the_numbers(smoke):
    checks = smoke[1]["checks"]
    n = {name: c["numbers"] for name, c in checks.items()}
    # No Transformer Engine on a CPU: the code runs local vs local, and says it proved nothing about TE.
    assert checks["te_vs_local_logits"]["status"] == "SKIP"
    assert n["te_vs_local_logits"]["fp32_max_diff"] == 0 == n["te_vs_local_logits"]["bf16_max_diff"]
    assert n["te_vs_local_logits"]["fp32_max_abs_logit"] > 0
    # Packed per-sample attention: the local mask path is checked for real; TE's THD path only on a GPU.
    assert checks["te_packed_thd"]["status"] == "SKIP" and "te_max_diff" not in n["te_packed_thd"]
    assert n["te_packed_thd"]["local_max_diff"] <= 1e-4 < n["te_packed_thd"]["local_max_abs_logit"]
    for name in ("bf16_step_tiny", "bf16_step_small"):
        assert checks[name]["status"] == "PASS"
        assert n[name]["steps"] == 3 and n[name]["misplaced"] == 0 and n[name]["max_rel_loss_diff"] <= 0.01
        assert n[name]["fp32_estimate_gib"] > 0 and "fp32_peak_gib" not in n[name]  # peak memory only on CUDA
    assert n["bf16_step_small"]["fp32_estimate_gib"] > n["bf16_step_tiny"]["fp32_estimate_gib"]
    stages = n["stage_scripts"]
    assert checks["stage_scripts"]["status"] == "PASS" and stages["chain_ok"]
    assert all(stages[f"stage{s}_loss"] > 0 for s in (1, 2, 3)) and "gen_tokens" in stages
    assert stages["stage2_loaded"].startswith(os.path.join(stages["work_dir"], "checkpoints", "stage1"))
    dali = n["dali_vs_pillow"]
    if checks["dali_vs_pillow"]["status"] == "PASS":  # DALI's CPU pipeline here
        assert dali["dali_device"] == "cpu" and dali["images"] == 3
        assert dali["448_mean_abs_diff"] < 0.3 and dali["448_within_1_level"] >= 0.99
    multi = n["multi_gpu"]
    assert checks["multi_gpu"]["status"] == "PASS" and multi["world"] == 2 and multi["backend"] == "gloo"
    assert multi["tp2_logits_max_diff"] <= 1e-4 and multi["pp2_logits_max_diff"] <= 1e-4
    assert multi["sp"].startswith("stand-in") and multi["sp_grad_max_abs"] > 0
