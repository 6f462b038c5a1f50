"""Two-process torchrun worker (TP2 on gloo): tensor-parallel ranks share the image decoding.

1. Each rank decodes only images r, r + 2, ... of each microbatch (counted), and `gather_images` gives
   the full decode bit for bit (float and uint8 pixels; 0..9 images per microbatch, odd counts too),
   also through the loader's background thread as train.py uses it.
2. A corrupt image raises the same CorruptImageError on both ranks (the decoding rank's own), naming
   the dataset file, sample and image, and the group goes on working afterwards (nobody hangs).
3. train.main under TP2: the same losses and grad norms as with every rank decoding every image.
Rank 0 writes tp_images.json into --out.
"""
import argparse
import io
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from qwenvl_megatron.data.images import CorruptImageError, ImageTransform
from qwenvl_megatron.data.indexed import IndexedDatasetWriter
from qwenvl_megatron.data.loader import MicroBatchLoader, gather_images
from qwenvl_megatron.models.config import tiny
from qwenvl_megatron.runtime import device, initialize
from qwenvl_megatron.training import train

SEQ = 64


class _Sample:
    def __init__(self, tokens, labels, images):
        self.tokens, self.labels, self.images = tokens, labels, images


def write_dataset(prefix, cfg, n, corrupt=False):
    """Sample i has i % 4 images (3 when `corrupt`, image i % 3 truncated), random PNGs of varied size."""
    from PIL import Image
    rng = np.random.default_rng(1)
    q, s_id = cfg.adapter.num_queries, cfg.image_start_id
    with IndexedDatasetWriter(prefix) as w:
        for i in range(n):
            k = 3 if corrupt else i % 4
            tokens = rng.integers(0, s_id - 5, 4 + k * (q + 2) + 6)
            labels = tokens.copy()
            blobs = []
            for j in range(k):
                pos = 2 + j * (q + 2)
                tokens[pos], tokens[pos + 1:pos + 1 + q], tokens[pos + 1 + q] = s_id, s_id + 2, s_id + 1
                labels[: pos + q + 2] = -100
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30 + j, 3), dtype=np.uint8)).save(buf, format="PNG")
                blob = buf.getvalue()
                blobs.append(blob[: len(blob) // 2] if corrupt and j == i % 3 else blob)
            w.add(_Sample(tokens, labels, ["img"] * k), blobs)


class Counting:
    """An ImageTransform that records the blobs of every call."""

    def __init__(self, **kw):
        self.inner, self.calls = ImageTransform(112, backend="pil", num_threads=1, **kw), []

    def __call__(self, blobs):
        self.calls.append(list(blobs))
        return self.inner(blobs)


def loader(prefix, transform, cfg, mbs, tp_size=None):
    return MicroBatchLoader([prefix], mbs, SEQ, transform, 0, cfg.image_start_id, cfg.adapter.num_queries,
                            seed=3, tensor_parallel_size=tp_size, tensor_parallel_rank=0 if tp_size else None)


def shares(cfg, prefix, rank):
    out = {"image_counts": [], "equal": [], "share_ok": [], "decoded": 0, "total": 0}
    for kw, mbs in (({}, 3), ({"normalize": False}, 1)):  # float pixels; uint8 with 0 or 1 image too
        mine, full = Counting(**kw), Counting(**kw)
        tp, ref = loader(prefix, mine, cfg, mbs), loader(prefix, full, cfg, mbs, tp_size=1)
        assert (tp.tp_rank, tp.tp_size) == (rank, 2)
        for k in range(8):
            mine.calls.clear()
            full.calls.clear()
            got, want = gather_images(tp.microbatch(0, k)), ref.microbatch(0, k)
            blobs = full.calls[0] if full.calls else []
            out["image_counts"].append(len(blobs))
            out["equal"].append(sorted(got) == sorted(want) and all(
                (got[key] is None and want[key] is None) or (torch.equal(got[key], want[key])
                if isinstance(want[key], torch.Tensor) else got[key] == want[key]) for key in want))
            out["share_ok"].append([b for c in mine.calls for b in c] == blobs[rank::2])
            out["decoded"] += sum(len(c) for c in mine.calls)
            out["total"] += len(blobs)
    # As train.py does it: shares decoded in the loader thread, gathered on the main thread.
    tp = loader(prefix, ImageTransform(112, backend="pil"), cfg, 3)
    ref = loader(prefix, ImageTransform(112, backend="pil"), cfg, 3, tp_size=1)
    it = tp.iterate(6, 2, 6)
    for step in range(2):
        got = [gather_images(b) for b in next(it)]
        want = ref.global_batch(6 + 6 * step, 2)
        out["equal"].append(all(torch.equal(g["images"], w["images"]) if w["images"] is not None
                                else g["images"] is None for g, w in zip(got, want)))
    return out


def corrupt(cfg, prefix, rank):
    out = []
    transform = Counting()
    tp = loader(prefix, transform, cfg, 1)
    for k in range(4):
        transform.calls.clear()
        _, sample_ids = tp.sample_ids(0, k)
        s = int(sample_ids[0])
        batch = tp.microbatch(0, k)  # a corrupt share does not raise in the loader (thread)
        own = batch.get("image_error") is not None
        try:
            gather_images(batch)
            msg = None
        except CorruptImageError as e:
            msg = str(e)
        decoded = [b for c in transform.calls for b in c]
        out.append({"sample": s, "bad_image": s % 3, "message": msg, "decoded": len(decoded),
                    "own_error": own})
    # The group is still in step after the errors (a rank left in a collective would hang here).
    flag = torch.tensor([rank + 1.0], device=device())
    dist.all_reduce(flag)
    return out, flag.item()


def train_args(prefix):
    return ["--model", "tiny", "--data-path", prefix, "--seq-length", str(SEQ), "--image-size", "112",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3",
            "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--stage", "2", "--log-interval", "1", "--seed", "7",
            "--image-backend", "pil", "--tensor-model-parallel-size", "2"]


class FullDecode(MicroBatchLoader):
    """The loader before image shares: every TP rank decodes every image."""

    def __init__(self, *a, **kw):
        super().__init__(*a, tensor_parallel_rank=0, tensor_parallel_size=1, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    initialize(2, 1, seed=3)
    rank, cfg = dist.get_rank(), tiny()
    good, bad = os.path.join(a.out, "good"), os.path.join(a.out, "bad")
    if rank == 0:
        write_dataset(good, cfg, 24)
        write_dataset(bad, cfg, 6, corrupt=True)
    dist.barrier()
    result = {"shares": shares(cfg, good, rank)}
    result["corrupt"], result["after"] = corrupt(cfg, bad, rank)
    shared = train.main(train_args(good))
    train.MicroBatchLoader = FullDecode
    full = train.main(train_args(good))
    result["train"] = {"shared": shared["history"], "full": full["history"]}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, result)
    if rank == 0:
        with open(os.path.join(a.out, "tp_images.json"), "w") as f:
            json.dump({"bad_prefix": bad, "ranks": parts}, f)


if __name__ == "__main__":
    from qwenvl_megatron.runtime import device_discipline
    with device_discipline():  # host and device apart, as on a GPU machine (runtime/device_discipline.py)
        main()
