"""Flags, stage presets, the dry-run plan and its refusals, and the loader's cut/pad/shift and
DP-independent, resumable order (all in-process, no torch.distributed)."""
import io

import numpy as np
import pytest
import torch

from qwenvl_megatron.data.loader import MicroBatchLoader, MockLoader, fit_sample
from qwenvl_megatron.models.config import qwen_vl_7b
from qwenvl_megatron.training.arguments import parse_args, parse_blend
from qwenvl_megatron.training.layout import LayoutError, estimate_memory, part_parameters, plan_layout
from qwenvl_megatron.training.train import main


def test_stage_presets_follow_the_paper():
    s1 = parse_args(["--stage", "1", "--dry-run"])
    assert (s1.freeze, s1.image_size, s1.seq_length, s1.lr, s1.min_lr, s1.lr_warmup_iters, s1.train_iters,
            s1.global_batch_size, s1.vit_lr_decay) == (("llm",), 224, 512, 2e-4, 1e-6, 500, 50_000, 30_720, 0.95)
    assert s1.model_cfg.vit.image_size == 224
    s2 = parse_args(["--stage", "2", "--dry-run"])
    assert (s2.freeze, s2.image_size, s2.seq_length, s2.lr, s2.min_lr, s2.lr_warmup_iters, s2.train_iters,
            s2.global_batch_size) == ((), 448, 2048, 5e-5, 1e-5, 400, 19_000, 4096)
    s3 = parse_args(["--stage", "3", "--dry-run"])
    assert (s3.freeze, s3.lr, s3.min_lr, s3.lr_warmup_iters, s3.train_iters, s3.global_batch_size) == \
        (("vit",), 1e-5, 1e-6, 3000, 8000, 128)


def test_explicit_flags_override_the_preset():
    a = parse_args(["--stage", "1", "--dry-run", "--lr", "1e-3", "--global-batch-size", "64", "--freeze", "",
                    "--image-size", "112", "--model", "tiny", "--recompute", "vit,llm"])
    assert (a.lr, a.global_batch_size, a.freeze, a.image_size, a.min_lr) == (1e-3, 64, (), 112, 1e-6)
    assert a.recompute == ("vit", "llm") and a.model_cfg.vit.image_size == 112
    assert parse_args(["--stage", "2", "--dry-run", "--recompute-activations"]).recompute == ("vit", "adapter", "llm")
    with pytest.raises(SystemExit, match="unknown part"):
        parse_args(["--stage", "1", "--dry-run", "--freeze", "vision"])
    with pytest.raises(SystemExit, match="--train-iters is required"):
        parse_args(["--dry-run", "--global-batch-size", "8"])


def test_blend_weights():
    assert parse_blend(["0.7", "a/x", "0.3", "b/y"]) == (["a/x", "b/y"], [0.7, 0.3])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(SystemExit, match="pairs"):
        parse_blend(["0.7", "a", "0.3"])
    with pytest.raises(SystemExit, match="mix of weights and paths"):
        parse_blend(["a", "0.3"])


def test_dry_run_refusals_name_the_fix():
    a = parse_args(["--stage", "1", "--dry-run", "--micro-batch-size", "7"])
    with pytest.raises(LayoutError) as e:
        plan_layout(a, 256)
    assert ("--global-batch-size 30720 is not divisible by --micro-batch-size 7 x data-parallel size 256 = 1792; "
            "valid --micro-batch-size values for DP 256: [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24, 30, 40, 60, 120]"
            ) in str(e.value)
    with pytest.raises(LayoutError, match="not divisible by the data-parallel size 100 .*no --micro-batch-size"):
        plan_layout(parse_args(["--stage", "2", "--dry-run"]), 100)
    with pytest.raises(LayoutError, match="world size 6 is not divisible by TP 4 x PP 1"):
        plan_layout(parse_args(["--stage", "2", "--dry-run", "--tensor-model-parallel-size", "4"]), 6)
    with pytest.raises(LayoutError, match="does not divide llm.num_attention_heads=32"):
        plan_layout(parse_args(["--stage", "2", "--dry-run", "--tensor-model-parallel-size", "3"]), 6)
    with pytest.raises(SystemExit, match="impossible layout"):
        main(["--stage", "1", "--dry-run", "--world-size", "256", "--micro-batch-size", "7"])


def test_dry_run_plan(capsys):
    main(["--stage", "1", "--dry-run", "--world-size", "256", "--micro-batch-size", "8", "--bf16",
          "--use-distributed-optimizer"])
    out = capsys.readouterr().out
    assert "world 256 = TP 1 x PP 1 x DP 256" in out
    assert "global 30720 = micro 8 x DP 256 x 15 microbatches per step" in out
    assert "30720 samples, 15,728,640 tokens (seq 512)" in out
    assert "frozen: llm" in out


def test_parameter_counts_and_memory_of_the_7b_plan():
    c = part_parameters(qwen_vl_7b())
    llm = 32 * c["llm_layer"] + c["embedding"] + c["head"] + c["final_norm"]
    assert 7.6e9 < llm < 7.8e9 and 1.8e9 < c["vit"] < 1.95e9 and 0.07e9 < c["adapter"] < 0.1e9
    a = parse_args(["--stage", "1", "--dry-run", "--bf16", "--use-distributed-optimizer"])
    (stage,) = estimate_memory(a, plan_layout(a, 256))
    assert stage["params"] == c["vit"] + c["adapter"] + llm
    assert stage["trainable"] == c["vit"] + c["adapter"]  # stage 1: the LLM is frozen
    assert stage["weights"] == 2 * stage["params"] and stage["grads"] == 4 * stage["trainable"]
    assert stage["optimizer"] == 12 * stage["trainable"] // 256
    two = parse_args(["--stage", "2", "--dry-run", "--bf16", "--tensor-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "2"])
    first, last = estimate_memory(two, plan_layout(two, 8))
    assert first["llm_layers"] == last["llm_layers"] == 16 and first["params"] > last["params"]


# ---------------------------------------------------------------------------------------------- loader
def test_fit_sample_pads_truncates_and_shifts():
    tokens = np.arange(10, 16)
    labels = np.array([-100, -100, 12, 13, 14, 15])
    ids, tgt, kept = fit_sample(tokens, labels, seq_length=8, pad_id=0, image_start_id=1000, num_image_tokens=2)
    assert ids.tolist() == [10, 11, 12, 13, 14, 15, 0, 0]
    assert tgt.tolist() == [-100, 12, 13, 14, 15, -100, -100, -100] and kept == 0
    long = np.arange(100, 120)
    ids, tgt, _ = fit_sample(long, long, 8, 0, 1000, 2)
    assert ids.tolist() == list(range(100, 108)) and tgt.tolist() == list(range(101, 109))
    # <img> p p </img> at 2..5 fits in 8 input positions; a second span at 6 would not: cut before it.
    t = np.array([1, 2, 1000, 1002, 1002, 1001, 1000, 1002, 1002, 1001, 7])
    ids, tgt, kept = fit_sample(t, t, 8, 0, 1000, 2)
    assert kept == 1 and ids.tolist() == [1, 2, 1000, 1002, 1002, 1001, 0, 0]
    assert tgt.tolist() == [2, 1000, 1002, 1002, 1001, -100, -100, -100]


class _Sample:
    def __init__(self, tokens, labels, images):
        self.tokens, self.labels, self.images = tokens, labels, images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from PIL import Image

    from qwenvl_megatron.data.indexed import IndexedDatasetWriter
    prefix = str(tmp_path_factory.mktemp("loader") / "ds")
    rng = np.random.default_rng(1)
    with IndexedDatasetWriter(prefix) as w:
        for i in range(23):
            k = i % 3  # 0, 1 or 2 images
            t = [5, 6]
            for _ in range(k):
                t += [1000, 1002, 1002, 1001]
            t += list(rng.integers(0, 900, 3 + i % 4))
            blobs = []
            for j in range(k):
                buf = io.BytesIO()
                Image.new("RGB", (20 + i, 16), (10 * i, 7 * j, 100)).save(buf, format="PNG")
                blobs.append(buf.getvalue())
            w.add(_Sample(np.array(t), np.array(t), ["x"] * k), blobs)
    return prefix


class _TagTransform:
    """Stands in for ImageTransform: one 'image' per blob whose pixels say which blob it was."""

    def __call__(self, blobs):
        return torch.stack([torch.full((3, 2, 2), float(len(b))) for b in blobs])


def _loader(prefix, mbs, rank, dp):
    return MicroBatchLoader([prefix], mbs, 16, _TagTransform(), 0, 1000, 2, seed=3, data_parallel_rank=rank,
                            data_parallel_size=dp)


def _rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b["input_ids"]]


def test_loader_is_dp_independent_and_resumable(dataset):
    one = _loader(dataset, 8, 0, 1).global_batch(8, 1)
    ranks = [_loader(dataset, 2, r, 2).global_batch(8, 2) for r in range(2)]
    # Global micro step k = rank 0's k-th microbatch then rank 1's: the same 8 samples in order.
    interleaved = [row for k in range(2) for r in range(2) for row in _rows([ranks[r][k]])]
    assert interleaved == _rows(one)
    it = _loader(dataset, 2, 1, 2).iterate(0, 2, 8)
    next(it)
    assert _rows(next(it)) == _rows(ranks[1])  # the 2nd global batch equals a fresh start at consumed=8


def test_loader_stacks_images_in_span_order(dataset):
    from qwenvl_megatron.data.indexed import IndexedDataset
    loader = _loader(dataset, 4, 0, 1)
    ds = IndexedDataset(dataset)
    for k in range(3):
        batch = loader.microbatch(0, k)
        _, sample_ids = loader.sample_ids(0, k)
        expected = [float(len(b)) for i in sample_ids.tolist() for b in ds[i][2]]
        n_spans = int((batch["input_ids"] == 1000).sum())
        got = [] if batch["images"] is None else batch["images"][:, 0, 0, 0].tolist()
        assert got == expected and n_spans == len(expected)


def test_mock_loader_is_dp_independent():
    one = MockLoader(4, 24, 1024, 28, 1000, 4, seed=2).global_batch(4, 1)
    two = [MockLoader(2, 24, 1024, 28, 1000, 4, seed=2, data_parallel_rank=r, data_parallel_size=2).global_batch(4, 1)
           for r in range(2)]
    assert torch.equal(torch.cat([two[0][0]["input_ids"], two[1][0]["input_ids"]]), one[0]["input_ids"])
    assert torch.equal(torch.cat([two[0][0]["images"], two[1][0]["images"]]), one[0]["images"])


def test_init_method_std_reaches_every_part():
    from qwenvl_megatron.models.config import tiny
    from qwenvl_megatron.training.layout import parallel_plan
    plan = parallel_plan(parse_args(["--stage", "2", "--dry-run", "--init-method-std", "0.125"]))
    cfg = tiny()
    assert [c.init_method_std for c in (plan.llm_config(cfg), plan.vit_config(cfg), plan.adapter_config(cfg))] \
        == [0.125] * 3
    assert parallel_plan(parse_args(["--stage", "2", "--dry-run"])).init_std == 0.02  # Megatron-LM's default


# ------------------------------------------------------------------------------------ dry run: GPU plan
STAGE1_256 = ["--stage", "1", "--dry-run", "--world-size", "256", "--micro-batch-size", "8", "--bf16",
              "--use-distributed-optimizer"]


def test_dry_run_assumes_flash_attention_unless_local():
    def activations(impl):
        a = parse_args(STAGE1_256 + ["--transformer-impl", impl])
        (stage,) = estimate_memory(a, plan_layout(a, 256))
        return stage["activations"]

    assert activations("auto") == activations("te")  # a dry run plans for GPUs: auto is TE there
    # Only local layers keep the attention scores: 5 x heads x s^2 x b (x 2 B / 2) per layer, for the
    # 32 LLM layers at seq 512 and the 48 ViT layers at 16 x 16 = 256 patches (micro batch 8, TP 1, 1 in flight).
    scores = 32 * 5 * 32 * 512 ** 2 * 8 + 48 * 5 * 16 * 256 ** 2 * 8
    assert activations("local") - activations("auto") == scores


def test_dry_run_refuses_sequence_parallel_with_local_layers():
    sp = ["--stage", "2", "--dry-run", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    with pytest.raises(LayoutError, match="--sequence-parallel needs --transformer-impl te"):
        plan_layout(parse_args(sp + ["--transformer-impl", "local"]), 8)
    with pytest.raises(SystemExit, match="impossible layout: --sequence-parallel needs"):
        main(sp + ["--transformer-impl", "local", "--world-size", "8"])
    for impl in ("auto", "te"):  # what the cluster run does
        assert plan_layout(parse_args(sp + ["--transformer-impl", impl]), 8).data_parallel == 4


def _report(capsys, argv):
    main(argv)
    return capsys.readouterr().out.splitlines()


def test_dry_run_says_which_stage_does_not_fit_and_by_how_much(capsys):
    pp2 = ["--stage", "2", "--dry-run", "--world-size", "4", "--pipeline-model-parallel-size", "2", "--bf16"]
    a = parse_args(pp2)
    first, last = [st["total"] / 2 ** 30 for st in estimate_memory(a, plan_layout(a, 4))]
    # Replicated Adam state (12 B) + fp32 grads (4 B) + bf16 weights (2 B) of the first stage's ~5.8B params.
    assert a.gpu_memory_gib == 80 and first > 80 > last

    def verdicts(*extra):
        return [x for x in _report(capsys, pp2 + list(extra)) if x.startswith(("does not fit", "fits"))]

    def over(stage, need, limit):
        return (f"does not fit: stage {stage} needs {need:.2f} GiB per GPU, {need - limit:.2f} GiB over "
                f"--gpu-memory-gib {limit:g}")

    assert verdicts() == [over(0, first, 80)]
    assert verdicts("--gpu-memory-gib", "60") == [over(0, first, 60), over(1, last, 60)]
    assert verdicts("--gpu-memory-gib", "141") == [
        f"fits: every stage within --gpu-memory-gib 141 (largest: stage 0, {first:.2f} GiB)"]
    with pytest.raises(SystemExit, match="--gpu-memory-gib"):
        parse_args(pp2 + ["--gpu-memory-gib", "0"])


def test_dry_run_prints_step_time_and_gpu_hours(capsys):
    from qwenvl_megatron.training.layout import flops_per_sample

    cfg = qwen_vl_7b()
    # Stage 1 by hand: ViT trains (3x forward), adapter trains (3x), the frozen LLM passes gradients back (2x).
    patches, w, fv, h = (224 // 14) ** 2, 1664, int(1664 * 4.9231), 4096
    vit = 2 * patches * 3 * 14 * 14 * w + 48 * (2 * patches * (4 * w * w + 2 * w * fv) + 4 * patches ** 2 * w)
    # kv_proj, k and v on the patches; scores + context; q, out and proj on the 256 query rows
    adapter = 2 * w * h * patches + 4 * h * h * patches + 4 * 256 * patches * h + 3 * 2 * h * h * 256
    llm = 32 * (2 * 512 * (4 * h * h + 3 * h * 11008) + 4 * 512 ** 2 * h / 2) + 2 * h * 151936 * 512
    per_sample = 3 * vit + 3 * adapter + 2 * llm
    assert flops_per_sample(cfg, 512, 224, ("llm",)) == pytest.approx(per_sample, rel=1e-12)
    for mfu, peak in ((0.4, 989.0), (0.25, 400.0)):
        step_s = per_sample * 30720 / (256 * peak * 1e12 * mfu)
        hours = step_s * 50_000 / 3600
        lines = _report(capsys, STAGE1_256 + ["--assumed-mfu", str(mfu), "--peak-tflops", str(peak)])
        assert f"time at MFU {mfu:g} of --peak-tflops {peak:g}: {per_sample * 30720 / 1e15:,.1f} PFLOP per step " \
               f"(1 image per sample), {step_s:.2f} s per step; 50000 iters = {hours:,.1f} h on 256 GPUs = " \
               f"{hours * 256:,.0f} GPU-hours" in lines
    assert 5.3 < per_sample * 30720 / (256 * 989e12 * 0.4) < 5.4  # ~17.7 TFLOP per sample -> 5.37 s per step
    with pytest.raises(SystemExit, match="--assumed-mfu 1.5 must be in"):
        parse_args(STAGE1_256 + ["--assumed-mfu", "1.5"])


def test_flops_count_what_runs_on_a_tiny_config():
    """Model FLOPs (MFU convention) and executed FLOPs against a count by hand (issue 11)."""
    from qwenvl_megatron.models.config import tiny
    from qwenvl_megatron.training.layout import batch_flops, forward_flops

    cfg = tiny(vocab_size=1000, image_start_id=990)  # padded vocabulary: 1024
    # ViT: 112 px / 14 = 8x8 = 64 patches, width 64, 2 layers, FFN 128.
    conv = 2 * 64 * (3 * 14 * 14) * 64
    vit_layer = 2 * 64 * (4 * 64 * 64 + 2 * 64 * 128) + 4 * 64 * 64 * 64
    vit = conv + 2 * vit_layer
    # Adapter, 16 queries, hidden 64: kv_proj, k and v over the 64 patches; attention 16 x 64; out, proj on 16.
    adapter = 2 * 64 * 64 * 64 + 2 * 2 * 64 * 64 * 64 + 4 * 16 * 64 * 64 + 2 * 16 * 64 * 64 + 2 * 16 * 64 * 64
    queries = 2 * 16 * 64 * 64
    # LLM, seq 48: qkv + out (4 h^2), SwiGLU (3 h f), causal attention (half the scores).
    llm = 2 * (2 * 48 * (4 * 64 * 64 + 3 * 64 * 128) + 4 * 48 * 48 * 64 / 2)
    f = forward_flops(cfg, 48, 112)
    assert (f["vit"], f["adapter_per_image"], f["adapter_queries"], f["llm_per_row"]) == (vit, adapter, queries, llm)
    assert (f["head_per_position"], f["head_per_position_padded"]) == (2 * 64 * 1000, 2 * 64 * 1024)
    # Stage 1: 4 rows, 3 images, 50 supervised positions, 2 microbatches; ViT + adapter 3x, frozen LLM 2x.
    got = batch_flops(cfg, 48, 112, rows=4, images=3, supervised_tokens=50, microbatches=2, freeze=("llm",))
    assert got["model"] == 3 * 3 * (vit + adapter + queries) + 2 * 4 * (llm + 48 * 2 * 64 * 1000)
    assert got["executed"] == (3 * 3 * (vit + adapter) + 3 * 2 * queries  # queries once per microbatch
                               + 2 * 4 * llm + 2 * 50 * 2 * 64 * 1024)  # head on supervised rows, padded vocab
    # Recompute runs each recomputed part's forward once more (not the patch embedding, not proj, not the head).
    rec = batch_flops(cfg, 48, 112, rows=4, images=3, supervised_tokens=50, microbatches=2, freeze=("llm",),
                      recompute=("vit", "adapter", "llm"))
    assert rec["model"] == got["model"]
    assert rec["executed"] - got["executed"] == (3 * (vit - conv) + 3 * (adapter - 2 * 16 * 64 * 64) + 2 * queries
                                                 + 4 * llm)
    # Sequence parallelism: the head sees every position.
    sp = batch_flops(cfg, 48, 112, rows=4, images=3, supervised_tokens=50, microbatches=2, sequence_parallel=True)
    assert sp["executed"] - batch_flops(cfg, 48, 112, rows=4, images=3, supervised_tokens=50,
                                        microbatches=2)["executed"] == 3 * (4 * 48 - 50) * 2 * 64 * 1024
