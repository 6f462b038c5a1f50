"""The GPU path on a CPU: Transformer Engine and local checkpoints load into each other (weights and
optimizer), a checkpoint saved for another network is refused in one line, and tensor-parallel ranks
share the image decoding (tests/workers/tp_images.py under torchrun).

Transformer Engine cannot run here, so `te_like` turns a local model into a faithful stand-in: the
modules that a TE build makes TE modules (linears, standalone norms, core attention; not the fused
input/pre-MLP norms, the embedding or the output layer) get TE's extra state. Like TE 2.x it is a uint8
tensor (empty when there is no FP8 metadata), `set_extra_state` ignores None / empty, and megatron wraps
it in a ShardedObject through `make_sharded_tensors_for_checkpoint`, except for core attention, whose
`sharded_state_dict` leaves it out (as megatron's TEDotProductAttention does).
"""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention

from qwenvl_megatron.models.config import tiny
from qwenvl_megatron.models.parallel import ParallelPlan
from qwenvl_megatron.runtime import initialize
from qwenvl_megatron.training import checkpoint as ckpt
from qwenvl_megatron.training.optimizer import OptimizerSettings, build_optimizer, build_scheduler
from qwenvl_megatron.training.step import build_model, forward_backward, unwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "workers"))
import train_common as T  # noqa: E402


class _TEExtraState:
    """TE's get/set_extra_state: a uint8 tensor, empty until FP8 metadata exists; None/empty is ignored."""

    def get_extra_state(self):
        return self.__dict__.get("_te_state", torch.empty(0, dtype=torch.uint8))

    def set_extra_state(self, state):
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        self._te_state = state


_TE_KINDS = (ColumnParallelLinear, RowParallelLinear, DotProductAttention, torch.nn.LayerNorm, torch.nn.RMSNorm)


def te_like(chunks):
    """Give the modules a TE build makes TE modules TE's (empty) extra state. Returns {name: module}."""
    swapped = {}
    for name, m in unwrap(chunks[0]).named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("output_layer", "input_layernorm", "pre_mlp_layernorm") or not isinstance(m, _TE_KINDS):
            continue
        base = type(m)
        m.__class__ = type(f"TELike{base.__name__}", (_TEExtraState, base), {})
        swapped[name] = m
    return swapped


def fp8_metadata(modules):
    """Non-empty extra state in every TE-like module, as after FP8 training."""
    for name, m in modules.items():
        m._te_state = torch.frombuffer(bytearray(pickle.dumps({"module": name, "amax": [1.5]})),
                                       dtype=torch.uint8).clone()
    return modules


def _weights(chunks):
    return {k: v.detach().clone() for k, v in unwrap(chunks[0]).state_dict().items()
            if not k.endswith("_extra_state")}


def _adam(chunks, opt):
    """{parameter name: (exp_avg, exp_avg_sq)} of whatever megatron optimizer wraps torch's Adam."""
    states = {}
    for o in getattr(opt, "chained_optimizers", [opt]):
        states.update(o.optimizer.state)
    return {n: (states[p]["exp_avg"].clone(), states[p]["exp_avg_sq"].clone())
            for n, p in unwrap(chunks[0]).named_parameters() if p in states}


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not all(torch.equal(x, y) for x, y in zip(a[k] if isinstance(a[k], tuple) else (a[k],),
                                                                       b[k] if isinstance(b[k], tuple) else (b[k],)))]
    assert not bad, bad


def _trainer(cfg, te):
    model = build_model(cfg, ParallelPlan())
    modules = te_like(model) if te else {}
    settings = OptimizerSettings(lr=1e-3, min_lr=1e-4)
    opt = build_optimizer(model, cfg, settings)
    return model, opt, build_scheduler(opt, settings, 0, 10), modules


def _step(model, opt, sched):
    batches = T.microbatches(T.global_samples(T.config(), n=4), 4, 0, 1)
    for c in model:
        c.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(model, batches, len(batches), T.SEQ, 4)
    assert opt.step()[0]
    sched.step(1)


@pytest.fixture(scope="module")
def cfg():
    initialize(1, 1)
    return tiny()


def test_te_and_local_checkpoints_load_into_each_other(cfg, tmp_path):
    # A laptop's initialisation (local layers, weights only) -> a TE-built model on the cluster.
    laptop = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    ckpt.save_model_weights(laptop, str(tmp_path / "init"), cfg)
    te_model, te_opt, te_sched, te_modules = _trainer(cfg, te=True)
    ckpt.load_model_weights(te_model, str(tmp_path / "init"))
    _assert_same(_weights(te_model), _weights(laptop))
    assert all(m.get_extra_state().numel() == 0 for m in te_modules.values())  # TE starts empty

    # TE training: one update, FP8 metadata appears, full checkpoint (optimizer included).
    _step(te_model, te_opt, te_sched)
    fp8_metadata(te_modules)
    ckpt.save_checkpoint(str(tmp_path / "te"), 1, te_model, cfg, te_opt, te_sched, consumed_samples=4)

    # ... resumes on a local model (CPU evaluation, converter), optimizer and all; saved again locally.
    local, local_opt, local_sched, _ = _trainer(cfg, te=False)
    info = ckpt.load_checkpoint(str(tmp_path / "te"), local, local_opt, local_sched)
    assert info["iteration"] == 1 and local_sched.num_steps == te_sched.num_steps
    _assert_same(_weights(local), _weights(te_model))
    _assert_same(_adam(local, local_opt), _adam(te_model, te_opt))
    assert "_extra_state" not in str(ckpt.load_model_weights(build_model(cfg, ParallelPlan(), wrap_ddp=False),
                                                             str(tmp_path / "te")))
    ckpt.save_checkpoint(str(tmp_path / "local"), 1, local, cfg, local_opt, local_sched, consumed_samples=4)

    # ... and back onto TE: the same weights and Adam moments, empty extra state (the local run had none).
    back, back_opt, back_sched, back_modules = _trainer(cfg, te=True)
    ckpt.load_checkpoint(str(tmp_path / "local"), back, back_opt, back_sched)
    _assert_same(_weights(back), _weights(te_model))
    _assert_same(_adam(back, back_opt), _adam(te_model, te_opt))
    assert all(m.get_extra_state().numel() == 0 for m in back_modules.values())
    ckpt.load_checkpoint(str(tmp_path / "local"), back, weights_only=True)
    _assert_same(_weights(back), _weights(te_model))

    # TE -> TE keeps the FP8 metadata megatron checkpoints (core attention's is not in its sharded state).
    again, again_opt, again_sched, again_modules = _trainer(cfg, te=True)
    ckpt.load_checkpoint(str(tmp_path / "te"), again, again_opt, again_sched)
    _assert_same(_weights(again), _weights(te_model))
    for name, m in again_modules.items():
        want = te_modules[name].get_extra_state() if "core_attention" not in name else torch.empty(0)
        assert torch.equal(m.get_extra_state(), want.to(torch.uint8)), name


def _with_extra_param(chunks):
    """A model with one more weight than the checkpoint format has (a real key, not extra state)."""
    ln = unwrap(chunks[0]).vision.ln_pre
    ln.register_parameter("gain", torch.nn.Parameter(torch.ones(3)))
    return chunks


def test_other_key_mismatches_are_named_errors(cfg, tmp_path):
    te = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    fp8_metadata(te_like(te))
    ckpt.save_model_weights(te, str(tmp_path / "te"), cfg)
    ckpt.save_model_weights(_with_extra_param(build_model(cfg, ParallelPlan(), wrap_ddp=False)),
                            str(tmp_path / "more"), cfg)
    for te_build in (True, False):
        # The model needs a weight the checkpoint lacks.
        m = _with_extra_param(build_model(cfg, ParallelPlan(), wrap_ddp=False))
        if te_build:
            te_like(m)
        with pytest.raises(ckpt.CheckpointError, match=r"te/iter_0000000 does not fit the model: the model "
                                                        r"needs keys the checkpoint does not have: "
                                                        r"\['vision.ln_pre.gain'\]$"):
            ckpt.load_model_weights(m, str(tmp_path / "te"))
        # The checkpoint has a weight the model lacks.
        m = build_model(cfg, ParallelPlan(), wrap_ddp=False)
        if te_build:
            te_like(m)
        with pytest.raises(ckpt.CheckpointError, match=r"more/iter_0000000 does not fit the model: the checkpoint "
                                                        r"has keys the model does not have: \['vision.ln_pre.gain'\]$"):
            ckpt.load_model_weights(m, str(tmp_path / "more"))
    # A state_dict-only key (like core attention's, never in the sharded state dict) must still match.
    m = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    unwrap(m[0]).adapter.core_attention.register_buffer("scale", torch.ones(1))
    with pytest.raises(ckpt.CheckpointError, match=r"needs keys the checkpoint does not have: "
                                                    r"\['adapter.core_attention.scale'\]"):
        ckpt.load_model_weights(m, str(tmp_path / "te"))


# ------------------------------------------------------------------------------------ model config (C)
def test_checkpoint_for_another_model_is_refused_in_one_line(cfg, tmp_path, monkeypatch):
    demo = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    ckpt.save_model_weights(demo, str(tmp_path / "demo"), cfg)
    model, opt, sched, _ = _trainer(cfg, te=False)
    _step(model, opt, sched)
    ckpt.save_checkpoint(str(tmp_path / "full"), 1, model, cfg, opt, sched, consumed_samples=4)

    bigger = cfg.replace(llm={"num_layers": 3, "ffn_hidden_size": 96}, vit={"num_layers": 3, "image_size": 224})
    tensors_read = []
    real_load = ckpt.dist_checkpointing.load
    monkeypatch.setattr(ckpt.dist_checkpointing, "load", lambda *a, **k: tensors_read.append(a) or real_load(*a, **k))
    cluster, c_opt, c_sched, _ = _trainer(bigger, te=False)
    for load in (lambda: ckpt.load_model_weights(cluster, str(tmp_path / "demo")),
                 lambda: ckpt.load_checkpoint(str(tmp_path / "full"), cluster, c_opt, c_sched),
                 lambda: ckpt.load_checkpoint(str(tmp_path / "full"), cluster, weights_only=True)):
        with pytest.raises(ckpt.CheckpointError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and "was saved for a different model: " in msg
        assert msg.split("model: ", 1)[1].startswith(
            "llm.num_layers 2 != 3, llm.ffn_hidden_size 128 != 96, vit.num_layers 2 != 3 (checkpoint")
        assert "image_size" not in msg
    assert not tensors_read

    # Stage 1 -> 2 changes only the resolution: no weight depends on it, the load goes through.
    assert ckpt.config_differences(cfg, cfg.replace(vit={"image_size": 448})) == []
    stage2, s_opt, s_sched, _ = _trainer(cfg.replace(vit={"image_size": 224}), te=False)
    ckpt.load_checkpoint(str(tmp_path / "full"), stage2, s_opt, s_sched)
    _assert_same(_weights(stage2), _weights(model))
    assert tensors_read


# ---------------------------------------------------------------------- TP ranks share image decoding (B)
@pytest.fixture(scope="module")
def tp_images(tmp_path_factory):
    import socket
    out = tmp_path_factory.mktemp("tp_images")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, os.path.join(HERE, "workers", "tp_images.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "tp_images.json").read_text())


def test_tp_ranks_decode_their_share_and_gather_the_full_batch(tp_images):
    ranks = [r["shares"] for r in tp_images["ranks"]]
    counts = ranks[0]["image_counts"]
    assert 0 in counts and 1 in counts and any(n % 2 and n > 1 for n in counts)  # empty, one, uneven shares
    for r in ranks:
        assert all(r["equal"]) and all(r["share_ok"])  # bit for bit the full decode; only its own images
    assert ranks[0]["decoded"] + ranks[1]["decoded"] == ranks[0]["total"]
    assert [r["decoded"] for r in ranks] == [sum((n + 1) // 2 for n in counts), sum(n // 2 for n in counts)]


def test_corrupt_image_raises_on_every_tp_rank_without_a_hang(tp_images):
    bad = tp_images["bad_prefix"]
    per_rank = [r["corrupt"] for r in tp_images["ranks"]]
    assert [r["after"] for r in tp_images["ranks"]] == [3.0, 3.0]  # both ranks reached the next collective
    for rank, cases in enumerate(per_rank):
        for c in cases:
            s, j = c["sample"], c["bad_image"]
            assert c["message"].startswith(f"image #{j} of the batch cannot be decoded: {bad} sample {s} image {j}: ")
            assert c["own_error"] == (j % 2 == rank)  # only the rank that decoded it failed to
            assert c["decoded"] == (2 if rank == 0 else 1)
    assert [c["message"] for c in per_rank[0]] == [c["message"] for c in per_rank[1]]
    assert {c["bad_image"] % 2 for c in per_rank[0]} == {0, 1}  # either rank may be the one that fails


def test_tp2_training_loss_unchanged_by_shared_decoding(tp_images):
    for r in tp_images["ranks"]:
        assert r["train"]["shared"] == r["train"]["full"] and len(r["train"]["shared"]) == 2
