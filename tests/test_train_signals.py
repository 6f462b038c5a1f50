"""What a cluster does to a run: pre-emption (SIGTERM) saves and exits cleanly; a diverging run skips
non-finite updates, counts them, and stops with a clear message."""
import os
import signal
import subprocess
import sys
import time

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
BASE = [sys.executable, "-u", "-m", "qwenvl_megatron.training.train", "--model", "tiny", "--mock-data",
        "--image-size", "56", "--seq-length", "48", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--lr-warmup-iters", "1", "--log-interval", "1"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    save = tmp_path / "ckpt"
    proc = subprocess.Popen(BASE + ["--train-iters", "100000", "--lr", "1e-4", "--save", str(save),
                                    "--save-interval", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    lines, deadline = [], time.time() + 240
    for line in proc.stdout:  # wait until training has really started
        lines.append(line)
        if line.startswith("iter 3/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-30:])
    rest, _ = proc.communicate(timeout=240)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-4000:]
    assert "SIGTERM: saved at iteration" in out
    it = int((save / "latest_checkpointed_iteration.txt").read_text().strip())
    assert it >= 3
    assert (save / f"iter_{it:07d}").is_dir()


def test_non_finite_updates_are_skipped_then_the_run_stops(tmp_path):
    # An absurd LR makes the first update overflow the weights: every later loss is non-finite.
    proc = subprocess.run(BASE + ["--train-iters", "50", "--lr", "1e30", "--min-lr", "1e30",
                                  "--max-skipped-iters", "3"],
                          capture_output=True, text=True, env=ENV, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "update skipped (1 in a row, 1 total)" in out
    assert "update skipped (3 in a row, 3 total)" in out
    assert "3 consecutive iterations had a non-finite loss or gradient (--max-skipped-iters 3)" in out
