#!/usr/bin/env python
"""The glue of examples/demo.sh: small steps that no general tool covers.

    demo_tools.py model-config  --tokenizer TOK.model --out model_config.json
    demo_tools.py warmup-records --data-dir DATA --out warmup.jsonl
    demo_tools.py summary --work-dir WORK [--min-accuracy 0] [--target-accuracy 0.9] [--max-seconds 600]

model-config: the tiny preset sized to the demo tokenizer (vocab size and `<img>` id come from it, so the
model and the data agree). warmup-records: pure-text records for the LLM warm-up that stands in for the
pretrained Qwen-7B of the paper (the captions and the corpus's text records, no images). summary: reads
the stage logs, times and the evaluation JSON the demo wrote, prints one table, the held-out caption accuracy
and beside it the accuracy of stage 3's ChatML answers about the same images, and fails (exit 1) when the
caption accuracy is below the bar (the chat score is reported, not a bar).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

# One line of training/train.py's log: "iter 12/300 | loss 3.1415 | ... | 150.3 samples/s | ... elapsed 0:00:09"
LOG_LINE = re.compile(r"^iter (\d+)/(\d+) \| loss (\S+) \|.*?\| ([\d.]+) samples/s \|.*elapsed (\d+):(\d\d):(\d\d)")
STAGES = (("warmup", "LLM warm-up (text only; ViT+adapter frozen)"), ("stage1", "stage 1: pretrain (LLM frozen)"),
          ("stage2", "stage 2: multi-task (all trainable)"), ("stage3", "stage 3: SFT (ViT frozen)"))


def model_config(args) -> None:
    from qwenvl_megatron.data.tokenizer import build_tokenizer
    from qwenvl_megatron.models.config import tiny

    tok = build_tokenizer("sentencepiece", args.tokenizer)
    cfg = tiny(vocab_size=tok.vocab_size, image_start_id=tok.img_start_id)
    if args.image_size or args.patch_size:  # the patch grid stays the preset's 8x8 (64 patches, 16 queries)
        size = args.image_size or cfg.vit.image_size
        patch = args.patch_size or size // cfg.vit.pos_grid
        cfg = cfg.replace(vit={"image_size": size, "patch_size": patch}).validate()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf_config(), f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: tiny model, vocab {tok.vocab_size}, <img> id {tok.img_start_id}, "
          f"{cfg.vit.image_size}px in {cfg.vit.patch_size}px patches, {cfg.adapter.num_queries} queries", file=sys.stderr)


def warmup_records(args) -> None:
    """Caption sentences of stage 1 plus the text records of stage 2, as `text` records."""
    from qwenvl_megatron.data.formats import iter_records

    out = []
    for name in ("stage1.jsonl", "stage2.jsonl"):
        path = os.path.join(args.data_dir, name)
        if not os.path.isfile(path):
            raise SystemExit(f"warmup-records: {path} not found (run tools/make_synthetic_dataset.py first)")
        for _, rec in iter_records(path):
            if rec.get("task") == "caption":
                out.append({"task": "text", "text": rec["caption"]})
            elif rec.get("task") == "text":
                out.append({"task": "text", "text": rec["text"]})
    with open(args.out, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {args.out}: {len(out)} text records", file=sys.stderr)


def parse_stage_log(path: str) -> dict | None:
    """First/last loss, iterations, mean samples/s and training seconds from a train.py log."""
    if not os.path.isfile(path):
        return None
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LOG_LINE.match(line.strip())
            if m:
                it, total, loss, sps, h, mi, s = m.groups()
                rows.append((int(it), int(total), float(loss), float(sps), int(h) * 3600 + int(mi) * 60 + int(s)))
    if not rows:
        return None
    # samples/s: the steady state (the first logged window holds the first step's one-off costs)
    steady = [r[3] for r in rows[1:]] or [rows[0][3]]
    return {"first_loss": rows[0][2], "last_loss": rows[-1][2], "steps": rows[-1][0],
            "samples_per_s": sum(steady) / len(steady), "train_s": rows[-1][4]}


def read_times(path: str) -> dict:
    """`name seconds` lines written by demo.sh around each step."""
    times = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    times[parts[0]] = float(parts[1])
    return times


def summary(args) -> int:
    work = args.work_dir
    times = read_times(os.path.join(work, "times.txt"))
    rows = [("step", "steps", "first loss", "last loss", "samples/s", "wall s")]
    for key, label in STAGES:
        s = parse_stage_log(os.path.join(work, "logs", f"{key}.log"))
        if s is None:
            rows.append((label, "-", "-", "-", "-", f"{times.get(key, 0):.0f}"))
        else:
            rows.append((label, str(s["steps"]), f"{s['first_loss']:.3f}", f"{s['last_loss']:.3f}",
                         f"{s['samples_per_s']:.0f}", f"{times.get(key, 0):.0f}"))
    for key, label in (("data", "data: corpus, tokenizer, indexed datasets"), ("convert", "convert to HF"),
                       ("evaluate", "held-out captions and chat answers (greedy)"),
                       ("plot", "training curves (training.png)")):
        rows.append((label, "", "", "", "", f"{times.get(key, 0):.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(fmt(rows[0]))
    print("-+-".join("-" * w for w in widths))
    for r in rows[1:]:
        print(fmt(r))

    scores = {}
    eval_path = os.path.join(work, "eval.json")
    if os.path.isfile(eval_path):
        with open(eval_path, encoding="utf-8") as f:
            scores = json.load(f).get("scores", {})
    cap, chat = scores.get("caption"), scores.get("chat")
    accuracy = cap["accuracy"] if cap else None
    show = lambda s: f"{s['accuracy']:.3f} on {s['samples']} images" if s else "n/a"  # noqa: E731
    total = times.get("total", sum(times.values()))
    print()
    print(f"held-out caption accuracy (colour AND shape right): {show(cap)} (target >= {args.target_accuracy})")
    print(f"held-out chat accuracy (ChatML 'what is in the picture?', colour AND shape right): {show(chat)}")
    print(f"total wall time: {total:.0f} s (target < {args.max_seconds:.0f} s)")
    if accuracy is None:
        print(f"FAILED: no caption score in {eval_path}", file=sys.stderr)
        return 1
    if accuracy < args.min_accuracy:
        print(f"FAILED: caption accuracy {accuracy:.3f} < {args.min_accuracy}", file=sys.stderr)
        return 1
    if accuracy < args.target_accuracy:
        print(f"note: caption accuracy {accuracy:.3f} is below the target {args.target_accuracy} "
              f"(docs/demo.md says what has been tried)")
    if total > args.max_seconds:
        print(f"warning: the demo took {total:.0f} s, more than {args.max_seconds:.0f} s (busy machine?)",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("model-config", help="tiny model config.json sized to the tokenizer")
    s.add_argument("--tokenizer", required=True, help="SentencePiece .model of the demo")
    s.add_argument("--image-size", type=int, default=None, help="override the preset's 112 px")
    s.add_argument("--patch-size", type=int, default=None,
                   help="override the patch size (default: image size / 8, the preset's 8x8 patch grid)")
    s.add_argument("--out", required=True)
    s = sub.add_parser("warmup-records", help="pure-text records for the LLM warm-up")
    s.add_argument("--data-dir", required=True, help="output of tools/make_synthetic_dataset.py")
    s.add_argument("--out", required=True)
    s = sub.add_parser("summary", help="the demo's result table; exit 1 below the accuracy bar")
    s.add_argument("--work-dir", required=True)
    s.add_argument("--min-accuracy", type=float, default=0.0, help="exit 1 below this (a hard bar)")
    s.add_argument("--target-accuracy", type=float, default=0.9, help="reported, with a note below it")
    s.add_argument("--max-seconds", type=float, default=600)
    args = p.parse_args(argv)
    if args.command == "model-config":
        model_config(args)
    elif args.command == "warmup-records":
        warmup_records(args)
    else:
        return summary(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
