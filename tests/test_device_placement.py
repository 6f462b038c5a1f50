"""The GPU path, checked on a CPU: faults that only CUDA, NCCL or Transformer Engine would show.

- `device_discipline("meta")` makes `meta` the stand-in GPU: whatever a GPU run would leave in host memory
  shows up on the CPU (any model size, also one rank of a 7B TP8 x PP4 job through torch's fake process group).
- `device_discipline("cpu")` keeps the numerics real and puts every tensor created without a device on
  `meta`: using one beside device tensors, in a collective or with `.item()` fails, as on a GPU. The trainer
  workers of test_train_parallel.py run whole under it too.
- Transformer Engine's contracts that local layers do not enforce (dense linear inputs) are enforced by
  stand-ins, and the per-machine defaults (fusions) are checked against what Megatron-LM does on GPUs.
"""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

from qwenvl_megatron.models.config import tiny
from qwenvl_megatron.models.parallel import FUSIONS, ParallelPlan
from qwenvl_megatron.runtime import HostTensorError, device_discipline, initialize, misplaced_tensors
from qwenvl_megatron.training.optimizer import OptimizerSettings, build_optimizer, freeze
from qwenvl_megatron.training.step import build_model, forward_backward, unwrap

HERE = os.path.dirname(os.path.abspath(__file__))
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
