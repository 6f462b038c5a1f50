"""The GPU path, checked on a CPU: faults that only CUDA, NCCL or Transformer Engine would show.

- `device_discipline("meta")` makes `meta` the stand-in GPU: whatever a GPU run would leave in host memory
  shows up on the CPU (any model size, also one rank of a 7B TP8 x PP4 job through torch's fake process group).
- `device_discipline("cpu")` keeps the numerics real and puts every tensor created without a device on
  `meta`: using one beside device tensors, in a collective or with `.item()` fails, as on a GPU. The trainer
  workers of test_train_parallel.py run whole under it too.
- Transformer Engine's contracts that local layers do not enforce (dense linear inputs, extra state in
  checkpoints) are enforced by stand-ins, and the per-machine defaults (fusions) are checked against what
  Megatron-LM does on GPUs.
- Tensor-parallel ranks share the image decoding (tests/workers/tp_images.py, under discipline too).
"""
import json
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention

from qwenvl_megatron.models.config import tiny
from qwenvl_megatron.models.parallel import FUSIONS, ParallelPlan
from qwenvl_megatron.runtime import HostTensorError, device_discipline, initialize, misplaced_tensors
from qwenvl_megatron.training import checkpoint as ckpt
from qwenvl_megatron.training.optimizer import OptimizerSettings, build_optimizer, build_scheduler, freeze
from qwenvl_megatron.training.step import build_model, forward_backward, unwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "workers"))
import train_common as T  # noqa: E402
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
SEQ = 48


def _fake_rank(*args) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "workers", "fake_rank.py"), *args],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _batches(cfg, n=2, mbs=2, seed=0):
    """Host microbatches (as the loader's threads make them): text + one image span per sample."""
    with torch.device("cpu"):
        g = torch.Generator().manual_seed(seed)
        q, s_id, size = cfg.adapter.num_queries, cfg.image_start_id, cfg.vit.image_size
        out = []
        for _ in range(n):
            ids = torch.randint(0, s_id - 5, (mbs, SEQ), generator=g)
            ids[:, 1], ids[:, 2:2 + q], ids[:, 2 + q] = s_id, s_id + 2, s_id + 1
            tgt = torch.randint(0, s_id - 5, (mbs, SEQ), generator=g)
            tgt[:, : q + 3] = -100
            out.append({"input_ids": ids, "targets": tgt, "images": torch.randn(mbs, 3, size, size, generator=g)})
        return out


# --------------------------------------------------------------------------- 1. the model reaches the GPU
@pytest.mark.parametrize("frozen", [("llm",), ("vit",)], ids=["stage1_llm_frozen", "stage3_vit_frozen"])
def test_every_tensor_of_the_model_is_built_on_the_device(frozen):
    """Frozen parts (no DDP gradient buffer), conv1, the position tables, the adapter's sin-cos buffer and
    RoPE's frequencies must all be on the GPU, and megatron's optimizer must accept the parameters."""
    initialize(1, 1)
    cfg = tiny()
    with device_discipline("meta") as dev:
        model = build_model(cfg, ParallelPlan(), freeze=lambda m: freeze(m, frozen))
        assert misplaced_tensors(model[0], dev) == []
        assert {str(b.grad_data.device) for b in model[0].buffers} == {"meta"}
        frozen_names = [n for n, p in unwrap(model[0]).named_parameters() if not p.requires_grad]
        assert frozen_names and all(p.device == dev for p in unwrap(model[0]).parameters())
        optimizer = build_optimizer(model, cfg, OptimizerSettings())  # megatron asserts CUDA-typed params
        assert all(p.device == dev for g in optimizer.param_groups for p in g["params"])


def test_misplaced_tensors_names_what_is_left_on_the_host():
    initialize(1, 1)
    with device_discipline("meta"):
        model = build_model(tiny(), ParallelPlan(), wrap_ddp=False)[0]
    model.register_buffer("stray", torch.zeros(3, device="cpu"))
    rope = model.language.rotary_pos_emb
    rope.inv_freq = torch.empty_like(rope.inv_freq, device="cpu")
    assert misplaced_tensors(model, "meta") == ["stray (cpu)", "language.rotary_pos_emb.inv_freq (cpu)"]


@pytest.mark.parametrize("rank,frozen,distopt", [(0, "llm", False), (31, "vit", True)],
                         ids=["first_stage_stage1", "last_stage_stage3_distopt"])
def test_a_7b_rank_of_tp8_pp4_is_placed_on_the_device(rank, frozen, distopt):
    """One rank of a 32-GPU job, built by the trainer's builder (DDP included) on one CPU process."""
    got = _fake_rank("placement", "--world", "32", "--tp", "8", "--pp", "4", "--rank", str(rank),
                     "--model", "qwen-vl-7b", "--freeze", frozen, *(["--distopt"] if distopt else []))
    assert "error" not in got, got.get("error")
    assert got["misplaced"] == [] and got["grad_buffers"] == ["meta"]
    first = rank == 0
    assert got["has_vision"] is first and got["has_head"] is (not first)
    assert got["params"] == (545_629_696 if first else 280_576_000)  # this rank's share of the 7B


# ------------------------------------------------------------------- 2. no host tensor in a collective
def test_a_collective_refuses_a_host_tensor():
    initialize(1, 1)
    with device_discipline("cpu") as dev:
        with pytest.raises(HostTensorError, match="all_reduce got a tensor"):
            dist.all_reduce(torch.zeros(2))  # created without a device: host memory on a GPU machine
        t = torch.ones(2, device="cuda")  # what megatron asks for lands on the stand-in device
        dist.all_reduce(t)
        assert t.device == dev and t.tolist() == [1.0, 1.0]


def test_the_finite_check_of_a_fully_frozen_stage_reduces_on_the_device(monkeypatch):
    """Stage 1 under PP > 1: the LLM-only stages have no gradient buffer and no optimizer state, yet join the
    all-reduce of the gradient norm (the trainer's finite check) with a tensor on the device."""
    from qwenvl_megatron.models.parallel import PARTS
    from qwenvl_megatron.training.train import optimizer_update

    class Reduced(Exception):
        pass

    def all_reduce(t, **kwargs):
        raise Reduced(t.device)

    initialize(1, 1)
    with device_discipline("meta") as dev:
        model = build_model(tiny(), ParallelPlan(), freeze=lambda m: freeze(m, PARTS))
        assert model[0].buffers == []
        optimizer = build_optimizer(model, tiny(), OptimizerSettings())
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        with pytest.raises(Reduced) as got:
            optimizer_update(optimizer)
    assert got.value.args[0] == dev


def test_a_training_step_keeps_its_tensors_on_the_device():
    """The schedule, the loss bookkeeping and the optimizer under discipline: same numbers as without."""
    cfg = tiny()
    batches = _batches(cfg)
    results = []
    for disciplined in (False, True):
        initialize(1, 1, seed=11)
        with (device_discipline("cpu") if disciplined else torch.device("cpu")):
            model = build_model(cfg, ParallelPlan())
            optimizer = build_optimizer(model, cfg, OptimizerSettings(lr=1e-3))
            loss, tokens = forward_backward(model, batches, len(batches), SEQ, 2)
            ok, grad_norm, _ = optimizer.step()
            results.append((loss, tokens, ok, grad_norm,
                            [p.detach().clone() for p in unwrap(model[0]).parameters()]))
    (l0, n0, ok0, g0, p0), (l1, n1, ok1, g1, p1) = results
    assert ok0 and ok1 and n0 == n1 > 0
    assert l0 == l1 and g0 == g1
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


def test_the_trainer_saves_and_resumes_under_discipline(tmp_path):
    """train.main end to end (loader, stop flag, finite checks, checkpoint save and load)."""
    argv = ["--model", "tiny", "--mock-data", "--image-size", "56", "--seq-length", "48", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
            "--save", str(tmp_path), "--train-iters", "3"]

    def run(*extra):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "workers", "disciplined_train.py"), *argv, *extra],
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["history"]

    first, second = run("--exit-interval", "2"), run("--load", str(tmp_path))
    assert [h[0] for h in first] == [1, 2] and [h[0] for h in second] == [3]
    assert all(torch.isfinite(torch.tensor(h[1])) for h in first + second)


def test_generation_keeps_its_tensors_on_the_device():
    from qwenvl_megatron.inference.runner import Prompt, generate_all
    initialize(1, 1, seed=3)
    cfg = tiny()
    tok = types.SimpleNamespace(eod_id=1, im_end_id=2)
    prompts = [Prompt([5, 6, 7, 8], []), Prompt([9, 10, 11, 12], []), Prompt([3, 4], [])]
    answers = {}
    for disciplined in (False, True):
        torch.manual_seed(0)
        with (device_discipline("cpu") if disciplined else torch.device("cpu")):
            model = build_model(cfg, ParallelPlan(), wrap_ddp=False)[0]
            answers[disciplined] = generate_all(model, cfg, tok, prompts, max_new_tokens=3)
    assert [a.tokens for a in answers[True]] == [a.tokens for a in answers[False]]
    assert all(len(a.tokens) > 0 for a in answers[True])


# --------------------------------------------------- 3. the adapter's inputs fit Transformer Engine
class _DenseInputColumnLinear:
    """megatron's column-parallel linear with TE's contract: the input is flattened with `.view`."""

    def __new__(cls, *args, **kwargs):
        from megatron.core.tensor_parallel import ColumnParallelLinear

        class DenseOnly(ColumnParallelLinear):
            def forward(self, input_, *a, **k):
                input_.view(-1, input_.shape[-1])  # what transformer_engine.pytorch.Linear does first
                return super().forward(input_, *a, **k)

        return DenseOnly(*args, **kwargs)


def test_adapter_inputs_are_dense_for_te_linear_layers():
    """Several images per microbatch: TE's `.view(-1, in)` fails on an expanded (strided) input."""
    from qwenvl_megatron.models.adapter import VisionLanguageAdapter
    from qwenvl_megatron.models.specs import adapter_spec
    from qwenvl_megatron.runtime import backend_provider

    initialize(1, 1, seed=2)
    cfg = tiny()
    plan = ParallelPlan()
    spec = adapter_spec(backend_provider("local"))
    torch.manual_seed(0)
    local = VisionLanguageAdapter(cfg.adapter, cfg.vit.width, plan.adapter_config(cfg), spec)
    spec.linear_q = spec.linear_k = spec.linear_v = _DenseInputColumnLinear
    strict = VisionLanguageAdapter(cfg.adapter, cfg.vit.width, plan.adapter_config(cfg), spec)
    strict.load_state_dict(local.state_dict())
    x = torch.randn(64, 3, cfg.vit.width)  # 8x8 patches, 3 images
    out = strict(x)
    assert out.shape == (3, cfg.adapter.num_queries, cfg.llm.hidden_size)
    assert torch.equal(out, local(x))


# ------------------------------------------------------- 4. sequence parallelism is the LLM's alone
def test_sequence_parallel_stays_out_of_the_vit_and_the_adapter():
    """Under TP2 + SP the ViT and adapter get whole inputs: no SP in their configs, and no parameter
    marked for megatron's extra SP gradient all-reduce (local layers refuse SP outright)."""
    got = _fake_rank("sequence-parallel", "--world", "2", "--tp", "2", "--model", "qwen-vl-7b")
    assert "error" not in got, got.get("error")
    assert got["llm_sp"] is True
    assert got["sp_marked"] == []
    plan = ParallelPlan(tensor_parallel=2, sequence_parallel=True, impl="te")
    assert not plan.vit_config(tiny()).sequence_parallel and not plan.adapter_config(tiny()).sequence_parallel


# ------------------------------------------- 5. TE and local checkpoints load into each other
# Transformer Engine cannot run here, so `te_like` turns a local model into a faithful stand-in: the
# modules that a TE build makes TE modules (linears, standalone norms, core attention; not the fused
# input/pre-MLP norms, the embedding or the output layer) get TE's extra state. Like TE 2.x it is a uint8
# tensor (empty when there is no FP8 metadata), `set_extra_state` ignores None / empty, and megatron wraps
# it in a ShardedObject through `make_sharded_tensors_for_checkpoint`, except for core attention, whose
# `sharded_state_dict` leaves it out (as megatron's TEDotProductAttention does).

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


# ---------------------------------------- a demo checkpoint never resumes a cluster run (other model config)
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


# ------------------------------------------------------------- 6. fused kernels where the GPU has them
def _plan_fusions(argv, monkeypatch, available):
    from qwenvl_megatron.runtime import layer_impl
    from qwenvl_megatron.training.arguments import parse_args
    from qwenvl_megatron.training.layout import parallel_plan
    monkeypatch.setattr(layer_impl, "available_fusions", lambda: frozenset(available))
    return parallel_plan(parse_args(["--stage", "2", "--dry-run", "--model", "tiny", *argv])).fusions


def test_no_fused_kernel_on_a_cpu():
    from qwenvl_megatron.runtime.layer_impl import available_fusions
    assert available_fusions() == frozenset()
    plan = ParallelPlan()
    for config in (plan.llm_config(tiny()), plan.vit_config(tiny()), plan.adapter_config(tiny())):
        assert not any(getattr(config, name) for name in FUSIONS)


def test_gpu_kernels_turn_on_megatron_lm_defaults(monkeypatch):
    """What a GPU machine gets: every fusion whose kernel is there (TE: RoPE; apex: persistent LayerNorm,
    softmax, wgrad accumulation), none otherwise."""
    from qwenvl_megatron.runtime import layer_impl
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for have_te, have_apex, expect in (
            (True, True, set(FUSIONS)),
            (True, False, {"bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion"}),
            (False, False, {"bias_activation_fusion", "bias_dropout_fusion"})):
        layer_impl.available_fusions.cache_clear()
        monkeypatch.setattr(layer_impl, "have_transformer_engine", lambda: have_te)
        monkeypatch.setattr(layer_impl, "have_apex", lambda: have_apex)
        monkeypatch.setattr(layer_impl, "_has_module", lambda name: have_apex)
        assert layer_impl.available_fusions() == expect
    layer_impl.available_fusions.cache_clear()


def test_each_fusion_has_megatron_lm_flag_to_turn_it_off(monkeypatch):
    from qwenvl_megatron.training.arguments import FUSION_FLAGS
    assert _plan_fusions([], monkeypatch, FUSIONS) == frozenset(FUSIONS)
    for flag, fusion in FUSION_FLAGS.items():
        assert _plan_fusions([flag], monkeypatch, FUSIONS) == frozenset(FUSIONS) - {fusion}, flag
    assert set(FUSION_FLAGS.values()) == set(FUSIONS)


def test_the_vit_keeps_exact_gelu_when_swiglu_fusion_is_on():
    """megatron's fused bias-GELU is the tanh approximation; the release's ViT uses the erf GELU."""
    plan = ParallelPlan(fusions=frozenset({"bias_activation_fusion", "bias_dropout_fusion"}))
    assert plan.llm_config(tiny()).bias_activation_fusion and plan.llm_config(tiny()).bias_dropout_fusion
    assert not plan.vit_config(tiny()).bias_activation_fusion and plan.vit_config(tiny()).bias_dropout_fusion


# ------------------------------ 7. tensor-parallel ranks share the image decoding (tests/workers/tp_images.py)
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
