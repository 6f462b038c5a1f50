"""Faults around the trainer (issue #13): diverged weights never become the marker, checkpoints that
would be rolled back are refused, a failed save says why in one line, missing inputs fail before anything
is built. Trainer runs are subprocesses under device_discipline("cpu") (tests/workers/disciplined_train.py)."""
import math
import os
import resource
import subprocess
import sys

import pytest

from qwenvl_megatron.training.arguments import parse_args

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "disciplined_train.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
BASE = ["--model", "tiny", "--mock-data", "--image-size", "56", "--seq-length", "48", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--lr-warmup-iters", "1", "--log-interval", "1"]
MARKER = "latest_checkpointed_iteration.txt"


def run(*args, preexec_fn=None):
    proc = subprocess.run([sys.executable, WORKER, *BASE, *args], capture_output=True, text=True, timeout=300,
                          env=ENV, preexec_fn=preexec_fn)
    return proc, proc.stdout + proc.stderr


def marker(save) -> int:
    return int((save / MARKER).read_text())


def test_diverged_weights_never_become_the_marker(tmp_path):
    # lr 1e30: step 2 is the last finite one and its update writes weights of ~1e29; every later loss is nan.
    save = tmp_path / "diverged"
    proc, out = run("--train-iters", "50", "--lr", "1e30", "--min-lr", "1e30", "--max-skipped-iters", "3",
                    "--save", str(save), "--save-interval", "1")
    assert proc.returncode != 0, out[-4000:]
    assert "iteration 3: non-finite loss" in out and "update skipped (3 in a row" in out
    # Saving went ahead at every iteration, but only iteration 1 was proven (step 2's loss on it was finite).
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == [
        f"iter_{i:07d}" for i in (1, 2, 3, 4)]
    assert marker(save) == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "stopping: 3 consecutive iterations had a non-finite loss or gradient (--max-skipped-iters 3); last "
        f"proven checkpoint: {save}/iter_0000001 (iteration 1); lower --lr or check the data")

    # The final save (--train-iters) has no next step: a forward-only loss on its weights decides.
    final = tmp_path / "final"
    proc, out = run("--train-iters", "2", "--lr", "1e30", "--min-lr", "1e30", "--save", str(final),
                    "--save-interval", "1")
    assert proc.returncode == 0, out[-4000:]
    assert f"checkpoint {final}/iter_0000002 NOT proven: the loss on its weights is nan" in out
    assert (final / "iter_0000002").is_dir() and marker(final) == 1


def test_terminal_saves_are_proven_and_a_rollback_is_refused(tmp_path):
    save = tmp_path / "ckpt"
    proc, out = run("--train-iters", "3", "--lr", "1e-3", "--save", str(save), "--save-interval", "2")
    assert proc.returncode == 0, out[-4000:]
    assert f"checkpoint {save}/iter_0000002 proven (loss " in out and "at iteration 3)" in out
    assert f"checkpoint {save}/iter_0000003 proven (forward-only loss " in out
    assert marker(save) == 3

    # Relaunching on the same --save without --load would start at 0 and move the marker back to 1.
    proc, out = run("--train-iters", "2", "--lr", "1e-3", "--save", str(save))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"--save {save} holds a checkpoint of iteration 3, newer than this run's start (iteration 0); its saves "
        f"would move {MARKER} back. Resume with --load {save}, pick another --save, or pass --overwrite-checkpoints")
    assert "training 2-layer LLM" not in out  # refused before anything was built
    assert marker(save) == 3
    # The same with --load-weights-only of an older iteration (a stage hand-over into a used directory).
    proc, _ = run("--train-iters", "2", "--save", str(save), "--load", str(save / "iter_0000002"),
                  "--load-weights-only")
    assert proc.returncode != 0 and "holds a checkpoint of iteration 3" in proc.stderr

    proc, out = run("--train-iters", "2", "--lr", "1e-3", "--save", str(save), "--overwrite-checkpoints")
    assert proc.returncode == 0, out[-4000:]
    assert marker(save) == 2

    # A flipped byte in a shard of the checkpoint --load resolves to: one line naming the file, after the
    # model is built and before any weight is taken; --no-verify-checksums loads it anyway (#13 item 4).
    shard = save / "iter_0000002" / "__0_1.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) * 9 // 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc, out = run("--train-iters", "3", "--lr", "1e-3", "--load", str(save), "--save", str(save))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"--load: checkpoint {save}/iter_0000002 is damaged: __0_1.distcp has crc32 "), last
    assert "Traceback" not in proc.stderr
    proc, out = run("--train-iters", "3", "--lr", "1e-3", "--load", str(save), "--save", str(save),
                    "--no-verify-checksums")
    assert proc.returncode == 0, out[-4000:]
    assert f"loaded {save}/iter_0000002 (iteration 2" in out and marker(save) == 3


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_failed_save_stops_the_run_in_one_line(tmp_path):
    save = tmp_path / "ckpt"
    proc, out = run("--train-iters", "2", "--lr", "1e-3", "--save", str(save), "--save-interval", "1",
                    preexec_fn=_limit_file_size)
    assert proc.returncode != 0, out[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"--save {save}: saving checkpoint iteration 1 failed: [Errno 27 EFBIG] File too large")
    assert f"{save}/iter_0000001.tmp" in last and f"GiB free of" in last
    assert "Traceback" not in proc.stderr
    assert not (save / MARKER).exists()


def _args(*extra):
    return ["--model", "tiny", "--train-iters", "2", "--global-batch-size", "2", "--seq-length", "48", *extra]


def test_missing_inputs_fail_in_one_line_before_anything_is_built(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"")
    (tmp_path / "a.idx").write_bytes(b"")
    (tmp_path / "b.bin").write_bytes(b"")  # b.idx missing
    a, b, nowhere = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "nowhere")
    cases = [
        (["--data-path", nowhere], f"--data-path {nowhere}: {nowhere}.bin not found"),
        (["--data-path", a, b], f"--data-path {b}: {b}.idx not found"),
        (["--data-path", "0.5", a, "0.5", nowhere], f"--data-path {nowhere}: {nowhere}.bin not found"),
        (["--data-path", a, "--tokenizer-model", nowhere], f"--tokenizer-model: file not found: {nowhere}"),
        (["--mock-data", "--load", nowhere], f"--load: checkpoint not found: {nowhere} does not exist"),
        (["--mock-data", "--load", str(tmp_path)], f"--load: no checkpoint in {tmp_path}"),
        (["--mock-data", "--model-config", nowhere], f"--model-config: file not found: {nowhere}"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            parse_args(_args(*argv))
        assert str(info.value).startswith(message), (argv, str(info.value))
        assert "\n" not in str(info.value)
    parse_args(_args("--data-path", a))
    parse_args(_args("--mock-data", "--load", nowhere, "--save", nowhere))  # resumes when there is something
    parse_args(_args("--dry-run", "--data-path", nowhere, "--tokenizer-model", nowhere, "--load", nowhere))

    # The command line: one line on stderr, no traceback, before megatron is initialised.
    proc = subprocess.run([sys.executable, "-m", "qwenvl_megatron.training.train", *_args("--data-path", nowhere)],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"--data-path {nowhere}: {nowhere}.bin not found (expected the "
                                                f"PREFIX.bin/PREFIX.idx pair written by tools/preprocess_data.py)"]


def test_a_non_finite_gradient_skips_the_update_and_a_finite_one_matches_megatrons_step(monkeypatch):
    """train_step checks the gradients through the clipping norm (no pass of its own): a NaN in one reduced
    gradient under a finite loss leaves weights, optimizer and LR schedule as they were; a clean step updates
    exactly as megatron's own `optimizer.step()` does."""
    import torch

    from qwenvl_megatron.data.loader import MockLoader
    from qwenvl_megatron.models.config import tiny
    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.runtime import initialize
    from qwenvl_megatron.training import train
    from qwenvl_megatron.training.layout import Layout
    from qwenvl_megatron.training.optimizer import OptimizerSettings, build_optimizer, build_scheduler
    from qwenvl_megatron.training.step import build_model, forward_backward

    cfg = tiny().replace(vit={"image_size": 56})
    batch = MockLoader(2, 48, cfg.llm.vocab_size, 56, cfg.image_start_id, cfg.adapter.num_queries).global_batch(0, 1)
    layout = Layout(1, 1, 1, 1, 2, 2, 1, 48)

    def fresh():
        initialize(1, 1, seed=5)
        model = build_model(cfg, ParallelPlan())
        opt = build_optimizer(model, cfg, OptimizerSettings(lr=1e-3, clip_grad=1e-3))  # the clip acts
        return model, opt, build_scheduler(opt, OptimizerSettings(lr=1e-3), 1, 10)

    def weights(model):
        return [p.detach().clone() for p in model[0].parameters()]

    model, opt, sched = fresh()
    before, lr_before = weights(model), opt.param_groups[0]["lr"]

    def poisoned(model_, *args, **kwargs):
        out = forward_backward(model_, *args, **kwargs)
        model_[0].buffers[0].grad_data[3] = float("nan")
        return out

    monkeypatch.setattr(train, "forward_backward", poisoned)
    loss, norm, updated = train.train_step(model, opt, sched, list(batch), layout)
    assert math.isfinite(loss) and math.isnan(norm) and not updated
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert opt.param_groups[0]["lr"] == lr_before and sched.num_steps == 0
    monkeypatch.undo()
    loss, norm, updated = train.train_step(model, opt, sched, list(batch), layout)
    assert updated and math.isfinite(norm) and norm > 1e-3

    ref_model, ref_opt, _ = fresh()  # the same clean step through megatron's optimizer.step()
    for chunk in ref_model:
        chunk.zero_grad_buffer()
    forward_backward(ref_model, list(batch), 1, 48, 2)
    ok, ref_norm, _ = ref_opt.step()
    assert ok and ref_norm == pytest.approx(norm, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(ref_model)))
