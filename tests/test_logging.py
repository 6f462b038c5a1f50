"""Training scalars reach Weights & Biases as they reach TensorBoard (Megatron-LM's --wandb-* flags).

The trainer runs in its own process under device discipline (tests/workers/disciplined_train.py); `wandb` is
optional: without it --wandb-project is a one-line error before the model is built, with a test double on
the path (tests/fake_wandb) the logged scalars and steps must equal the TensorBoard event files'.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ARGV = ["--model", "tiny", "--mock-data", "--image-size", "56", "--seq-length", "48", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "1", "--train-iters", "3",
        "--log-interval", "2"]


def _env(*paths, **extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join([*paths, ROOT]), **extra)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_flag_without_wandb_is_a_one_line_error_at_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qwenvl_megatron.training.train", *ARGV, "--save", str(tmp_path),
                           "--wandb-project", "qwenvl"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "--wandb-project needs the `wandb` package, which is not installed: pip install wandb (or drop "
        "--wandb-project)"]
    assert "training " not in proc.stdout and not list(tmp_path.iterdir())  # nothing built, nothing saved


def _tensorboard_scalars(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(path))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_wandb_logs_the_tensorboard_scalars_at_the_same_steps(tmp_path):
    calls_file = tmp_path / "wandb_calls.jsonl"
    save, tb = tmp_path / "ckpt", tmp_path / "tb"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "workers", "disciplined_train.py"), *ARGV,
                           "--save", str(save), "--tensorboard-dir", str(tb), "--wandb-project", "qwenvl",
                           "--wandb-exp-name", "stage1-test"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env(os.path.join(HERE, "fake_wandb"), FAKE_WANDB_LOG=str(calls_file)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    calls = [json.loads(x) for x in calls_file.read_text().splitlines()]
    assert [c["call"] for c in calls] == ["init", "log", "log", "finish"]
    init = calls[0]
    assert init["project"] == "qwenvl" and init["name"] == "stage1-test" and init["dir"] == str(save / "wandb")
    assert init["config"]["wandb_project"] == "qwenvl" and init["config"]["train_iters"] == 3
    logged: dict = {}
    for c in calls[1:-1]:
        for tag, value in c["data"].items():
            logged.setdefault(tag, []).append((c["step"], value))
    board = _tensorboard_scalars(tb)
    assert sorted(logged) == sorted(board) == sorted(f"train/{n}" for n in (
        "loss", "lr", "grad_norm", "samples_per_s", "supervised_tokens_per_s", "padding_fraction",
        "tflops_per_gpu", "executed_tflops_per_gpu", "data_wait_fraction", "skipped"))
    for tag, points in board.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points] == [2, 3], tag  # log interval + last
        for (_, w), (_, t) in zip(logged[tag], points):
            assert math.isclose(w, t, rel_tol=1e-6, abs_tol=1e-12), (tag, w, t)  # TensorBoard stores float32
    # Issue 11: model and executed FLOPs, the data-wait share, and a measured CPU peak as the MFU denominator.
    line = next(x for x in proc.stdout.splitlines() if x.startswith("iter 2/3 "))
    assert re.search(r"TFLOP/s/GPU \| MFU [0-9.e+-]+% \| executed [0-9.e+-]+ TFLOP/s/GPU \(HFU [0-9.e+-]+%\) \| "
                     r"supervised [0-9,]+ tokens/s \| padding [0-9.]+% \| data wait [0-9.]+% \| skipped 0", line), line
    assert "MFU denominator: --peak-tflops" in proc.stdout and "(CPU: measured fp32 matmul" in proc.stdout
    assert 0 <= logged["train/data_wait_fraction"][0][1] < 1
    assert 0 < logged["train/executed_tflops_per_gpu"][0][1] < logged["train/tflops_per_gpu"][0][1] * 1.5
    history = json.loads(proc.stdout.strip().splitlines()[-1])["history"]
    assert [v for _, v in logged["train/loss"]] == pytest.approx([history[1][1], history[2][1]])
