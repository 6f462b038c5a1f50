"""Checkpoint saves that fail, and what a save makes durable (a process of its own: a save starts helper
processes, and the file-size limit must not touch the test process). Runs under device_discipline("cpu").

    python save_faults.py SAVE_DIR                -> prints one JSON line as the last line of stdout
    python save_faults.py --read-only SAVE_DIR    (SAVE_DIR on a read-only mount)
"""
import json
import os
import resource
import sys

from qwenvl_megatron.models.config import tiny
from qwenvl_megatron.models.parallel import ParallelPlan
from qwenvl_megatron.runtime import device_discipline, initialize
from qwenvl_megatron.training import checkpoint as ckpt
from qwenvl_megatron.training.step import build_model


def main(save: str) -> dict:
    out = {}
    initialize(1, 1)
    cfg = tiny()
    model = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    # 1. What a save fsyncs: every file of the checkpoint, its directory, the marker, the save directory.
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    os.fsync = recording_fsync
    ckpt.save_model_weights(model, save, cfg, iteration=1)
    os.fsync = real_fsync
    out["synced"] = synced
    out["files_1"] = sorted(os.listdir(ckpt.iter_dir(save, 1)))
    # 2. A save under a file-size limit: one line with the errno, the path and the free space.
    os.makedirs(os.path.join(save, "iter_0000007.tmp"))  # what a save killed earlier leaves behind
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        ckpt.save_model_weights(model, save, cfg, iteration=2)
        out["error"] = None
    except ckpt.CheckpointSaveError as e:
        out["error"] = str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out["after_failure"] = sorted(os.listdir(save))
    out["marker_after_failure"] = ckpt.latest_iteration(save)
    # 3. The next successful save removes the temporary directories of failed and killed saves.
    ckpt.save_model_weights(model, save, cfg, iteration=3)
    out["after_success"] = sorted(os.listdir(save))
    out["marker_after_success"] = ckpt.latest_iteration(save)
    return out


def read_only(save: str) -> dict:
    """A save into a directory on a read-only file system (the test mounts it): the error line."""
    initialize(1, 1)
    cfg = tiny()
    model = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    try:
        ckpt.save_model_weights(model, save, cfg, iteration=2)
        return {"error": None, "marker": ckpt.latest_iteration(save)}
    except ckpt.CheckpointSaveError as e:
        return {"error": str(e), "marker": ckpt.latest_iteration(save)}


if __name__ == "__main__":  # megatron's writer starts processes with the spawn method
    with device_discipline("cpu"):
        result = read_only(sys.argv[2]) if sys.argv[1] == "--read-only" else main(sys.argv[1])
    print(json.dumps(result), flush=True)
