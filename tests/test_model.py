"""The Megatron Qwen-VL in one process: parity with the independent reference, sizes of the 7B model,
and the errors a user gets for shapes that cannot work."""
import pytest
import torch

import reference_qwenvl as R
from qwenvl_megatron.convert.hf_layout import hf_to_model
from qwenvl_megatron.convert.sharding import load_full_state_dict
from qwenvl_megatron.models.config import QwenVLConfig, qwen_vl_7b, tiny
from qwenvl_megatron.models.parallel import ParallelPlan
from qwenvl_megatron.models.qwen_vl import ImageSpanError, QwenVLModel, parameter_counts
from qwenvl_megatron.runtime import initialize


@pytest.fixture(scope="module")
def tiny_pair():
    initialize(1, 1)
    hfc = R.tiny_hf_config()
    cfg = QwenVLConfig.from_hf_config(hfc)
    sd = R.random_hf_state_dict(hfc, seed=1)
    ref = R.ReferenceQwenVL(hfc)
    ref.load_state_dict(sd)
    model = QwenVLModel(cfg, ParallelPlan())
    load_full_state_dict(model, hf_to_model(sd, cfg))
    return cfg, ref.eval(), model.eval()


def with_images(cfg, counts, seq=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = cfg.adapter.num_queries, cfg.image_start_id
    ids = torch.randint(0, s - 5, (len(counts), seq), generator=g)
    for r, k in enumerate(counts):
        for j in range(k):
            p = 1 + j * (q + 3)
            ids[r, p], ids[r, p + 1: p + 1 + q], ids[r, p + 1 + q] = s, s + 2, s + 1
    return ids


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("counts", [[0, 0], [1, 0], [2, 1]], ids=["no_image", "one_image", "two_plus_one"])
def test_logits_match_reference(tiny_pair, size, counts):
    cfg, ref, model = tiny_pair
    ids = with_images(cfg, counts)
    n = sum(counts)
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5)) if n else None
    with torch.no_grad():
        diff = (model(ids, images) - ref(ids, images)).abs().max().item()
    assert diff <= 1e-4


def test_7b_parameter_counts_on_meta_device(capsys):
    initialize(1, 1)
    with torch.device("meta"):
        model = QwenVLModel(qwen_vl_7b(), ParallelPlan())
    counts = parameter_counts(model)
    print(f"qwen-vl-7b parameters: ViT {counts['vit']/1e9:.3f}B, adapter {counts['adapter']/1e9:.3f}B, "
          f"LLM {counts['llm']/1e9:.3f}B")
    assert counts == R.param_counts(R.hf_config())
    assert round(counts["vit"] / 1e9, 1) == 1.9 and round(counts["adapter"] / 1e9, 2) == 0.08
    assert round(counts["llm"] / 1e9, 1) == 7.7


def test_hf_config_round_trip():
    for cfg in (tiny(), qwen_vl_7b(), QwenVLConfig.from_hf_config(R.tiny_hf_config())):
        assert QwenVLConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert qwen_vl_7b().to_hf_config()["intermediate_size"] == 22016


def test_text_only_batch_keeps_vision_in_graph(tiny_pair):
    cfg, _, model = tiny_pair
    model.train()
    try:
        ids = with_images(cfg, [0, 0])
        loss = model(ids, None, torch.roll(ids, -1, 1)).sum()
        loss.backward()
        assert model.vision.conv1.weight.grad is not None
        assert model.adapter.query.grad is not None
        assert model.vision.conv1.weight.grad.abs().sum() == 0  # zero-weighted: no effect on the update
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_image_span_errors(tiny_pair):
    cfg, _, model = tiny_pair
    ids = with_images(cfg, [1, 0])
    img = torch.randn(1, 3, 224, 224)
    with pytest.raises(ImageSpanError, match="2 images"):
        model(ids, torch.cat([img, img]))
    short = ids.clone()
    short[0, 1 + cfg.adapter.num_queries] = cfg.image_end_id  # a span one shorter than the adapter's queries
    with pytest.raises(ImageSpanError, match="num-image-tokens"):
        model(short, img)
    with pytest.raises(ImageSpanError, match="no images"):
        model(ids, None)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(ids, torch.randn(1, 3, 100, 100))


@pytest.mark.parametrize("plan,cfg_change,match", [
    (dict(tensor_parallel=3), {}, "tensor-model-parallel-size 3 does not divide llm.num_attention_heads"),
    (dict(pipeline_parallel=4), dict(llm={"num_layers": 6}), "--decoder-first-pipeline-num-layers"),
    (dict(pipeline_parallel=3, first_stage_layers=1), dict(llm={"num_layers": 6}), "not divisible by the other 2"),
    (dict(tensor_parallel=2, sequence_parallel=True), {}, "--sequence-parallel needs --transformer-impl te"),
    (dict(recompute=("decoder",)), {}, "--recompute"),
])
def test_bad_parallel_plans_name_the_flag(plan, cfg_change, match):
    cfg = tiny().replace(**cfg_change) if cfg_change else tiny()
    with pytest.raises(ValueError, match=match):
        ParallelPlan(**plan).validate(cfg)


def test_bad_model_shapes_name_the_field():
    with pytest.raises(ValueError, match="vit.image_size=100 is not a multiple of vit.patch_size=14"):
        tiny().replace(vit={"image_size": 100})
    with pytest.raises(ValueError, match="adapter.num_queries=15 must be a square"):
        tiny().replace(adapter={"num_queries": 15})


def test_vocab_padding_is_tp_independent_and_masked(tiny_pair):
    from qwenvl_megatron.models.parallel import padded_vocab_size
    assert {padded_vocab_size(151936, tp) for tp in (1, 2, 4, 8)} == {152576}
    assert padded_vocab_size(151936, 16) % (128 * 16) == 0
    cfg, _, model = tiny_pair
    assert model.language.padded_vocab_size > cfg.llm.vocab_size
    with torch.no_grad():
        logits = model(with_images(cfg, [0]))
    assert logits.shape[-1] == cfg.llm.vocab_size  # users see HF sizes


def test_fresh_adapter_position_table_is_the_hf_sincos_table():
    """A freshly initialised adapter (stage-1 init) carries the same fixed table the HF release stores."""
    from qwenvl_megatron.models.adapter import sincos_2d
    for dim, grid in ((64, 4), (4096, 16)):
        assert torch.equal(sincos_2d(dim, grid), R.sincos_2d(dim, grid).float())


def test_per_token_loss_matches_reference_cross_entropy(tiny_pair):
    """The loss path sends only supervised positions through the LM head; every position's loss must equal
    the cross-entropy of the reference's full logits, and be exactly 0 where the target is ignored."""
    cfg, ref, model = tiny_pair
    ids = with_images(cfg, [1, 0, 2], seq=48)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[:, :4] = -100
    targets[ids == cfg.image_start_id + 2] = -100
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss = model(ids, images, targets)
        logits = ref(ids, images)
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    assert loss.shape == targets.shape
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert (loss[targets == -100] == 0).all() and (loss[targets != -100] > 0).all()
    # A microbatch with nothing supervised: zero loss, and backward still reaches the LM head.
    nothing = model(ids, images, torch.full_like(targets, -100))
    assert nothing.shape == targets.shape and nothing.abs().sum() == 0
    nothing.sum().backward()
    head = model.language.output_layer.weight
    assert head.grad is not None and head.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("frozen", [("vit",), ("llm",)], ids=["stage3_vit_frozen", "stage1_llm_frozen"])
def test_recompute_gives_the_same_gradients_with_frozen_parts(frozen):
    """Full recompute of every part is megatron's reentrant checkpoint: a block whose input needs no grad
    (the adapter after a frozen ViT) must still give its own parameters their gradients."""
    from qwenvl_megatron.training.optimizer import freeze
    from qwenvl_megatron.training.step import build_model, forward_backward, unwrap

    cfg = tiny()
    ids = with_images(cfg, [1, 2], seq=48)
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, cfg.image_start_id - 5, ids.shape, generator=g)
    targets[ids >= cfg.image_start_id] = -100
    batch = {"input_ids": ids, "targets": targets,
             "images": torch.randn(3, 3, cfg.vit.image_size, cfg.vit.image_size, generator=g)}
    grads = []
    for recompute in ((), ("vit", "adapter", "llm")):
        initialize(1, 1, seed=4)
        model = build_model(cfg, ParallelPlan(recompute=recompute), freeze=lambda m: freeze(m, frozen))
        forward_backward(model, [batch], 1, 48, 2)
        grads.append({n: p.main_grad.clone() for n, p in unwrap(model[0]).named_parameters() if p.requires_grad})
    assert sorted(grads[0]) == sorted(grads[1])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name
    assert any(n.startswith("adapter.linear_q") and grads[1][n].abs().sum() > 0 for n in grads[1])
