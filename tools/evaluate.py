#!/usr/bin/env python
"""Evaluate Qwen-VL on held-out records: caption accuracy, VQA exact match, grounding accuracy @ IoU 0.5.

  evaluate.py --load M --tokenizer-type sentencepiece --tokenizer-model tok.model --data heldout.jsonl \
      --output eval.json

Records follow the data contract (`task` caption / vqa / grounding; image paths relative to the data
file). Prompts are the release's evaluation prompts (caption: `--caption-prompt`, default "Describe the
image in English:"; VQA `{question} Answer:`; grounding `<ref>{phrase}</ref><box>`). Other tasks are
counted, not scored. Writes a table to stdout and, with --output, JSON with per-task scores and every
prediction. `--tp/--pp` > 1 launches itself with torchrun.
"""
from __future__ import annotations

import argparse
import json

from qwenvl_megatron.convert.launcher import run_tool
from qwenvl_megatron.inference.runner import add_model_args

TOOL = "evaluate"


def parse_args(argv):
    from qwenvl_megatron.data.formats import EVAL_CAPTION_PROMPT

    p = argparse.ArgumentParser(prog=TOOL, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL/JSON records (caption, vqa, grounding)")
    p.add_argument("--output", default=None, help="JSON results")
    p.add_argument("--caption-prompt", default=EVAL_CAPTION_PROMPT,
                   help="text after the image for captions (the training prefix is 'Generate the caption "
                        "in English:')")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    return p.parse_args(argv)


def build_prompts(args, tok, cfg):
    from qwenvl_megatron.data.formats import iter_records, prompt_for, record_task, resolve_image_path
    from qwenvl_megatron.inference.evaluation import SCORED_TASKS
    from qwenvl_megatron.inference.prompts import encode_prompt
    from qwenvl_megatron.inference.runner import Prompt

    q = cfg.adapter.num_queries
    items, skipped = [], {}
    for where, rec in iter_records(args.data):
        if args.limit is not None and len(items) >= args.limit:
            break
        task = record_task(rec, where)
        if task not in SCORED_TASKS:
            skipped[task] = skipped.get(task, 0) + 1
            continue
        for field in {"caption": ("image", "caption"), "vqa": ("image", "question", "answer"),
                      "grounding": ("image", "phrase", "box", "width", "height")}[task]:
            if field not in rec:
                raise ValueError(f"{where}: a {task} record needs '{field}'")
        image = resolve_image_path(rec["image"], args.data)
        if task == "caption":
            ids, _ = encode_prompt(args.caption_prompt, tok, q, image)
        elif task == "vqa":
            ids = prompt_for("vqa", tok, q, image=rec["image"], question=rec["question"])
        else:
            ids = prompt_for("grounding", tok, q, image=rec["image"], phrase=rec["phrase"])
        items.append((where, rec, Prompt(ids, [image])))
    if not items:
        raise ValueError(f"{args.data}: no caption, vqa or grounding records to evaluate")
    return items, skipped


def run(args):
    import torch.distributed as dist

    from qwenvl_megatron.convert.hf_checkpoint import progress_printer
    from qwenvl_megatron.inference.evaluation import TaskScore, format_table, score_record
    from qwenvl_megatron.inference.runner import check_tokenizer, generate_all, load_model, load_tokenizer
    from qwenvl_megatron.runtime import initialize

    initialize(args.tp, args.pp)
    tok = load_tokenizer(args)
    cfg, model = load_model(args)
    check_tokenizer(tok, cfg, args.load or args.hf_dir)
    items, skipped = build_prompts(args, tok, cfg)
    rank0 = dist.get_rank() == 0
    answers = generate_all(model, cfg, tok, [p for _, _, p in items], args.max_new_tokens,
                           args.micro_batch_size, not args.no_kv_cache,
                           progress_printer("[evaluate]") if rank0 else None)
    if not rank0:
        return
    scores, predictions = {}, []
    for (where, rec, _), ans in zip(items, answers):
        text = tok.decode(ans.tokens)
        right, details = score_record(rec, text)
        s = scores.setdefault(rec["task"], TaskScore())
        s.count += 1
        s.correct += int(right)
        predictions.append({"where": where, "task": rec["task"], "prediction": text, "correct": right, **details})
    print(format_table(scores, skipped))
    if args.output:
        result = {"checkpoint": args.load or args.hf_dir, "data": args.data,
                  "scores": {t: {"samples": s.count, "correct": s.correct, "accuracy": s.accuracy}
                             for t, s in scores.items()},
                  "not_scored": skipped, "predictions": predictions}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)


def main(argv=None):
    run_tool(TOOL, __file__, parse_args, run, argv)


if __name__ == "__main__":
    main()
