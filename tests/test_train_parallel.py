"""The trainer on megatron-core, end to end on the tiny model (2 subprocess launches, ~50 s):
one update of a 16-sample global batch is the same under every split, freezing leaves no trace in
buffers/optimizer/values, parameter groups carry the paper's multipliers, a stopped-and-resumed run
reproduces the uninterrupted one, and a checkpoint loads under other TP/PP layouts."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "workers")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
LR = 1e-3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_single")
    _run([sys.executable, os.path.join(WORKERS, "train_single.py"), "--out", str(out)])
    return out, json.loads((out / "single.json").read_text())


@pytest.fixture(scope="module")
def multi(single, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_multi")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
          os.path.join(WORKERS, "train_multi.py"), "--out", str(out), "--init", str(single[0] / "init.pt")])
    return out, json.loads((out / "multi.json").read_text())


# ----------------------------------------------------------------------------- one step, every split
@pytest.mark.parametrize("case", ["mbs4x4", "dp2_mbs2x4", "dp2_mbs2x4_distopt", "dp2_mbs2x4_overlap", "tp2_mbs16x1",
                                  "pp2_mbs4x4"])
def test_one_step_gives_the_same_parameters(single, multi, case):
    ref_dir, ref_res = single
    ref = torch.load(ref_dir / "params_mbs16x1.pt")
    init = torch.load(ref_dir / "init.pt")
    where = ref_dir if case == "mbs4x4" else multi[0]
    res = (ref_res if case == "mbs4x4" else multi[1])["steps"][case]
    got = torch.load(where / f"params_{case}.pt")
    assert sorted(got) == sorted(ref)
    for name in ref:
        # Adam's first update is ~lr * sign(grad); fp32 summation order differs between splits.
        diff = (got[name] - ref[name]).abs().max().item()
        assert diff <= 1e-5, f"{case}: {name} differs from MBS16x1 by {diff}"
    # adapter.pos_embed is a fixed buffer; a key bias cannot change softmax attention, so its gradient is ~0.
    moved = [n for n in ref if n not in ("adapter.pos_embed", "adapter.linear_k.bias") and (ref[n] - init[n]).abs().max().item() < 0.5 * LR * 0.9 ** 3]
    assert not moved, f"parameters the update did not move: {moved}"
    base = ref_res["steps"]["mbs16x1"]
    assert math.isclose(res["losses"][0], base["losses"][0], rel_tol=1e-6)
    assert math.isclose(res["grad_norms"][0], base["grad_norms"][0], rel_tol=1e-6)


# ------------------------------------------------------------------------------------------ freezing
LLM_EMBED_AND_HEAD = {"language.embedding.word_embeddings.weight", "language.output_layer.weight"}
# ln_post/proj live in our adapter module, but in the HF layout in transformer.visual outside attn_pool.
VIT_TAIL = {"adapter.ln_post.weight", "adapter.ln_post.bias", "adapter.proj"}
STAGE_FROZEN_PREFIXES = {"1": ("language.",), "2": (), "3": ("vision.", "adapter.ln_post.", "adapter.proj")}
STAGE_FREEZE = {"1": "llm", "2": "", "3": "vit"}


def _official_fix_vit(names):
    """What the official Qwen-VL `fix_vit` freezes, read off the HF key of each parameter: all of
    `transformer.visual` except `attn_pool` (names without a one-to-one HF key are LLM or attn_pool)."""
    from qwenvl_megatron.convert.hf_layout import _direct_map
    from qwenvl_megatron.models.config import tiny

    hf = {model: key for key, model in _direct_map(tiny()).items()}
    return {n for n in names if hf.get(n, "").startswith("transformer.visual.")
            and not hf[n].startswith("transformer.visual.attn_pool.")}


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_freezing_per_stage(single, stage):
    from qwenvl_megatron.training.arguments import parse_args
    from qwenvl_megatron.training.layout import estimate_memory, plan_layout

    f = single[1]["freezing"][stage]
    everything = set(f["frozen"]) | set(f["trainable"])
    expected_frozen = {n for n in everything if n.startswith(STAGE_FROZEN_PREFIXES[stage])}
    assert set(f["frozen"]) == expected_frozen
    if stage == "1":
        assert LLM_EMBED_AND_HEAD <= set(f["frozen"])
        assert VIT_TAIL <= set(f["trainable"]), "stage 1 trains ln_post/proj with the adapter"
    if stage == "3":
        assert VIT_TAIL <= set(f["frozen"])
        assert set(f["frozen"]) == _official_fix_vit(everything)
        assert any(n.startswith("adapter.") for n in f["trainable"])  # attn_pool trains
    trainable = sorted(everything - expected_frozen)
    assert f["in_grad_buffers"] == trainable, "grad buffers must hold exactly the trainable parameters"
    assert f["in_param_groups"] == trainable
    assert f["with_optimizer_state"] == trainable, "optimizer state must exist for trainable params only"
    assert f["main_grad_of_frozen"] == []
    assert set(f["unchanged"]) == expected_frozen, "frozen params bit-identical, every trainable one moved"
    # The dry run's memory estimate counts the same trainable parameters (grads, optimizer state).
    args = parse_args(["--model", "tiny", "--dry-run", "--train-iters", "10", "--global-batch-size", "16",
                       "--freeze", STAGE_FREEZE[stage]])
    (est,) = estimate_memory(args, plan_layout(args, 1))
    assert est["trainable"] == f["trainable_numel"]


# ------------------------------------------------------------------------------- parameter groups
def _expected_group(name, shape_is_matrix):
    """The paper's rules, written out independently of training/optimizer.py (ViT of 2 layers, decay 0.9)."""
    if name.startswith("vision.decoder.layers.0."):
        lr = 0.9
    elif name.startswith("vision.decoder.layers.1."):
        lr = 1.0
    elif name.startswith("vision.ln_pre."):
        lr = 0.9 ** 2
    elif name in ("vision.conv1.weight", "vision.positional_embedding"):
        lr = 0.9 ** 3
    else:
        lr = 1.0
    no_wd = (not shape_is_matrix or name.endswith(".bias")
             or name in ("vision.positional_embedding", "adapter.query"))
    return lr, 0.0 if no_wd else 1.0


MATRICES = {"vision.conv1.weight", "vision.positional_embedding", "adapter.query", "adapter.proj",
            "adapter.kv_proj.weight", "adapter.linear_q.weight", "adapter.linear_k.weight",
            "adapter.linear_v.weight", "adapter.linear_proj.weight", "language.embedding.word_embeddings.weight",
            "language.output_layer.weight"}


def _is_matrix(name):
    return name in MATRICES or (".layers." in name and name.endswith(
        ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")))


def test_param_groups_have_the_exact_multipliers(single):
    groups = single[1]["groups"]
    assert len(groups) == 62
    for name, (lr_mult, wd_mult, max_lr, min_lr) in groups.items():
        exp_lr, exp_wd = _expected_group(name, _is_matrix(name))
        assert lr_mult == pytest.approx(exp_lr, rel=1e-12), name
        assert wd_mult == exp_wd, name
        assert max_lr == pytest.approx(LR * exp_lr, rel=1e-12) and min_lr == pytest.approx(1e-5 * exp_lr, rel=1e-12), name


def test_schedule_is_warmup_then_cosine_per_group(single):
    warmup, total, lr, min_lr = 3, 10, 1e-3, 1e-5
    for step, groups in enumerate(single[1]["lrs"]):
        if step <= warmup:
            base = lr * step / warmup
        elif step > total:
            base = min_lr
        else:
            ratio = (step - warmup) / (total - warmup)
            base = min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)
        assert len(groups) >= 4
        for mult, got, wd in groups:  # each group: the global curve scaled by its multiplier
            assert got == pytest.approx(base * mult, rel=1e-9), (step, mult)
            assert wd in (0.0, pytest.approx(0.05, rel=1e-12))


def test_parameter_count_formula_matches_the_model(single):
    assert single[1]["numel"] == single[1]["counted"]


# --------------------------------------------------------------------------------- resume / relayout
def test_resume_reproduces_the_uninterrupted_run(multi):
    r = multi[1]["resume"]
    assert [h[0] for h in r["full"]] == [1, 2, 3, 4]
    assert r["first"] + r["second"] == r["full"], "per-step loss, grad norm and LR must be identical"
    assert r["consumed"] == [32, 16, 32]
    assert r["markers"] == [4, 4]


def test_checkpoint_loads_under_other_layouts(multi):
    out, res = multi
    rel = res["relayout"]
    for name in ("tp2", "pp2"):
        assert rel[name]["iteration"] == 4 and rel[name]["scheduler_steps"] == 4
        assert rel[name]["loss"] == pytest.approx(rel["dp2"]["loss"], rel=1e-6), name
    ref = torch.load(out / "relayout_dp2.pt")
    for name in ("tp2", "pp2"):  # optimizer state resharded: the next update agrees too
        got = torch.load(out / f"relayout_{name}.pt")
        for key in ref:
            assert (got[key] - ref[key]).abs().max().item() <= 1e-6, (name, key)
