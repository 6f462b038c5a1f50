"""What generate/evaluate share: the model (Megatron checkpoint or HF directory) on this rank's stage,
the tokenizer, image loading, and prompt batches grouped by length (rows of a batch must be equally
long: no padding, positions 0..L-1 as in training)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..data.tokenizer import Tokenizer, build_tokenizer, default_qwen_vocab_path
from ..models.config import QwenVLConfig

# torch and megatron are imported inside the functions that run a model: the tools' argument parsing
# (add_model_args) imports this module and must stay fast.
if TYPE_CHECKING:
    import torch


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="Megatron checkpoint (save dir or iter_* dir), any saved layout")
    src.add_argument("--hf-dir", help="HF Qwen-VL directory (config.json + weights)")
    p.add_argument("--tokenizer-type", choices=("qwen", "sentencepiece"), default="qwen")
    p.add_argument("--tokenizer-model", default=None,
                   help="qwen.tiktoken or a SentencePiece .model (default: the HF dir's qwen.tiktoken, "
                        "else $QWEN_TIKTOKEN / .venv/share/qwen.tiktoken)")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="HF weights are cast to this (default fp32); a checkpoint keeps its own")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the sequence every step")


def load_tokenizer(args) -> Tokenizer:
    path = args.tokenizer_model
    if path is None and args.tokenizer_type == "qwen":
        local = os.path.join(args.hf_dir, "qwen.tiktoken") if args.hf_dir else None
        path = local if local and os.path.isfile(local) else default_qwen_vocab_path()
    if path is None:
        raise ValueError("--tokenizer-model is required with --tokenizer-type sentencepiece")
    return build_tokenizer(args.tokenizer_type, path)


def check_tokenizer(tok: Tokenizer, cfg: QwenVLConfig, where: str) -> None:
    if (tok.img_start_id, tok.img_end_id, tok.img_pad_id) != (cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id):
        raise ValueError(f"the tokenizer's <img>/</img>/<imgpad> ids ({tok.img_start_id}, {tok.img_end_id}, "
                         f"{tok.img_pad_id}) differ from the model's ({cfg.image_start_id}, ...) in {where}: "
                         f"wrong --tokenizer-model?")
    if tok.vocab_size > cfg.llm.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model in {where} only "
                         f"{cfg.llm.vocab_size} rows")


def load_model(args):
    """(cfg, this rank's stage on the device). Needs megatron's parallel state (runtime.initialize)."""
    from ..convert.conversion import build_stage, load_hf_into_stage, load_mcore_stage
    from ..convert.hf_checkpoint import DTYPES, HFCheckpointReader, read_hf_config
    from ..runtime import device

    if args.load:
        cfg, model = load_mcore_stage(args.load)
    else:
        _, cfg = read_hf_config(args.hf_dir)
        model = build_stage(cfg, DTYPES[args.dtype or "fp32"])
        load_hf_into_stage(model, HFCheckpointReader(args.hf_dir), cfg)
    return cfg, model.to(device()).eval()


def load_images(paths: list[str], image_size: int, device=None) -> torch.Tensor | None:
    """Files -> [n, 3, S, S] CLIP-normalised (the training transform, Pillow backend)."""
    if not paths:
        return None
    import torch

    from ..data.images import ImageTransform

    blobs = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"image not found: {p}")
        with open(p, "rb") as f:
            blobs.append(f.read())
    images = ImageTransform(image_size, backend="pil")(blobs)
    dtype = torch.float32
    return images.to(device=device, dtype=dtype) if device is not None else images


@dataclass
class Prompt:
    ids: list[int]
    image_paths: list[str]


@dataclass
class Answer:
    tokens: list[int]
    stopped: bool


def generate_all(model, cfg: QwenVLConfig, tok: Tokenizer, prompts: list[Prompt], max_new_tokens: int,
                 batch_size: int = 8, use_cache: bool = True, progress=None) -> list[Answer]:
    """Greedy answers for every prompt, in order; prompts of equal length are decoded together."""
    import torch

    from .generation import greedy_generate

    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p.ids), []).append(i)
    batches = [idx[k:k + batch_size] for idx in by_length.values() for k in range(0, len(idx), batch_size)]
    answers: list[Answer | None] = [None] * len(prompts)
    stop = [tok.eod_id, tok.im_end_id]
    banned = [cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id]
    for n, batch in enumerate(batches, 1):
        ids = torch.tensor([prompts[i].ids for i in batch], dtype=torch.long, device=device)
        images = load_images([p for i in batch for p in prompts[i].image_paths], cfg.vit.image_size, device)
        out = greedy_generate(model, ids, images, max_new_tokens, stop_ids=stop, banned_ids=banned,
                              use_cache=use_cache)
        for i, toks, stopped in zip(batch, out.tokens, out.stopped):
            answers[i] = Answer(toks, stopped)
        if progress:
            progress(n, len(batches), f"{sum(len(b) for b in batches[:n])} prompts")
    return answers
