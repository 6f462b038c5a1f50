"""Checkpoint files on disk: a crash mid-save leaves the previous checkpoint current, and a missing or
damaged shard is reported with its path instead of loading half a model."""
import glob
import os
import shutil

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
