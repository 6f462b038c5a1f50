"""Checkpoint files on disk: a crash mid-save leaves the previous checkpoint current, and a missing or
damaged shard is reported with its path instead of loading half a model."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from qwenvl_megatron.models.config import tiny
from qwenvl_megatron.models.parallel import ParallelPlan
from qwenvl_megatron.runtime import initialize
from qwenvl_megatron.training import checkpoint as ckpt
from qwenvl_megatron.training.step import build_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    initialize(1, 1)
    cfg = tiny()
    model = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    save = str(tmp_path_factory.mktemp("ckpt"))
    ckpt.save_model_weights(model, save, cfg, iteration=1)
    return cfg, model, save


def _weights(model):
    return {k: v.clone() for k, v in model[0].state_dict().items() if not k.endswith("_extra_state")}


def test_interrupted_save_leaves_the_previous_checkpoint_current(saved, tmp_path):
    cfg, model, save = saved
    save = shutil.copytree(save, str(tmp_path / "ckpt"))
    before = _weights(model)
    # What a crash half-way through saving iteration 2 leaves behind: a partial temp dir, marker untouched.
    partial = os.path.join(save, "iter_0000002.tmp")
    os.makedirs(partial)
    open(os.path.join(partial, "__0_0.distcp"), "wb").write(b"half a shard")
    assert ckpt.latest_iteration(save) == 1
    fresh = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    ckpt.load_model_weights(fresh, save)
    after = _weights(fresh)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_save_from_a_source_writes_what_it_gives_each_tensor_in_one_run(saved, tmp_path):
    """`source` (what the converter uses) is asked for every model tensor or view when the writer reaches
    it; its answers are what is saved; the views of one tensor (fc1's halves) come one after the other
    on one writer thread; an answer of the wrong shape is an error naming the tensor."""
    import threading
    cfg, model, _ = saved
    calls = []

    def plus_one(t):
        calls.append((threading.get_ident(), t.untyped_storage().data_ptr()))
        return t + 1

    ckpt.save_model_weights(model, str(tmp_path / "s"), cfg, iteration=0, source=plus_one)
    fresh = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    ckpt.load_model_weights(fresh, str(tmp_path / "s"))
    want, got = _weights(model), _weights(fresh)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k] + 1) for k in want)
    for thread in {th for th, _ in calls}:
        seq = [ptr for th, ptr in calls if th == thread]
        runs = [ptr for i, ptr in enumerate(seq) if i == 0 or seq[i - 1] != ptr]
        assert len(runs) == len(set(runs)), "a tensor's views were not written in one run"
    assert len(calls) > len({ptr for _, ptr in calls})  # some tensor was written as several views
    with pytest.raises(ckpt.CheckpointSaveError, match=r"checkpoint source gave .* for \S+, which is"):
        ckpt.save_model_weights(model, str(tmp_path / "bad"), cfg, iteration=0, source=lambda t: t.reshape(-1))


def test_missing_shard_names_the_checkpoint(saved, tmp_path):
    cfg, model, save = saved
    save = shutil.copytree(save, str(tmp_path / "ckpt"))
    shards = glob.glob(os.path.join(save, "iter_0000001", "*.distcp"))
    assert shards
    os.remove(shards[0])
    with pytest.raises(ckpt.CheckpointError, match="iter_0000001"):
        ckpt.load_model_weights(build_model(cfg, ParallelPlan(), wrap_ddp=False), save)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_checkpoint_dir(str(tmp_path / "nowhere"))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.resolve_checkpoint_dir(str(tmp_path))


def test_save_failure_names_errno_path_and_free_space_then_fsync_and_cleanup(tmp_path):
    """A save under a file-size limit fails in one line with the errno, the path and the free space; the
    marker stays; the next successful save removes stale iter_*.tmp directories; a save fsyncs every file
    of the checkpoint, the checkpoint directory, the marker and the save directory."""
    save = str(tmp_path / "ckpt")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "save_faults.py")
    proc = subprocess.run([sys.executable, worker, save], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    error = out["error"]
    assert error is not None and "\n" not in error
    assert error.startswith("saving checkpoint iteration 2 failed: [Errno 27 EFBIG] File too large")
    assert os.path.join(save, "iter_0000002.tmp") in error
    assert re.search(r"\d+\.\d\d GiB free of \d+\.\d\d GiB on " + re.escape(save), error)
    assert out["marker_after_failure"] == 1
    assert "iter_0000002.tmp" in out["after_failure"] and "iter_0000007.tmp" in out["after_failure"]
    assert out["after_success"] == ["iter_0000001", "iter_0000003", ckpt.MARKER]
    assert out["marker_after_success"] == 3

    synced = out["synced"]
    tmp1 = os.path.join(save, "iter_0000001.tmp")
    for name in out["files_1"]:  # each file, fsynced before the rename made the directory's name final
        assert os.path.join(tmp1, name) in synced, name
    marker_tmp = os.path.join(save, ckpt.MARKER + ".tmp")
    assert tmp1 in synced and marker_tmp in synced
    last_file = max(synced.index(os.path.join(tmp1, n)) for n in out["files_1"])
    # the save directory after the rename (before the marker) and after the marker's replace
    assert save in synced[last_file + 1:synced.index(marker_tmp)]
    assert synced[-1] == save


def test_flipped_bytes_in_a_shard_are_refused_naming_the_file(saved, tmp_path):
    """checksums.json records every file's size and CRC-32 at save; a load checks them first and names the
    damaged file. verify=False (the trainer's --no-verify-checksums) skips the check: the damage then loads
    silently, which is what the check is for."""
    cfg, model, save = saved
    save = shutil.copytree(save, str(tmp_path / "ckpt"))
    iter1 = os.path.join(save, "iter_0000001")
    import json
    recorded = json.load(open(os.path.join(iter1, ckpt.CHECKSUMS)))
    assert recorded["algorithm"] == "crc32"
    assert sorted(recorded["files"]) == sorted(n for n in os.listdir(iter1) if n != ckpt.CHECKSUMS)
    # the shards' sums are taken while writing: they must be what reading the files back gives
    assert {n: ckpt._file_checksum(os.path.join(iter1, n)) for n in recorded["files"]} == recorded["files"]
    ckpt.load_model_weights(build_model(cfg, ParallelPlan(), wrap_ddp=False), save)  # intact: loads

    shard = max(glob.glob(os.path.join(iter1, "*.distcp")), key=os.path.getsize)
    with open(shard, "r+b") as f:  # flip 4 bytes in the last tenth of the file: tensor payload
        f.seek(os.path.getsize(shard) * 9 // 10)
        data = f.read(4)
        f.seek(-4, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_model_weights(build_model(cfg, ParallelPlan(), wrap_ddp=False), save)
    message = str(info.value)
    assert message.startswith(f"checkpoint {iter1} is damaged: {os.path.basename(shard)} has crc32 ")
    assert "--no-verify-checksums" in message and "\n" not in message
    with pytest.raises(ckpt.CheckpointError, match=os.path.basename(shard)):
        ckpt.load_checkpoint(save, build_model(cfg, ParallelPlan(), wrap_ddp=False), weights_only=True)

    unchecked = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    ckpt.load_model_weights(unchecked, save, verify=False)
    before, after = _weights(model), _weights(unchecked)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the flip went into the weights

    os.truncate(shard, os.path.getsize(shard) - 1)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{os.path.basename(shard)} has ")):
        ckpt.load_model_weights(build_model(cfg, ParallelPlan(), wrap_ddp=False), save)


def test_a_view_is_written_as_its_own_bytes_without_a_copy(tmp_path):
    """torch.save writes a tensor's whole storage: a contiguous view is aliased by a tensor whose storage
    is exactly its bytes (no copy), and saves and loads like a clone; other views are copied."""
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.arange(60, dtype=torch.float32, device="cpu").to(dtype).reshape(10, 6)
        view = base[2:5]
        alias = ckpt._exact_storage(view)
        assert alias.data_ptr() == view.data_ptr() and alias.untyped_storage().nbytes() == view.nbytes
        assert alias.dtype == dtype and alias.shape == view.shape and torch.equal(alias, view)
        torch.save(alias, tmp_path / "a.pt")
        loaded = torch.load(tmp_path / "a.pt", weights_only=True)
        assert torch.equal(loaded, view) and loaded.untyped_storage().nbytes() == view.nbytes
        torch.save(view.clone(), tmp_path / "c.pt")
        torch.save(view, tmp_path / "v.pt")  # the whole storage
        assert os.path.getsize(tmp_path / "a.pt") == os.path.getsize(tmp_path / "c.pt") < os.path.getsize(
            tmp_path / "v.pt")
        strided = base[:, 1:3]
        copy = ckpt._exact_storage(strided)
        assert torch.equal(copy, strided) and copy.untyped_storage().nbytes() == strided.nbytes
        assert ckpt._exact_storage(base) is base
    # A tensor off the host (here `meta`, a GPU's stand-in) is copied to the host, never aliased by address
    # (a host alias of a device pointer would crash the writer): meta has no data to copy, so it says so.
    with pytest.raises(NotImplementedError, match="meta"):
        ckpt._exact_storage(torch.zeros(10, 6, device="meta")[2:5])


def test_save_to_a_read_only_file_system_is_one_line_and_keeps_the_marker(tmp_path):
    """A read-only bind mount (root can mount here; skipped where it cannot): EROFS, path and free space."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    (src / ckpt.MARKER).write_text("1\n")
    mounted = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot bind-mount here (not root, or no mount permission)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "save_faults.py")
        proc = subprocess.run([sys.executable, worker, "--read-only", str(ro)], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    error = out["error"]
    assert error is not None and "\n" not in error
    assert error.startswith("saving checkpoint iteration 2 failed: [Errno 30 EROFS] Read-only file system"), error
    assert str(ro) in error and re.search(r"GiB free of", error)
    assert out["marker"] == 1
