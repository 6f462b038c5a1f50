#!/usr/bin/env python
"""Evaluate Qwen-VL on held-out data with the paper's metrics.

  evaluate.py --load M --data coco_karpathy_test.json --image-root coco/ --output eval.json
  evaluate.py --hf-dir H --data vqav2_questions.json --vqa-annotations vqav2_annotations.json --image-root val2014/

Captions: CIDEr (pycocoevalcap) over all references of an image; `--caption-metric exact` or `synthetic`
(the demo corpus's colour-and-shape rule) score each caption right/wrong instead. VQA: VQAv2 accuracy for
records with ten `answers`, exact match for one `answer`. Grounding: accuracy at IoU >= 0.5 of the first
`<box>`. Data: records (JSONL/JSON), the release's evaluation files, a COCO caption annotation file, or
VQAv2's questions + annotations (docs/conversion.md, "Metrics"). Prompts are the release's evaluation prompts
(caption: `--caption-prompt`, default "Describe the image in English:"; VQA `{question} Answer:`; grounding
`<ref>{phrase}</ref><box>`). Other tasks are counted, not scored. Writes a table to stdout and, with
--output, JSON with per-task scores and every prediction. `--tp/--pp` > 1 launches itself with torchrun.
"""
from __future__ import annotations

import argparse
import json

from qwenvl_megatron.convert.launcher import run_tool
from qwenvl_megatron.inference.runner import add_model_args

TOOL = "evaluate"


def caption_rule(name):
    """The per-caption rule of --caption-metric (None: CIDEr). The demo's rule belongs to its corpus."""
    if name == "exact":
        from qwenvl_megatron.inference.evaluation import caption_exact
        return caption_exact
    if name == "synthetic":
        from qwenvl_megatron.data.synthetic import caption_names_colour_and_shape
        return caption_names_colour_and_shape
    return None


def parse_args(argv):
    from qwenvl_megatron.data.formats import EVAL_CAPTION_PROMPT

    p = argparse.ArgumentParser(prog=TOOL, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, nargs="+",
                   help="records (JSONL/JSON; several files are evaluated together), a COCO caption annotation "
                        "file, or a VQAv2 questions file (with --vqa-annotations)")
    p.add_argument("--image-root", default=None, help="image paths are relative to this (default: --data's dir)")
    p.add_argument("--vqa-annotations", default=None, help="VQAv2 annotations file for a questions file --data")
    p.add_argument("--caption-metric", choices=("cider", "exact", "synthetic"), default="cider",
                   help="cider (default); exact: normalised exact match with any reference; synthetic: the demo "
                        "corpus's colour-and-shape rule")
    p.add_argument("--chat-metric", choices=("exact", "synthetic"), default="exact",
                   help="ChatML answers: exact (normalised) match with the reference turn, or the demo corpus's "
                        "colour-and-shape rule")
    p.add_argument("--caption-tokenizer", choices=("auto", "java", "python"), default="auto",
                   help="CIDEr tokenisation: pycocoevalcap's Java PTBTokenizer or its Python re-statement "
                        "(auto: java when on PATH)")
    p.add_argument("--output", default=None, help="JSON results")
    p.add_argument("--caption-prompt", default=EVAL_CAPTION_PROMPT,
                   help="text after the image for captions (the training prefix is 'Generate the caption "
                        "in English:')")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    args = p.parse_args(argv)
    if args.vqa_annotations and len(args.data) != 1:
        p.error("--vqa-annotations goes with exactly one --data file (the VQAv2 questions)")
    return args


def build_prompts(args, tok, cfg):
    from qwenvl_megatron.data.formats import prompt_for, record_task
    from qwenvl_megatron.inference.eval_data import chat_prompt, load_eval_records
    from qwenvl_megatron.inference.evaluation import SCORED_TASKS
    from qwenvl_megatron.inference.prompts import encode_prompt
    from qwenvl_megatron.inference.runner import Prompt

    q = cfg.adapter.num_queries
    items, skipped = [], {}
    records = ((where, rec) for path in args.data
               for where, rec in load_eval_records(path, args.image_root, args.vqa_annotations))
    for where, rec in records:
        if args.limit is not None and len(items) >= args.limit:
            break
        task = record_task(rec, where)
        if task not in SCORED_TASKS:
            skipped[task] = skipped.get(task, 0) + 1
            continue
        if task == "chat":
            turns, _, images = chat_prompt(rec)
            system = {"system": rec["system"]} if "system" in rec else {}
            items.append((where, rec, Prompt(prompt_for("chat", tok, q, conversations=turns, **system), images)))
            continue
        image = rec["image"]
        if task == "caption":
            ids, _ = encode_prompt(args.caption_prompt, tok, q, image)
        elif task == "vqa":
            ids = prompt_for("vqa", tok, q, image=image, question=rec["question"])
        else:
            ids = prompt_for("grounding", tok, q, image=image, phrase=rec["phrase"])
        items.append((where, rec, Prompt(ids, [image])))
    if not items:
        raise ValueError(f"{' '.join(args.data)}: no caption, vqa, grounding or chat records to evaluate")
    return items, skipped


def run(args):
    import torch.distributed as dist

    from qwenvl_megatron.convert.hf_checkpoint import progress_printer
    from qwenvl_megatron.inference.evaluation import format_table, score_predictions
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
    texts = [tok.decode(ans.tokens) for ans in answers]
    scores, details = score_predictions([(rec, t) for (_, rec, _), t in zip(items, texts)],
                                        caption_rule(args.caption_metric), args.caption_tokenizer,
                                        None if args.chat_metric == "exact" else caption_rule(args.chat_metric))
    predictions = [{"where": where, "task": rec["task"], "prediction": text, **d}
                   for (where, rec, _), text, d in zip(items, texts, details)]
    print(format_table(scores, skipped))
    if args.output:
        result = {"checkpoint": args.load or args.hf_dir, "data": args.data[0] if len(args.data) == 1 else args.data,
                  "scores": {t: s.as_dict() for t, s in scores.items()},
                  "not_scored": skipped, "predictions": predictions}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)


def main(argv=None):
    run_tool(TOOL, __file__, parse_args, run, argv)


if __name__ == "__main__":
    main()
