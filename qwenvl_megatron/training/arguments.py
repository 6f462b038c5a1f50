"""Megatron-LM-style command-line flags and the three training stages of the paper as presets.

`--stage N` fills every flag the user left unset from the paper's hyperparameter table (reference §2);
anything given explicitly wins. Flags with no stage meaning fall back to plain defaults afterwards.
The result is one resolved `argparse.Namespace` that the trainer, the dry run and the checkpoint's
`args` record all read.
"""
from __future__ import annotations

import argparse
import json
import os

from ..models.config import PRESETS, QwenVLConfig, get_preset
from ..models.parallel import PARTS

# Paper, appendix hyperparameter table. Stage 1 trains ViT + adapter on 224px captions with the whole LLM
# (embedding and head included) frozen; stage 2 trains everything at 448px; stage 3 freezes the ViT.
STAGE_PRESETS = {
    1: dict(freeze="llm", image_size=224, seq_length=512, lr=2e-4, min_lr=1e-6, lr_warmup_iters=500,
            train_iters=50_000, global_batch_size=30_720, vit_lr_decay=0.95),
    2: dict(freeze="", image_size=448, seq_length=2048, lr=5e-5, min_lr=1e-5, lr_warmup_iters=400,
            train_iters=19_000, global_batch_size=4096, vit_lr_decay=0.95),
    3: dict(freeze="vit", image_size=448, seq_length=2048, lr=1e-5, min_lr=1e-6, lr_warmup_iters=3000,
            train_iters=8000, global_batch_size=128, vit_lr_decay=0.95),
}

# Megatron-LM's flags that turn a fused kernel off -> the TransformerConfig field (models.parallel.FUSIONS).
FUSION_FLAGS = {
    "--no-bias-swiglu-fusion": "bias_activation_fusion",
    "--no-bias-dropout-fusion": "bias_dropout_fusion",
    "--no-masked-softmax-fusion": "masked_softmax_fusion",
    "--no-rope-fusion": "apply_rope_fusion",
    "--no-gradient-accumulation-fusion": "gradient_accumulation_fusion",
    "--no-persist-layer-norm": "persist_layer_norm",
}

# Used when neither the command line nor a stage preset says otherwise.
DEFAULTS = dict(freeze="", image_size=None, seq_length=2048, lr=1e-4, min_lr=0.0, lr_warmup_iters=0,
                train_iters=None, global_batch_size=None, vit_lr_decay=1.0)


def _parts(text: str, flag: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"{flag}: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    return parts


def parse_blend(values: list[str] | None) -> tuple[list[str], list[float] | None]:
    """`--data-path A` / `--data-path A B` / `--data-path 0.7 A 0.3 B` -> (prefixes, weights or None)."""
    if not values:
        return [], None

    def is_number(v):
        try:
            float(v)
            return True
        except ValueError:
            return False

    if not is_number(values[0]):
        if any(is_number(v) for v in values):
            raise SystemExit(f"--data-path: mix of weights and paths {values}; use 'W1 PATH1 W2 PATH2 ...'")
        return list(values), None
    if len(values) % 2:
        raise SystemExit(f"--data-path: weighted blend needs pairs 'WEIGHT PATH', got {len(values)} values")
    weights, paths = [float(v) for v in values[0::2]], list(values[1::2])
    for w, p in zip(weights, paths):
        if not w > 0:
            raise SystemExit(f"--data-path: weight {w} of {p} must be > 0")
        if is_number(p):
            raise SystemExit(f"--data-path: expected a path after weight {w}, got {p!r}")
    return paths, weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qwenvl_megatron.training.train",
        description="Train Qwen-VL on megatron-core (run under torchrun). --stage fills the paper's settings.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="qwen-vl-7b", choices=sorted(PRESETS), help="model size preset")
    g.add_argument("--model-config", help="HF-style config.json of the model (overrides --model)")
    g.add_argument("--image-size", type=int, help="input resolution in pixels (stage 1: 224, stages 2-3: 448)")
    g = p.add_argument_group("stage")
    g.add_argument("--stage", type=int, choices=sorted(STAGE_PRESETS),
                   help="paper preset: 1 pretrain (LLM frozen), 2 multi-task, 3 SFT (ViT frozen)")
    g.add_argument("--freeze", help="comma list of parts to freeze: vit,adapter,llm ('' = none)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int,
                   help="LLM layers on the first stage (which also holds ViT + adapter); default even split")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state over DP")
    g.add_argument("--recompute-activations", action="store_true", help="full recompute in every part")
    g.add_argument("--recompute", default="", help="comma list of parts to recompute: vit,adapter,llm")
    g.add_argument("--transformer-impl", default="auto", choices=["auto", "te", "local"])
    g.add_argument("--bf16", action="store_true", help="bf16 weights/compute with fp32 master weights (GPU)")
    g.add_argument("--world-size", type=int, help="plan for this many processes (--dry-run without torchrun)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradients bucket by bucket during the backward pass (Megatron-LM's flag)")
    g = p.add_argument_group("fused kernels", "on by default where this machine has the kernels (GPU), as in "
                             "Megatron-LM; never on a CPU")
    for flag, fusion in FUSION_FLAGS.items():
        g.add_argument(flag, dest=flag[2:].replace("-", "_"), action="store_true", help=f"turn off {fusion}")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--seq-length", type=int, help="tokens per sample after padding/truncation")
    g.add_argument("--train-iters", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--lr-warmup-iters", type=int)
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.98)
    g.add_argument("--adam-eps", type=float, default=1e-6)
    g.add_argument("--vit-lr-decay", type=float, help="ViT layer-wise LR decay (paper: 0.95)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="std of the random init of linear weights (fresh parameters only; 0.02 suits wide models, "
                        "a narrow one learns faster from ~1/sqrt(hidden))")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop after this many consecutive steps skipped for a non-finite loss or grad")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es), optionally 'W1 P1 W2 P2 ...'")
    g.add_argument("--tokenizer-type", default="qwen", choices=["qwen", "sentencepiece"])
    g.add_argument("--tokenizer-model", help="qwen.tiktoken or a SentencePiece .model")
    g.add_argument("--image-backend", default="auto", choices=["auto", "dali", "pil"])
    g.add_argument("--mock-data", action="store_true", help="random tokens and images (benchmarks, tests)")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pack consecutive samples into rows of --seq-length tokens; --global-batch-size then "
                        "counts rows (data/packing.py)")
    g.add_argument("--pack-same-task", action="store_true",
                   help="with --pack-sequences: a row holds samples of one task only (the task of a sample is "
                        "its --data-path dataset's: one prefix per task)")
    g.add_argument("--packed-attention", choices=["causal", "per-sample"],
                   help="with --pack-sequences: 'per-sample' (default) each sample attends only to itself, "
                        "positions restart at 0; 'causal' one causal sequence per row")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save", help="checkpoint directory to write")
    g.add_argument("--load", help="checkpoint directory (or iter_* directory) to start from")
    g.add_argument("--load-weights-only", action="store_true",
                   help="take only the weights from --load: fresh optimizer, iteration 0 (next stage)")
    g.add_argument("--overwrite-checkpoints", action="store_true",
                   help="allow a run to write into a --save directory whose marker names a newer iteration than "
                        "the run starts from (moving the marker back); refused without it")
    g.add_argument("--no-verify-checksums", dest="verify_checksums", action="store_false",
                   help="load --load without checking its files against the checksums.json written at save "
                        "(checked by default: a damaged file is refused by name)")
    g.add_argument("--save-interval", type=int, default=1000)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--wandb-project", help="log the TensorBoard scalars to this Weights & Biases project too "
                                           "(needs the optional `wandb` package)")
    g.add_argument("--wandb-exp-name", default="", help="W&B run name")
    g.add_argument("--wandb-save-dir", default="", help="W&B local files (default: <save>/wandb)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default: the detected device's: a table of GPU datasheet "
                        "peaks, e.g. 989 = H100/H200 SXM dense bf16, else a matmul measured at start; "
                        "--dry-run: 989)")
    g.add_argument("--exit-interval", type=int,
                   help="save and exit when the iteration is a multiple of this (staged runs, tests)")
    g.add_argument("--dry-run", action="store_true", help="print the resolved plan and memory estimate, exit")
    g.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="--dry-run: GPU memory to fit each pipeline stage's estimate into (80 = H100)")
    g.add_argument("--assumed-mfu", type=float, default=0.4,
                   help="--dry-run: model FLOPs utilisation for the step time and GPU-hours (with --peak-tflops)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Stage preset for unset flags, then defaults; derived fields; consistency checks."""
    preset = STAGE_PRESETS.get(args.stage, {})
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    args.freeze = _parts(args.freeze, "--freeze")
    args.recompute = PARTS if args.recompute_activations else _parts(args.recompute, "--recompute")
    args.data_paths, args.data_weights = parse_blend(args.data_path)
    args.disabled_fusions = tuple(f for flag, f in FUSION_FLAGS.items() if getattr(args, flag[2:].replace("-", "_")))
    args.model_cfg = load_model_config(args)
    if args.image_size is None:
        args.image_size = args.model_cfg.vit.image_size
    else:
        args.model_cfg = args.model_cfg.replace(vit={"image_size": args.image_size})
    if args.train_iters is None:
        raise SystemExit("--train-iters is required (or pick a --stage)")
    if args.global_batch_size is None:
        raise SystemExit("--global-batch-size is required (or pick a --stage)")
    if args.lr_warmup_iters >= args.train_iters:
        raise SystemExit(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than "
                         f"--train-iters {args.train_iters}")
    if args.min_lr > args.lr:
        raise SystemExit(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if not args.dry_run and not args.mock_data and not args.data_paths:
        raise SystemExit("--data-path is required (or --mock-data)")
    if not 0 < args.assumed_mfu <= 1:
        raise SystemExit(f"--assumed-mfu {args.assumed_mfu} must be in (0, 1]")
    if args.peak_tflops is None and args.dry_run:
        args.peak_tflops = 989.0  # a dry run plans for the cluster, not for this machine
    if not args.gpu_memory_gib > 0 or (args.peak_tflops is not None and not args.peak_tflops > 0):
        raise SystemExit("--gpu-memory-gib and --peak-tflops must be > 0")
    if args.load_weights_only and not args.load:
        raise SystemExit("--load-weights-only needs --load")
    if not args.pack_sequences and (args.pack_same_task or args.packed_attention):
        raise SystemExit("--pack-same-task and --packed-attention need --pack-sequences")
    if args.pack_sequences:
        args.packed_attention = args.packed_attention or "per-sample"
        if args.mock_data:
            raise SystemExit("--pack-sequences needs --data-path (mock samples already fill --seq-length)")
        if args.sequence_parallel and args.packed_attention == "per-sample":
            raise SystemExit("--packed-attention per-sample with --sequence-parallel is not implemented; "
                             "use --packed-attention causal or drop --sequence-parallel")
    if not args.dry_run:  # a dry run plans without data, tokenizer or checkpoint
        check_input_paths(args)
    return args


def check_input_paths(args: argparse.Namespace) -> None:
    """Every file the run will read exists, before anything is built: one line naming the flag and path.
    (--model-config is read by `load_model_config` already.) --load may name an empty or absent directory
    only when it is also --save: the stage scripts pass both so a run resumes when there is something."""
    if not args.mock_data:
        for prefix in args.data_paths:
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise SystemExit(f"--data-path {prefix}: {prefix + suffix} not found (expected the "
                                     f"PREFIX.bin/PREFIX.idx pair written by tools/preprocess_data.py)")
    if args.tokenizer_model and not os.path.isfile(args.tokenizer_model):
        raise SystemExit(f"--tokenizer-model: file not found: {args.tokenizer_model}")
    if args.load:
        from .checkpoint import CheckpointError, latest_iteration, resolve_checkpoint_dir
        same_as_save = bool(args.save) and os.path.abspath(args.load) == os.path.abspath(args.save)
        if same_as_save and not os.path.isfile(os.path.join(args.load, "metadata.json")):
            try:
                if latest_iteration(args.load) is None:
                    return  # nothing saved there yet: the run starts from scratch
            except CheckpointError as e:
                raise SystemExit(f"--load: {e}") from None
        try:
            resolve_checkpoint_dir(args.load)
        except CheckpointError as e:
            raise SystemExit(f"--load: {e}") from None


def load_model_config(args) -> QwenVLConfig:
    if args.model_config:
        if not os.path.isfile(args.model_config):
            raise SystemExit(f"--model-config: file not found: {args.model_config}")
        with open(args.model_config) as f:
            try:
                return QwenVLConfig.from_hf_config(json.load(f))
            except (KeyError, ValueError) as e:
                raise SystemExit(f"--model-config {args.model_config}: not a Qwen-VL config: {e}") from None
    return get_preset(args.model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return resolve(build_parser().parse_args(argv))


def args_record(args: argparse.Namespace) -> dict:
    """The flags as plain values, for checkpoints and logs."""
    out = {}
    for k, v in vars(args).items():
        if k == "model_cfg":
            out[k] = v.to_hf_config()
        elif isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


__all__ = ["STAGE_PRESETS", "FUSION_FLAGS", "build_parser", "parse_args", "resolve", "parse_blend", "args_record"]
