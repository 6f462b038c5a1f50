"""Pre-emption and the processes of a run (issue #13 items 1-2). A SIGTERM however it is delivered (to
torchrun, which passes it to each worker's process group; to every process of the job at once, as Slurm's
`scancel --signal=TERM` does; to the process group of ranks started by a bare `srun`) ends with a complete,
proven checkpoint at the iteration of the signal, well within torchrun's default 30 s grace. However a run
ends (SIGKILL of one rank, normal end, an uncaught exception, SIGTERM), none of its processes survives it.

Every launch runs under tests/workers/reaper.py, a child subreaper: whatever the run leaves behind is
reparented to it and reported as a survivor. A save precedes each signal: megatron's writer used to start
its helper processes (a spawn manager, the resource tracker) at the first save, in the trainer's group."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from qwenvl_megatron.training import checkpoint as ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
REAPER = os.path.join(HERE, "workers", "reaper.py")
WORKER = os.path.join(HERE, "workers", "disciplined_train.py")
ENV = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}  # torchrun's default: 30 s
ENV.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
FLAGS = ["--model", "tiny", "--mock-data", "--image-size", "56", "--seq-length", "48", "--micro-batch-size", "1",
         "--global-batch-size", "2", "--lr-warmup-iters", "1", "--log-interval", "1", "--lr", "1e-4"]
GRACE = 30.0


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(*flags):
    return [sys.executable, REAPER, "--", sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", _port(), WORKER, *FLAGS, *flags]


def launch(command, act=None, when="iter 3/", env=None):
    """Run `command` under the reaper; when a line starts with `when`, call act(reaper's descendants).
    Returns (output, reaper report, seconds from the act to the end of the run)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(ENV, **(env or {})))
    lines, acted, deadline = [], None, time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if act is not None and acted is None and line.startswith(when):
            act(psutil.Process(proc.pid).children(recursive=True))
            acted = time.time()
        assert time.time() < deadline, "".join(lines[-40:])
    proc.wait(timeout=60)
    ended = time.time()
    out = "".join(lines)
    report = json.loads(out.strip().splitlines()[-1].removeprefix("REAPER "))
    return out, report, (ended - acted if acted else None)


def _trainers(procs):
    return [p for p in procs if WORKER in p.cmdline()]


def _assert_saved_at_the_signal(out, save, took):
    """Both ranks finished their iteration, saved, proved the save and returned from main (each prints its
    history last); the marker names that iteration and every file matches its recorded checksum."""
    assert took < GRACE, f"{took:.1f} s from the signal to the end of the run\n{out[-3000:]}"
    said = [line for line in out.splitlines() if line.startswith("SIGTERM: saved at iteration ")]
    assert len(said) == 1, out[-4000:]
    it = int(said[0].split()[-2].rstrip(","))
    # Iteration 3 was logged when the signal was sent; the save is of the last iteration trained (the one
    # the signal arrived in, or the next when it came between iterations): no iteration is lost.
    trained = [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("iter ")]
    assert it >= 3 and it == trained[-1], out[-4000:]
    assert f"checkpoint {save}/iter_{it:07d} proven (forward-only loss" in out
    assert int((save / ckpt.MARKER).read_text()) == it
    ckpt.verify_checksums(str(save / f"iter_{it:07d}"))
    assert sum(line.startswith('{"history"') for line in out.splitlines()) == 2, out[-4000:]
    assert "BrokenPipeError" not in out and "Traceback" not in out.split("SIGTERM: saved")[0]


def test_sigterm_to_torchrun_saves_in_the_grace_period(tmp_path):
    # torchrun catches SIGTERM, signals each worker's process group and waits up to 30 s; it then exits 1
    # with its own SignalException (whatever the workers did).
    save = tmp_path / "ckpt"
    out, report, took = launch(_torchrun("--train-iters", "1000", "--save", str(save), "--save-interval", "2"),
                               act=lambda procs: procs[0].send_signal(signal.SIGTERM))
    _assert_saved_at_the_signal(out, save, took)
    assert report == {"rc": 1, "survivors": []}, out[-3000:]
    assert "SignalException: Process" in out and "got signal: 15" in out


def test_sigterm_to_every_process_of_the_job_at_once(tmp_path):
    # Slurm (scancel --signal=TERM, or the step's end) signals every process of the step: torchrun and the
    # trainers together.
    def everyone(procs):
        for p in procs:
            p.send_signal(signal.SIGTERM)
    save = tmp_path / "ckpt"
    out, report, took = launch(_torchrun("--train-iters", "1000", "--save", str(save), "--save-interval", "2"),
                               act=everyone)
    _assert_saved_at_the_signal(out, save, took)
    assert report == {"rc": 1, "survivors": []}, out[-3000:]


def test_sigterm_to_the_process_group_of_a_bare_srun_launch(tmp_path):
    # One trainer per task, no torchrun: rank and world from SLURM_PROCID / SLURM_NTASKS, all in one process
    # group (the reaper's --group-of), which receives the signal as a whole.
    save = tmp_path / "ckpt"
    command = [sys.executable, REAPER, "--group-of", "2", "--", sys.executable, "-u", WORKER, *FLAGS,
               "--train-iters", "1000", "--save", str(save), "--save-interval", "2"]
    out, report, took = launch(command, env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _port()},
                               act=lambda procs: os.killpg(os.getpgid(_trainers(procs)[0].pid), signal.SIGTERM))
    _assert_saved_at_the_signal(out, save, took)
    assert report == {"rc": 0, "survivors": []}, out[-3000:]


def test_no_process_outlives_a_run(tmp_path):
    # SIGKILL of one rank after a save: torchrun ends the other, the run fails, the marker stays on the
    # proven checkpoint, and nothing the killed rank started is left running.
    save = tmp_path / "killed"
    out, report, _ = launch(_torchrun("--train-iters", "1000", "--save", str(save), "--save-interval", "2"),
                            act=lambda procs: _trainers(procs)[-1].kill())
    assert report["rc"] != 0 and report["survivors"] == [], (report, out[-3000:])
    assert int((save / ckpt.MARKER).read_text()) == 2

    # Normal end (saves at every iteration), and an uncaught exception right after a save: one process each.
    single = [sys.executable, REAPER, "--", sys.executable, "-u", WORKER, *FLAGS, "--train-iters", "2",
              "--save-interval", "1"]
    out, report, _ = launch(single + ["--save", str(tmp_path / "normal")])
    assert report == {"rc": 0, "survivors": []}, out[-3000:]
    out, report, _ = launch(single + ["--save", str(tmp_path / "raised")], env={"FAULT_RAISE_AFTER_SAVE": "1"})
    assert "RuntimeError: fault injected after a checkpoint save" in out
    assert report == {"rc": 1, "survivors": []}, out[-3000:]
