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


# ------------------------------------------------------------------------------------------------ Slurm
SBATCH = os.path.join(EXAMPLES, "slurm", "qwenvl_stage.sbatch")
FAKE_SLURM = {  # just enough of srun / scancel / scontrol to run the batch script on one machine
    "srun": 'echo "srun $*" >> "$FAKE_LOG"\n"${@: -4}" &\necho $! > "$FAKE_STEP"\nwait $!\n',
    "scancel": 'echo "scancel $*" >> "$FAKE_LOG"\nkill "-${1#--signal=}" "$(cat "$FAKE_STEP")"\n',
    "scontrol": 'echo "scontrol $*" >> "$FAKE_LOG"\n[ "$1" = show ] && echo node7 && echo node8\ntrue\n',
}
# The "stage script": reports its environment, then trains until SIGTERM, which it answers by saving.
FAKE_STAGE = """#!/usr/bin/env bash
trap 'echo "stage: saved after TERM" >> "$FAKE_LOG"; exit 0' TERM
echo "stage: NODE_RANK=$NODE_RANK NNODES=$NNODES MASTER_ADDR=$MASTER_ADDR" \
  "timeout=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" >> "$FAKE_LOG"
[ -n "${FAKE_EXIT:-}" ] && exit "$FAKE_EXIT"
while true; do sleep 0.1; done
"""


def _directives():
    return [line.split(None, 1)[1].strip() for line in open(SBATCH) if line.startswith("#SBATCH")]


def test_sbatch_parses_and_its_log_dir_is_in_the_git_tree():
    subprocess.run(["bash", "-n", SBATCH], check=True)
    d = _directives()
    assert "--signal=B:TERM@120" in d and "--requeue" in d
    (out,) = [x.split("=", 1)[1] for x in d if x.startswith("--output=")]
    log_dir = os.path.dirname(out)
    assert log_dir == "examples/slurm/logs"  # relative to the submit directory, the repository root
    tracked = subprocess.run(["git", "ls-files", log_dir], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert f"{log_dir}/.gitignore" in tracked, "a fresh clone must have the --output directory"


def _fake_slurm(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    stage = tmp_path / "stage.sh"
    stage.write_text(FAKE_STAGE)
    log = tmp_path / "slurm.log"
    log.write_text("")
    full = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
                      FAKE_STEP=str(tmp_path / "step.pid"), SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="42",
                      SLURM_JOB_NODELIST="node[7-8]", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="0",
                      STAGE_SCRIPT=str(stage), **env)
    full.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    return subprocess.Popen(["bash", SBATCH], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True), log


def test_sbatch_forwards_sigterm_then_requeues(tmp_path):
    import signal
    import time

    proc, log = _fake_slurm(tmp_path)
    deadline = time.time() + 30
    while "stage: NODE_RANK" not in log.read_text():  # the step is running
        assert time.time() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    lines = log.read_text().splitlines()
    assert "stage: NODE_RANK=0 NNODES=2 MASTER_ADDR=node7 timeout=110" in lines
    steps = [x for x in lines if x.startswith(("scancel", "stage: saved", "scontrol requeue"))]
    assert steps == ["scancel --signal=TERM 42", "stage: saved after TERM", "scontrol requeue 42"]


def test_sbatch_without_sigterm_keeps_the_exit_status_and_does_not_requeue(tmp_path):
    proc, log = _fake_slurm(tmp_path, FAKE_EXIT="3")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    assert not [x for x in log.read_text().splitlines() if x.startswith(("scancel", "scontrol requeue"))]
