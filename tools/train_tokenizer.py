#!/usr/bin/env python
"""Train the small SentencePiece tokenizer of the CPU demo from text or from data records.

    python tools/train_tokenizer.py --input corpus.txt data/*.jsonl --vocab-size 1000 --output out/demo_sp

Writes ``<output>.model`` / ``<output>.vocab``; load it with ``build_tokenizer("sentencepiece", path)``.
Inputs: ``.txt`` (one sentence per line), ``.jsonl`` / ``.json`` records of the data contract (their text
fields are used: captions, questions, answers, phrases, OCR texts, conversation turns without images).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# The package's data modules (numpy, sentencepiece) are imported after the arguments are parsed.


def read_sentences(paths: list[str], max_sentences: int | None) -> list[str]:
    from qwenvl_megatron.data.formats import iter_records, record_texts

    sentences: list[str] = []
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"--input: file(s) not found: {', '.join(missing)}")
    for path in paths:
        before = len(sentences)
        if path.endswith((".jsonl", ".json")):
            for _, record in iter_records(path):  # invalid JSON stops with file:line
                if isinstance(record, dict):
                    sentences += record_texts(record)
        else:
            with open(path, encoding="utf-8") as f:
                sentences += [line.rstrip("\n") for line in f if line.strip()]
        print(f"read {len(sentences) - before} sentences from {path}", file=sys.stderr)
        if max_sentences and len(sentences) >= max_sentences:
            sentences = sentences[:max_sentences]
            print(f"stopping at --max-sentences {max_sentences}", file=sys.stderr)
            break
    return sentences


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".txt, .jsonl or .json files")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="target size incl. specials and 256 byte pieces (demo: 500-2000); a small corpus "
                             "may yield fewer pieces")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    parser.add_argument("--max-sentences", type=int, default=None, help="use at most this many sentences")
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own training log")
    args = parser.parse_args(argv)
    from qwenvl_megatron.data.formats import TEMPLATE_TEXTS
    from qwenvl_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    sentences = read_sentences(args.input, args.max_sentences)
    if not sentences:
        raise SystemExit(f"--input {' '.join(args.input)}: no text found")
    # The template strings occur in every sample; give them weight so they become few pieces.
    sentences += list(TEMPLATE_TEXTS) * max(1, len(sentences) // 100)
    print(f"training a {args.model_type} model of up to {args.vocab_size} pieces on {len(sentences)} sentences",
          file=sys.stderr)
    start = time.time()
    try:
        model = train_sentencepiece(sentences, args.vocab_size, args.output, args.model_type, args.verbose)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    except RuntimeError as e:  # sentencepiece's own refusals, e.g. a vocabulary too small for the symbols
        raise SystemExit(f"--vocab-size {args.vocab_size}: sentencepiece could not train: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    tokenizer = SentencePieceTokenizer(model)
    print(f"wrote {model} ({tokenizer.vocab_size} pieces) in {time.time() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
