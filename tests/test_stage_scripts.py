"""The cluster stage scripts (examples/*.sh) and the Slurm example, without a cluster.

Mode choice and launch command run against a stub interpreter ($PYTHON) that logs its arguments and
answers the GPU probe as told: no silent fallback to the demo, torchrun started once (by the script or
around it). One real run: `torchrun --nproc-per-node 2 --no-python examples/pretrain_stage1.sh` in demo
mode trains 2 iterations on 2 gloo ranks and saves (~15 s).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
STAGES = ("pretrain_stage1.sh", "pretrain_stage2.sh", "finetune_stage3.sh")
STUB = """#!/usr/bin/env bash
case "$*" in *torch.cuda.is_available*) exit "${FAKE_CUDA_RC:-1}";; esac
echo "$*" >> "$FAKE_LOG"
"""
TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "job", "LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4"}


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (
        "DATA_PATH", "QWENVL_DEMO", "GPUS_PER_NODE", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(extra)
    return env


def _stub_run(tmp_path, script="pretrain_stage1.sh", args=(), **env):
    """Run a stage script with the stub interpreter; returns (process, [logged interpreter calls])."""
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    full = _clean_env(PYTHON=str(stub), FAKE_LOG=str(log), DEMO_DIR=str(tmp_path / "demo"),
                      CKPT_ROOT=str(tmp_path / "ckpt"), **env)
    proc = subprocess.run(["bash", os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                          env=full, timeout=60)
    return proc, log.read_text().splitlines()


def test_scripts_parse():
    for name in ("common.sh", *STAGES):
        subprocess.run(["bash", "-n", os.path.join(EXAMPLES, name)], check=True)


@pytest.mark.parametrize("script", STAGES)
def test_demo_only_without_data_path_and_says_so_first(tmp_path, script):
    proc, calls = _stub_run(tmp_path, script, ["--train-iters", "3"])
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first == "demo mode: tiny model on the synthetic corpus, CPU/gloo (DATA_PATH unset)"
    launch = calls[-1].split()
    assert launch[:2] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in launch
    assert launch[launch.index("--nproc_per_node") + 1] == "2"  # the demo's 2 gloo processes, not 8 GPUs
    assert launch[launch.index("--data-path") + 1].startswith(str(tmp_path / "demo"))
    assert launch[-2:] == ["--train-iters", "3"]  # extra arguments reach the trainer last
    assert (tmp_path / "demo" / "ready").is_file()
    # QWENVL_DEMO=1 forces the demo even with DATA_PATH set (and a GPU), and names the reason.
    proc, calls = _stub_run(tmp_path, script, QWENVL_DEMO="1", DATA_PATH="/data/x", FAKE_CUDA_RC="0")
    assert proc.stdout.splitlines()[0].endswith("CPU/gloo (QWENVL_DEMO=1)")
    assert "/data/x" not in calls[-1]


@pytest.mark.parametrize("script", STAGES)
def test_data_path_without_a_gpu_is_an_error(tmp_path, script):
    proc, calls = _stub_run(tmp_path, script, DATA_PATH="0.5 /data/a 0.5 /data/b")
    assert proc.returncode != 0
    assert "DATA_PATH is set but" in proc.stderr and "no CUDA GPU" in proc.stderr
    assert "demo mode" not in proc.stdout and calls == [] and not (tmp_path / "demo").exists()
    proc, _ = _stub_run(tmp_path, script, QWENVL_DEMO="0")
    assert proc.returncode != 0 and "DATA_PATH is unset" in proc.stderr


def test_cluster_mode_launches_torchrun_with_the_data(tmp_path):
    proc, calls = _stub_run(tmp_path, DATA_PATH="0.5 /data/a 0.5 /data/b", FAKE_CUDA_RC="0", NNODES="4",
                            NODE_RANK="2", GPUS_PER_NODE="8")
    assert proc.returncode == 0, proc.stderr
    assert "demo mode" not in proc.stdout
    launch = calls[-1].split()
    assert launch[:2] == ["-m", "torch.distributed.run"]
    assert launch[launch.index("--nnodes") + 1] == "4" and launch[launch.index("--node_rank") + 1] == "2"
    assert launch[launch.index("--nproc_per_node") + 1] == "8"
    i = launch.index("--data-path")
    assert launch[i + 1: i + 5] == ["0.5", "/data/a", "0.5", "/data/b"]


def test_under_torchrun_each_rank_runs_its_trainer(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "ready").write_text("")
    proc, calls = _stub_run(tmp_path, **TORCHRUN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert calls[-1].split()[:4] == ["-m", "qwenvl_megatron.training.train", "--stage", "1"]
    assert "torch.distributed.run" not in " ".join(calls)
    assert proc.stdout == ""  # only local rank 0 announces the demo
    proc, calls = _stub_run(tmp_path, DATA_PATH="/data/a", FAKE_CUDA_RC="0", **TORCHRUN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert calls[-1].split()[:2] == ["-m", "qwenvl_megatron.training.train"] and "/data/a" in calls[-1]


def test_waiting_rank_times_out_with_a_clear_error(tmp_path):
    proc, calls = _stub_run(tmp_path, DEMO_PREPARE_TIMEOUT="1", **TORCHRUN_ENV)
    assert proc.returncode != 0 and calls == []
    assert f"local rank 1 waited 1 s for {tmp_path / 'demo' / 'ready'}" in proc.stderr
    assert "DEMO_PREPARE_TIMEOUT" in proc.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_torchrun_no_python_trains_the_demo_stage(tmp_path):
    """2 ranks start the script; local rank 0 prepares the demo data once, both train and save."""
    env = _clean_env(DEMO_DIR=str(tmp_path / "demo"), CKPT_ROOT=str(tmp_path / "ckpt"), TRAIN_ITERS="2",
                     PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
                     PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           _free_port(), "--no-python", os.path.join(EXAMPLES, "pretrain_stage1.sh"),
                           "--lr-warmup-iters", "1", "--log-interval", "1"],
                          capture_output=True, text=True, env=env, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert proc.stdout.splitlines()[0] == "demo mode: tiny model on the synthetic corpus, CPU/gloo (DATA_PATH unset)"
    assert proc.stdout.count("demo mode:") == 1
    assert out.count("wrote " + str(tmp_path / "demo" / "tok.model")) == 1  # prepared by one rank only
    assert "world 2 (TP 1 PP 1 DP 2)" in out and "iter 2/2 | loss" in out
    save = tmp_path / "ckpt" / "stage1"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (save / "iter_0000002" / "metadata.json").is_file()
