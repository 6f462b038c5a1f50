#!/usr/bin/env python
"""Greedy generation with Qwen-VL from a Megatron checkpoint (any TP x PP) or an HF directory.

  generate.py --load M --tokenizer-type qwen --image cat.png --prompt "Describe the image in English:"
  generate.py --hf-dir H --input prompts.jsonl --output answers.jsonl
  generate.py --load M --image img.png --prompt "<ref>the red circle</ref><box>" --draw-boxes boxes.png
  generate.py --load M --image img.png --prompt "..." --logits-out prompt_logits.npy

A prompt may also name images inline as `<img>path</img>`. `--input` lines are either
{"prompt": ..., "image": ...} or a task record ({"task": "caption"|"vqa"|"grounding"|..., "image": ...},
built with the evaluation templates). `--logits-out` writes the teacher-forced logits of the (single)
prompt, [prompt_len, vocab] float32. `--tp/--pp` > 1 launches itself with torchrun.
"""
from __future__ import annotations

import argparse
import json
import sys

from qwenvl_megatron.convert.launcher import run_tool
from qwenvl_megatron.inference.runner import add_model_args

TOOL = "generate"


def parse_args(argv):
    p = argparse.ArgumentParser(prog=TOOL, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text (special tokens such as <ref>, <box> allowed)")
    what.add_argument("--input", help="JSONL of prompts or task records")
    p.add_argument("--image", default=None, help="image for --prompt (prepended as <img>IMAGE</img>)")
    p.add_argument("--output", default=None, help="JSONL answers (default: stdout)")
    p.add_argument("--logits-out", default=None, help=".npy of the prompt's teacher-forced logits")
    p.add_argument("--draw-boxes", default=None, help="PNG: the image with the answer's boxes drawn")
    args = p.parse_args(argv)
    if (args.logits_out or args.draw_boxes) and not args.prompt:
        p.error("--logits-out and --draw-boxes need a single --prompt")
    if args.draw_boxes and not args.image:
        p.error("--draw-boxes needs --image")
    return args


def read_prompts(args, tok, cfg):
    """[(Prompt, record)] from --prompt/--image or --input."""
    from qwenvl_megatron.data.formats import prompt_for, resolve_image_path
    from qwenvl_megatron.inference.prompts import encode_prompt
    from qwenvl_megatron.inference.runner import Prompt

    q = cfg.adapter.num_queries
    if args.prompt is not None:
        ids, paths = encode_prompt(args.prompt, tok, q, args.image)
        return [(Prompt(ids, paths), {"prompt": args.prompt, "image": args.image})]
    out = []
    with open(args.input, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{args.input}:{line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            if "prompt" in rec:
                image = resolve_image_path(rec["image"], args.input) if rec.get("image") else None
                text = rec["prompt"]
                ids, paths = encode_prompt(text, tok, q, image)
                paths = [resolve_image_path(p, args.input) for p in paths]
            elif "task" in rec:
                fields = {k: v for k, v in rec.items() if k not in ("task",)}
                ids = prompt_for(rec["task"], tok, q, **fields)
                paths = [resolve_image_path(rec["image"], args.input)] if rec.get("image") else []
            else:
                raise ValueError(f"{where}: a line needs 'prompt' (free text) or 'task' (a task record)")
            out.append((Prompt(ids, paths), rec))
    if not out:
        raise ValueError(f"{args.input} holds no prompts")
    return out


def run(args):
    import numpy as np
    import torch.distributed as dist

    from qwenvl_megatron.convert.hf_checkpoint import progress_printer
    from qwenvl_megatron.inference.boxes import draw_boxes, parse_boxes
    from qwenvl_megatron.inference.generation import prompt_logits
    from qwenvl_megatron.inference.runner import (check_tokenizer, generate_all, load_images, load_model,
                                                  load_tokenizer)
    from qwenvl_megatron.runtime import initialize

    initialize(args.tp, args.pp)
    tok = load_tokenizer(args)
    cfg, model = load_model(args)
    check_tokenizer(tok, cfg, args.load or args.hf_dir)
    items = read_prompts(args, tok, cfg)
    rank0 = dist.get_rank() == 0
    answers = generate_all(model, cfg, tok, [p for p, _ in items], args.max_new_tokens, args.micro_batch_size,
                           not args.no_kv_cache, progress_printer("[generate]") if rank0 and len(items) > 1 else None)
    if args.logits_out:
        import torch
        prompt = items[0][0]
        device = next(model.parameters()).device
        logits = prompt_logits(model, torch.tensor([prompt.ids], device=device),
                               load_images(prompt.image_paths, cfg.vit.image_size, device))
        if rank0:
            np.save(args.logits_out, logits[0].cpu().numpy())
    if not rank0:
        return
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    for (prompt, rec), ans in zip(items, answers):
        text = tok.decode(ans.tokens)
        prefix_text = tok.decode([t for t in prompt.ids if t != cfg.image_pad_id])
        boxes = parse_boxes(text, prefix="<box>" if prefix_text.endswith("<box>") else "")
        result = dict(rec, text=text, tokens=ans.tokens, stopped=ans.stopped,
                      boxes=[{"phrase": b.phrase, "box": list(b.grid)} for b in boxes])
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        if args.draw_boxes:
            draw_boxes(prompt.image_paths[0], boxes, args.draw_boxes)
    if args.output:
        out.close()


def main(argv=None):
    run_tool(TOOL, __file__, parse_args, run, argv)


if __name__ == "__main__":
    main()
