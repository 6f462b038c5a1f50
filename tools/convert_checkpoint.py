#!/usr/bin/env python
"""Convert Qwen-VL checkpoints between the HF layout and Megatron dist-checkpoints.

  hf-to-mcore  --hf-dir H --out M --tp T --pp P [--dtype fp32|bf16|fp16]
  mcore-to-hf  --load M --out H [--tokenizer-file qwen.tiktoken] [--dtype ...] [--tp T --pp P]
               [--code-repo Qwen/Qwen-VL] [--generation-config base|chat]
  import-init  --qwen7b-dir Q --openclip CKPT --out M --tp T --pp P [--config qwen_vl_config.json]
               [--image-size 224] [--dtype ...]

Needs T x P ranks: run it plainly (it launches itself with torchrun) or under torchrun. Inputs are checked
before any rank starts: a missing shard file, an unknown key or a shape the config contradicts is an error
that names it. docs/conversion.md describes the layouts.
"""
from __future__ import annotations

import argparse
import os
import sys

from qwenvl_megatron.convert.launcher import fail, relaunch, under_torchrun

# The conversion code (torch, megatron) is imported after the arguments are parsed: `--help` stays fast.

TOOL = "convert_checkpoint"


def parse_args(argv):
    p = argparse.ArgumentParser(prog=TOOL, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def layout(s, default_dtype):
        s.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
        s.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
        s.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=default_dtype)

    s = sub.add_parser("hf-to-mcore", help="HF Qwen-VL directory -> Megatron checkpoint")
    s.add_argument("--hf-dir", required=True)
    s.add_argument("--out", required=True)
    layout(s, "fp32")
    s = sub.add_parser("mcore-to-hf", help="Megatron checkpoint (any layout) -> HF directory")
    s.add_argument("--load", required=True, help="save directory or iter_* directory")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer-file", default=None,
                   help="qwen.tiktoken (written with tokenizer_config.json) or a SentencePiece .model")
    s.add_argument("--code-repo", default="Qwen/Qwen-VL",
                   help="Hub repository whose remote code config.json's auto_map names (e.g. Qwen/Qwen-VL-Chat)")
    s.add_argument("--generation-config", choices=("base", "chat"), default=None,
                   help="release whose generation_config.json to write (default: chat for a *-Chat --code-repo)")
    s.add_argument("--max-shard-size-gb", type=float, default=5.0)
    layout(s, None)
    s = sub.add_parser("import-init", help="stage-1 init: Qwen-7B LLM + OpenCLIP ViT-bigG/14 + fresh adapter")
    s.add_argument("--qwen7b-dir", required=True)
    s.add_argument("--openclip", required=True, help="OpenCLIP checkpoint (.bin/.pt/.safetensors)")
    s.add_argument("--out", required=True)
    s.add_argument("--config", default=None, help="Qwen-VL config.json to build (default: Qwen-7B's LLM "
                                                  "fields + the release's visual section)")
    s.add_argument("--image-size", type=int, default=224, help="ViT input size without --config")
    s.add_argument("--seed", type=int, default=1234, help="adapter initialisation")
    layout(s, "fp32")
    args = p.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        p.error("--tp and --pp must be >= 1")
    return args


def preflight(args):
    """Checks done once, before ranks start; returns the config for import-init."""
    if args.command == "hf-to-mcore":
        from qwenvl_megatron.convert.hf_checkpoint import validate_hf_dir
        cfg, _ = validate_hf_dir(args.hf_dir)
        from qwenvl_megatron.models.parallel import ParallelPlan
        ParallelPlan(tensor_parallel=args.tp, pipeline_parallel=args.pp).validate(cfg)
    elif args.command == "mcore-to-hf":
        from qwenvl_megatron.training.checkpoint import read_model_config
        read_model_config(args.load)
        if args.tokenizer_file and not os.path.isfile(args.tokenizer_file):
            from qwenvl_megatron.convert.hf_checkpoint import HFCheckpointError
            raise HFCheckpointError(f"--tokenizer-file {args.tokenizer_file} does not exist")
        from qwenvl_megatron.convert.hf_checkpoint import remote_ref
        remote_ref(args.code_repo, "")
    else:
        from qwenvl_megatron.convert.conversion import import_config, validate_import_inputs
        cfg = import_config(args.qwen7b_dir, args.config, args.image_size)
        validate_import_inputs(args.qwen7b_dir, args.openclip, cfg)


def run(args):
    from qwenvl_megatron.convert import conversion
    from qwenvl_megatron.convert.hf_checkpoint import progress_printer
    from qwenvl_megatron.runtime import initialize

    initialize(args.tp, args.pp, seed=getattr(args, "seed", 1234))
    show = progress_printer(f"[{args.command}]")
    if args.command == "hf-to-mcore":
        path = conversion.hf_to_mcore(args.hf_dir, args.out, args.dtype, show)
    elif args.command == "mcore-to-hf":
        conversion.mcore_to_hf(args.load, args.out, args.dtype, args.tokenizer_file,
                               int(args.max_shard_size_gb * 2 ** 30), show, args.code_repo, args.generation_config)
        path = args.out
    else:
        cfg = conversion.import_config(args.qwen7b_dir, args.config, args.image_size)
        path = conversion.import_init(args.qwen7b_dir, args.openclip, args.out, cfg, args.dtype, show)
    import torch.distributed as dist
    if dist.get_rank() == 0:
        print(f"[{args.command}] wrote {path}", file=sys.stderr, flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # Transparent huge pages for torch's large allocations (read once, before torch allocates; inherited by
    # the ranks): filling a stage 4 KiB page fault at a time cost more than copying it (docs/conversion.md).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args = parse_args(argv)
    from qwenvl_megatron.convert.hf_checkpoint import HFCheckpointError
    from qwenvl_megatron.convert.hf_layout import UnknownKeyError

    errors = (HFCheckpointError, UnknownKeyError, KeyError, ValueError, FileNotFoundError, RuntimeError)
    if not under_torchrun():
        try:
            preflight(args)
        except errors as e:
            fail(TOOL, e)
        if args.tp * args.pp > 1:
            sys.exit(relaunch(args.tp * args.pp, os.path.abspath(__file__), argv))
    try:
        run(args)
    except errors as e:
        fail(TOOL, e)


if __name__ == "__main__":
    main()
