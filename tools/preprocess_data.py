#!/usr/bin/env python
"""Raw records -> one multimodal indexed dataset (OUT.bin / OUT.idx) plus OUT.rejects.jsonl.

Inputs: ``.jsonl`` (one record per line), ``.json`` (the release's fine-tune list of ChatML objects),
WebDataset ``.tar`` shards (per key an image ``.jpg/.jpeg/.png/.webp`` and a ``.txt`` caption or a ``.json``
with a ``caption``, or ``question`` + ``answer(s)``) and energon dataset directories (``.nv-meta/`` from
``energon prepare``; CaptioningSample / VQASample), the last two read by ``webdataset`` / ``megatron-energon``
(``qwenvl_megatron/data/webdataset_source.py``). Records are encoded by
``qwenvl_megatron.data.formats.encode_record``; every image is decoded with Pillow so a missing or corrupt
image rejects its record instead of crashing training later. Images that Pillow (the official transform)
and DALI would decode differently (animated, 16-bit, CMYK, palette, alpha, formats other than JPEG/PNG/WebP)
are stored as the official transform's pixels, an 8-bit RGB PNG of the first frame
(``qwenvl_megatron.data.images.normalize_image``); the summary counts them.

The input is cut into fixed chunks (``--chunk-size`` records, or one tar / energon shard) whatever the worker count;
each chunk becomes its own shard dataset and the shards are merged in chunk order, so ``--workers 1`` and
``--workers 8`` write byte-identical files.

    python tools/preprocess_data.py --input data/train.jsonl --tokenizer-type qwen \\
        --tokenizer-model .venv/share/qwen.tiktoken --output-prefix data/stage1 --workers 8 \\
        --seq-length 512 --num-image-tokens 256 --too-long reject
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from qwenvl_megatron.data.formats import (MalformedRecordError, RecordError, decode_utf8, encode_record,
                                          read_json_list, resolve_image_path)
from qwenvl_megatron.data.indexed import IndexedDataset, IndexedDatasetWriter, merge_datasets
from qwenvl_megatron.data.tokenizer import build_tokenizer
from qwenvl_megatron.data.webdataset_source import (ENERGON_META, MissingDependencyError, SourceError,
                                                    energon_shards, is_energon_dataset, iter_energon_shard,
                                                    iter_tar_shard, require_webdataset)

_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass
class Chunk:
    """One unit of work: records of one source file, or a whole tar shard (``items`` empty)."""
    chunk_id: int
    kind: str                      # "jsonl" | "json" | "tar"
    source: str
    items: list = field(default_factory=list)  # jsonl: (line_no, raw bytes); json: (index, record)


@dataclass
class ChunkResult:
    chunk_id: int
    records: int
    written: int
    rejects: list[dict]
    bytes_written: int
    normalized: int = 0  # images re-encoded by normalize_image


# ------------------------------------------------------------------------------------------ inputs
def iter_chunks(inputs: list[str], chunk_size: int, split_part: str = "train") -> Iterator[Chunk]:
    """Cut the inputs into chunks in a fixed order (input order, then file order)."""
    chunk_id = 0
    for path in inputs:
        if os.path.isdir(path):
            if not is_energon_dataset(path):
                raise SystemExit(f"preprocess_data: {path}: a directory must be an energon dataset (with "
                                 f"{ENERGON_META}/ from `energon prepare`); pass plain WebDataset shards as .tar files")
            try:
                shards = energon_shards(path, split_part)
            except (MissingDependencyError, SourceError) as e:
                raise SystemExit(f"preprocess_data: {e}") from None
            for shard in shards:  # one chunk per shard, in the order of the split
                yield Chunk(chunk_id, "energon", path, [shard])
                chunk_id += 1
            continue
        if not os.path.isfile(path):
            raise SystemExit(f"preprocess_data: input file not found: {path}")
        if path.endswith(".tar"):
            try:
                require_webdataset(path)
            except MissingDependencyError as e:
                raise SystemExit(f"preprocess_data: {e}") from None
            yield Chunk(chunk_id, "tar", path)
            chunk_id += 1
        elif path.endswith(".json"):
            try:
                data = read_json_list(path)
            except MalformedRecordError as e:
                raise SystemExit(f"preprocess_data: {e}") from None
            for start in range(0, len(data), chunk_size):
                yield Chunk(chunk_id, "json", path, list(enumerate(data[start:start + chunk_size], start)))
                chunk_id += 1
        elif path.endswith(".jsonl"):
            with open(path, "rb") as f:  # lines stay bytes: the worker decodes, so bad UTF-8 rejects one line
                items: list = []
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        items.append((line_no, line))
                    if len(items) == chunk_size:
                        yield Chunk(chunk_id, "jsonl", path, items)
                        chunk_id, items = chunk_id + 1, []
                if items:
                    yield Chunk(chunk_id, "jsonl", path, items)
                    chunk_id += 1
        else:
            raise SystemExit(f"preprocess_data: {path}: unsupported input type (expected .jsonl, .json, .tar or "
                             f"an energon dataset directory)")


# ------------------------------------------------------------------------------------------ worker
_STATE: dict[str, Any] = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, options: dict) -> None:
    _STATE["tokenizer"] = build_tokenizer(tokenizer_type, tokenizer_model)
    _STATE.update(options)


def _encode(record: Any, where: str, load_image) -> tuple[Any, list[bytes]]:
    from qwenvl_megatron.data.images import CorruptImageError, normalize_image  # torch: not for --help
    sample = encode_record(record, _STATE["tokenizer"], _STATE["num_image_tokens"], _STATE["seq_length"],
                           _STATE["too_long"], where=where)
    blobs = []
    for ref in sample.images:
        data = load_image(ref)
        try:
            stored, change = normalize_image(data)
        except CorruptImageError as e:
            detail = _OBJECT_REPR.sub("data", e.reason)  # no memory addresses: rejects must be reproducible
            raise RecordError(f"{where}: image {ref!r} cannot be decoded: {detail}") from None
        if change:
            _STATE["normalized"] = _STATE.get("normalized", 0) + 1
        blobs.append(stored)
    return sample, blobs


def _file_image_loader(source: str, where: str):
    def load(ref: str) -> bytes:
        path = resolve_image_path(ref, source)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise RecordError(f"{where}: image {ref!r} cannot be read ({path}): {e.strerror}") from None
    return load


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Encode one chunk into its own shard dataset; bad records go to the rejects list."""
    prefix = os.path.join(_STATE["shard_dir"], f"chunk_{chunk.chunk_id:08d}")
    rejects: list[dict] = []
    records = 0
    normalized_before = _STATE.get("normalized", 0)
    with IndexedDatasetWriter(prefix) as writer:
        if chunk.kind in ("tar", "energon"):
            if chunk.kind == "tar":
                items = iter_tar_shard(chunk.source)
            else:
                items = iter_energon_shard(chunk.source, chunk.items[0], _STATE["split_part"])
            try:
                for item in items:
                    records += 1
                    where = f"{item.shard}:{item.key}"
                    try:
                        if item.reason:
                            raise RecordError(f"{where}: {item.reason}")
                        writer.add(*_encode(item.record, where, lambda ref, images=item.images: images[ref]))
                    except RecordError as e:
                        rejects.append({"source": item.shard, "key": item.key, "reason": str(e)})
            except OSError as e:  # the shard cannot be opened at all
                shard = chunk.source if chunk.kind == "tar" else os.path.join(chunk.source, chunk.items[0])
                rejects.append({"source": shard, "key": None, "reason": f"{shard}: cannot read the shard: {e}"})
        else:
            for position, item in chunk.items:
                records += 1
                loc = {"line": position} if chunk.kind == "jsonl" else {"index": position}
                where = f"{chunk.source}:{position}" if chunk.kind == "jsonl" else f"{chunk.source}[{position}]"
                try:
                    if chunk.kind == "jsonl":
                        try:
                            item = json.loads(decode_utf8(item, where))
                        except json.JSONDecodeError as e:
                            raise RecordError(f"{where}: invalid JSON: {e}") from None
                    writer.add(*_encode(item, where, _file_image_loader(chunk.source, where)))
                except RecordError as e:
                    rejects.append({"source": chunk.source, **loc, "reason": str(e)})
        written = len(writer)
    return ChunkResult(chunk.chunk_id, records, written, rejects, os.path.getsize(prefix + ".bin"),
                       _STATE.get("normalized", 0) - normalized_before)


def ordered_map(pool, fn, items: Iterator, max_pending: int) -> Iterator:
    """Like ``pool.imap`` but reads the input lazily (at most ``max_pending`` chunks in flight)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ------------------------------------------------------------------------------------------ driver
def preprocess(inputs: list[str], tokenizer_type: str, tokenizer_model: str, output_prefix: str,
               workers: int = 1, seq_length: int | None = None, num_image_tokens: int = 256,
               too_long: str = "reject", chunk_size: int = 1000, log_interval: int = 10000,
               log=sys.stderr, split_part: str = "train") -> dict:
    """Run the whole pipeline; returns the summary counts."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {chunk_size}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    shard_dir = output_prefix + ".shards.tmp"
    rejects_path = output_prefix + ".rejects.jsonl"
    shutil.rmtree(shard_dir, ignore_errors=True)
    os.makedirs(shard_dir)
    try:
        return _preprocess(inputs, tokenizer_type, tokenizer_model, output_prefix, shard_dir, rejects_path,
                           workers, seq_length, num_image_tokens, too_long, chunk_size, log_interval, log,
                           split_part)
    finally:  # success or failure (a missing input, a bad .json list): no temporary file stays behind
        shutil.rmtree(shard_dir, ignore_errors=True)
        if os.path.exists(rejects_path + ".tmp"):
            os.remove(rejects_path + ".tmp")


def _preprocess(inputs, tokenizer_type, tokenizer_model, output_prefix, shard_dir, rejects_path, workers,
                seq_length, num_image_tokens, too_long, chunk_size, log_interval, log, split_part) -> dict:
    options = {"num_image_tokens": num_image_tokens, "seq_length": seq_length, "too_long": too_long,
               "shard_dir": shard_dir, "split_part": split_part}
    init_args = (tokenizer_type, tokenizer_model, options)
    t0 = time.time()
    totals = {"records": 0, "written": 0, "rejected": 0, "normalized_images": 0}
    shard_ids: list[int] = []
    next_log = log_interval
    with open(rejects_path + ".tmp", "w", encoding="utf-8") as rejects_file:
        def consume(results):
            nonlocal next_log
            for res in results:
                shard_ids.append(res.chunk_id)
                totals["records"] += res.records
                totals["written"] += res.written
                totals["rejected"] += len(res.rejects)
                totals["normalized_images"] += res.normalized
                for r in res.rejects:
                    rejects_file.write(json.dumps(r, ensure_ascii=False) + "\n")
                if totals["records"] >= next_log:
                    rate = totals["records"] / max(time.time() - t0, 1e-9)
                    print(f"[preprocess_data] {totals['records']} records, {totals['written']} written, "
                          f"{totals['rejected']} rejected, {rate:.0f} records/s", file=log, flush=True)
                    next_log = (totals["records"] // log_interval + 1) * log_interval
        chunks = iter_chunks(inputs, chunk_size, split_part)
        if workers == 1:
            _init_worker(*init_args)
            consume(process_chunk(c) for c in chunks)
        else:
            with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
                consume(ordered_map(pool, process_chunk, chunks, max_pending=2 * workers))
    os.replace(rejects_path + ".tmp", rejects_path)
    print(f"[preprocess_data] merging {len(shard_ids)} shards", file=log, flush=True)
    merge_datasets([os.path.join(shard_dir, f"chunk_{i:08d}") for i in shard_ids], output_prefix)
    shutil.rmtree(shard_dir)
    merged = IndexedDataset(output_prefix)
    elapsed = time.time() - t0
    summary = dict(totals, tokens=merged.num_tokens, images=merged.num_images, seconds=round(elapsed, 2))
    print(f"[preprocess_data] done: {totals['records']} records -> {totals['written']} samples "
          f"({merged.num_tokens} tokens, {merged.num_images} images) in {output_prefix}.bin/.idx; "
          f"{totals['rejected']} rejected (see {rejects_path}); {totals['normalized_images']} images re-encoded as "
          f"8-bit RGB PNG (animated, 16-bit, CMYK, palette, alpha or another format); {elapsed:.1f} s",
          file=log, flush=True)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl / .json / WebDataset .tar files or energon dataset directories, in order")
    p.add_argument("--tokenizer-type", choices=["qwen", "sentencepiece"], required=True)
    p.add_argument("--tokenizer-model", required=True, help="qwen.tiktoken or a SentencePiece .model")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.rejects.jsonl")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=None, help="maximum tokens per sample")
    p.add_argument("--num-image-tokens", type=int, default=256, help="<imgpad> tokens per image")
    p.add_argument("--too-long", choices=["reject", "truncate"], default="reject")
    p.add_argument("--chunk-size", type=int, default=1000, help="records per work unit / shard")
    p.add_argument("--log-interval", type=int, default=10000, help="progress line every N records")
    p.add_argument("--energon-split-part", default="train",
                   help="split part of energon datasets to read (their .nv-meta/split.yaml)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    preprocess(a.input, a.tokenizer_type, a.tokenizer_model, a.output_prefix, a.workers, a.seq_length,
               a.num_image_tokens, a.too_long, a.chunk_size, a.log_interval, split_part=a.energon_split_part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
