"""Padding and supervised tokens per second, unpacked vs packed, on a stage-2-like mixture (one CPU process).

    python tools/bench_packing.py --json OUT.json [--work DIR] [--seq-length 2048] [--repeats 7]

Data: the synthetic corpus (data/synthetic.py) with its seven stage-2 tasks, one indexed dataset per task
(the stage-2 blend, --pack-same-task), a SentencePiece tokenizer trained on it. Geometry of stage 2 scaled
to the tiny model: every image is `<img>` + 256 positions + `</img>` (the 448 px model's 256 adapter queries),
the ViT sees 112 px (8x8 patches of 14 px), rows of --seq-length 2048 tokens.

Padding fractions are computed over --padding-rows rows of the global order (packed: the packer's rows for
a global batch of that many rows, same task, as in training; unpacked: the same number of samples, one row
each). Speed: training steps (forward, backward, optimizer update) of --rows-per-step rows, the unpacked (A)
and packed (B, per-sample attention) steps interleaved (ABBA...) on fresh rows each time, data prepared
before the clock starts; the figures are medians with min/max.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# numpy, torch and the package are imported where they are used: `--help` stays fast.
IMAGE_TOKENS = 256


def build_data(work: str, num_train: int, seed: int) -> tuple[list[str], list[float], object]:
    """Corpus, tokenizer and one indexed dataset per stage-2 task -> (prefixes, weights, tokenizer)."""
    from qwenvl_megatron.data import synthetic
    from qwenvl_megatron.data.formats import encode_record, iter_records, record_task, record_texts, resolve_image_path
    from qwenvl_megatron.data.indexed import IndexedDatasetWriter
    from qwenvl_megatron.data.tokenizer import build_tokenizer, train_sentencepiece

    data = os.path.join(work, "corpus")
    synthetic.generate_corpus(data, seed=seed, num_train=num_train, num_heldout=0, image_size=112, progress=None)
    records = list(iter_records(os.path.join(data, "stage2.jsonl")))
    texts = [line for _, r in records for t in record_texts(r) for line in t.splitlines() if line.strip()]
    tok = build_tokenizer("sentencepiece", train_sentencepiece(texts, 400, os.path.join(work, "tok", "sp")))
    by_task: dict[str, list[dict]] = {}
    for _, r in records:
        by_task.setdefault(record_task(r), []).append(r)
    prefixes, weights = [], []
    src = os.path.join(data, "stage2.jsonl")
    for task in sorted(by_task):
        prefix = os.path.join(work, "datasets", f"stage2_{task}")
        with IndexedDatasetWriter(prefix) as w:
            for r in by_task[task]:
                sample = encode_record(r, tok, IMAGE_TOKENS)
                blobs = []
                for ref in sample.images:
                    with open(resolve_image_path(ref, src), "rb") as f:
                        blobs.append(f.read())
                w.add(sample, blobs)
        prefixes.append(prefix)
        weights.append(float(len(by_task[task])))
    return prefixes, weights, tok


def model_config(tok, seq_length: int):
    from qwenvl_megatron.models.config import tiny

    cfg = tiny(vocab_size=tok.vocab_size, image_start_id=tok.img_start_id)
    return cfg.replace(adapter={"num_queries": IMAGE_TOKENS},
                       llm={"max_position_embeddings": max(seq_length, cfg.llm.max_position_embeddings),
                            "seq_length": seq_length})


def padding_fractions(unpacked: MicroBatchLoader, packed: MicroBatchLoader, rows: int, seq: int) -> tuple[float, float]:
    batch = packed.packer(rows).pack(0)
    packed_frac = 1 - sum(batch.row_tokens()) / (rows * seq)
    ds_ids, sample_ids = unpacked.order.lookup_range(0, rows)
    tokens = packed.packer(rows).sample_tokens(ds_ids, sample_ids)  # one sample per row, cut at seq
    return 1 - float(tokens.sum()) / (rows * seq), packed_frac


def _rss_mib(kind: str = "RssAnon") -> float:
    """Resident memory of this process (RssAnon: without the file-backed pages of the memory-mapped index)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(kind + ":")) / 1024


def scale(json_path: str, samples: int = 76_800_000, rows: int = 4096, seq: int = 2048) -> dict:
    """Stage-2 scale, packing only: 7 task datasets of `samples` in all (lengths 290-600 tokens: a 258-token
    image span plus text; a memory-mapped file stands in for the .idx lengths, as in training), a global
    batch of 4096 rows of 2048, resumed 90% into 19,000 iterations. Set-up time, per-batch packing time,
    memory beside the index."""
    import numpy as np

    from qwenvl_megatron.data.packing import Packer
    from qwenvl_megatron.data.sampler import SampleOrder
    sizes = [samples // 7] * 6 + [samples - 6 * (samples // 7)]
    base_rss = _rss_mib()
    with tempfile.TemporaryDirectory(prefix="pack_scale_") as d:
        lengths, rng = [], np.random.default_rng(0)
        for i, n in enumerate(sizes):
            mm = np.lib.format.open_memmap(os.path.join(d, f"{i}.npy"), mode="w+", dtype=np.int32, shape=(n,))
            for lo in range(0, n, 1 << 22):
                mm[lo: lo + (1 << 22)] = rng.integers(290, 600, min(1 << 22, n - lo), dtype=np.int32)
            mm.flush()
            del mm
            lengths.append(np.load(os.path.join(d, f"{i}.npy"), mmap_mode="r"))
        before = _rss_mib()
        t = time.perf_counter()
        packer = Packer(SampleOrder(sizes, seed=1234), lengths, seq, rows, same_task=True)
        setup = time.perf_counter() - t
        cursor = int(0.9 * 19_000 * rows * 4)  # ~4 samples per row: the cursor of iteration 17,100
        import tracemalloc
        times, traced = [], []
        peak = before
        for _ in range(3):
            tracemalloc.start()
            t = time.perf_counter()
            batch = packer.pack(cursor)
            times.append(time.perf_counter() - t)
            traced.append(tracemalloc.get_traced_memory()[1] / 2 ** 20)
            tracemalloc.stop()
            peak = max(peak, _rss_mib())
            cursor = batch.next_cursor
        out = {"samples": samples, "rows_per_batch": rows, "seq_length": seq, "setup_s": setup,
               "pack_batch_s": times, "samples_per_batch": batch.num_samples,
               "padding_fraction": 1 - sum(batch.row_tokens()) / (rows * seq),
               "rss_anon_mib_interpreter": base_rss, "rss_anon_mib_before_packing": before,
               "rss_anon_mib_peak_packing": peak, "traced_peak_mib_per_batch": traced,
               "rss_file_mib_index_pages": _rss_mib("RssFile")}
    with open(json_path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write the figures here")
    ap.add_argument("--work", help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--num-train", type=int, default=1500, help="corpus images")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--rows-per-step", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per mode")
    ap.add_argument("--padding-rows", type=int, default=512,
                    help="rows of the packed global batch (padding is computed over them; timed rows come from it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage2-scale", action="store_true",
                    help="instead: packing set-up time and memory at stage-2 scale (76.8M samples, 4096 rows)")
    a = ap.parse_args(argv)
    if a.stage2_scale:
        scale(a.json)
        return 0
    import torch

    from qwenvl_megatron.data.images import ImageTransform
    from qwenvl_megatron.data.loader import MicroBatchLoader

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="bench_packing_")
    work = a.work or tmp.name
    t0 = time.time()
    prefixes, weights, tok = build_data(work, a.num_train, a.seed)
    t_data = time.time() - t0

    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.runtime import initialize
    from qwenvl_megatron.training.optimizer import OptimizerSettings, build_optimizer
    from qwenvl_megatron.training.step import build_model, forward_backward

    device = initialize(1, 1, seed=1)
    cfg = model_config(tok, a.seq_length)
    seq, m = a.seq_length, a.rows_per_step

    def loader(pack: bool) -> MicroBatchLoader:
        return MicroBatchLoader(prefixes, m, seq, ImageTransform(cfg.vit.image_size, backend="pil"), tok.pad_id,
                                cfg.image_start_id, IMAGE_TOKENS, weights=weights, seed=1234,
                                tensor_parallel_size=1, pack_sequences=pack, pack_same_task=pack,
                                packed_attention="per-sample")

    modes = {"unpacked": loader(False), "packed": loader(True)}
    pad_unpacked, pad_packed = padding_fractions(modes["unpacked"], modes["packed"], a.padding_rows, seq)

    model = build_model(cfg, ParallelPlan(), device=device)
    settings = OptimizerSettings(lr=1e-4, min_lr=1e-5)
    opt = build_optimizer(model, cfg, settings)
    cursors = dict.fromkeys(modes, 0)
    runs = {k: {"supervised_per_s": [], "seconds": [], "padding": [], "samples": []} for k in modes}

    # As in training: the microbatches of the packed run are consecutive rows of one global batch of
    # --padding-rows rows (same-task packing needs a large global batch); unpacked, consecutive samples.
    global_packed = modes["packed"].packer(a.padding_rows).pack(0)

    def step(name):
        k = cursors[name]
        cursors[name] += 1
        if name == "packed":
            rows = range(k * m, k * m + m)
            batch = [modes[name].packed_rows(global_packed, rows)]
            samples = sum(len(global_packed.rows[r]) for r in rows)
        else:
            batch, samples = [modes[name].microbatch(k * m)], m
        micro = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batch]
        for c in model:
            c.zero_grad_buffer()
        opt.zero_grad()
        stats = {}
        start = time.perf_counter()
        forward_backward(model, micro, 1, seq, m, stats=stats)
        opt.step()
        dt = time.perf_counter() - start
        return stats, dt, samples

    step("unpacked"), step("packed")  # warm-up: first-call costs out of the figures
    for rep in range(a.repeats):
        for name in (("unpacked", "packed") if rep % 2 == 0 else ("packed", "unpacked")):
            stats, dt, samples = step(name)
            r = runs[name]
            r["supervised_per_s"].append(stats["supervised_tokens"] / dt)
            r["seconds"].append(dt)
            r["padding"].append(1 - stats["real_tokens"] / stats["positions"])
            r["samples"].append(samples)

    def summary(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    a_sps = statistics.median(runs["unpacked"]["supervised_per_s"])
    b_sps = statistics.median(runs["packed"]["supervised_per_s"])
    out = {
        "padding_fraction_unpacked": pad_unpacked,
        "padding_fraction_packed": pad_packed,
        "supervised_tokens_per_s_unpacked": a_sps,
        "supervised_tokens_per_s_packed": b_sps,
        "supervised_tokens_per_s_ratio": b_sps / a_sps,
        "detail": {
            "seq_length": seq, "rows_per_step": m, "repeats": a.repeats, "padding_rows": a.padding_rows,
            "image_tokens": IMAGE_TOKENS, "image_size": cfg.vit.image_size, "tasks": [os.path.basename(p) for p in prefixes],
            "task_weights": weights, "packed_attention": "per-sample", "pack_same_task": True,
            "data_seconds": round(t_data, 1), "total_seconds": None,
            **{f"{k}_{field}": summary(v[field]) for k, v in runs.items() for field in ("supervised_per_s", "seconds", "padding", "samples")},
            "threads": torch.get_num_threads(),
        },
    }
    out["detail"]["total_seconds"] = round(time.time() - t0, 1)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "detail"}, indent=1))
    print(f"unpacked step {summary(runs['unpacked']['seconds'])['median']:.2f} s, packed step "
          f"{summary(runs['packed']['seconds'])['median']:.2f} s, {m} rows of {seq}; data {t_data:.0f} s, "
          f"total {out['detail']['total_seconds']:.0f} s", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
