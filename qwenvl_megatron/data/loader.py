"""Microbatches for megatron's schedules: indexed dataset(s) + global sample order + image transform.

Global batch g covers samples `consumed .. consumed + GBS` of the seeded global order (sampler.py);
microbatch k of data-parallel rank r is the r-th slice of global micro step k. So the union of all ranks'
microbatches is the same set of samples whatever MBS and DP are, and resuming from `consumed_samples`
continues the exact sequence.

Each sample is cut or padded to `seq_length + 1` tokens and shifted: `input_ids = tokens[:-1]`,
`targets = labels[1:]` (labels are HF-style, unshifted, -100 = no loss; padding gets -100). A cut never
splits an image span: the sample ends before an `<img>` whose span would not fit, and that image is
dropped. The microbatch's images are stacked in row-major span order, which is what the model expects.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from .images import CorruptImageError, ImageTransform
from .indexed import IndexedDataset
from .sampler import SampleOrder

IGNORE_INDEX = -100


def fit_sample(tokens: np.ndarray, labels: np.ndarray, seq_length: int, pad_id: int, image_start_id: int,
               num_image_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (input_ids [seq], targets [seq], number of leading images kept)."""
    n = seq_length + 1
    tokens, labels = np.asarray(tokens, np.int64), np.asarray(labels, np.int64)
    starts = np.flatnonzero(tokens[:seq_length] == image_start_id)
    # Span <img> + Q pads + </img> must lie inside input_ids (the first seq_length tokens).
    too_long = starts[starts + num_image_tokens + 1 > seq_length - 1]
    cut = min(n, int(too_long[0])) if too_long.size else n
    kept_images = int(np.count_nonzero(starts < cut))
    tok = np.full(n, pad_id, np.int64)
    lab = np.full(n, IGNORE_INDEX, np.int64)
    m = min(cut, len(tokens))
    tok[:m], lab[:m] = tokens[:m], labels[:m]
    return tok[:-1], lab[1:], kept_images


class MicroBatchLoader:
    """This data-parallel rank's microbatches of each global batch.

    datasets: indexed datasets (or prefixes); weights: blend weights (None = by size is NOT implied:
    equal weights, per SampleOrder). `global_batch(consumed, num_microbatches)` -> list of dicts with
    `input_ids` [b, s] long, `targets` [b, s] long, `images` [n, 3, S, S] float or None.
    """

    def __init__(self, datasets: Sequence, micro_batch_size: int, seq_length: int, image_transform,
                 pad_id: int, image_start_id: int, num_image_tokens: int, weights: Sequence[float] | None = None,
                 seed: int = 1234, data_parallel_rank: int = 0, data_parallel_size: int = 1):
        self.datasets = [d if isinstance(d, IndexedDataset) else IndexedDataset(d) for d in datasets]
        if not self.datasets:
            raise ValueError("MicroBatchLoader: no datasets (--data-path)")
        self.order = SampleOrder([len(d) for d in self.datasets], weights, seed=seed)
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.rank, self.world = data_parallel_rank, data_parallel_size
        self.transform = image_transform
        self.pad_id, self.image_start_id, self.num_image_tokens = pad_id, image_start_id, num_image_tokens
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loader")

    def sample_ids(self, consumed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset ids, sample ids) of this rank's slice of global micro step `step` after `consumed`."""
        m = self.micro_batch_size
        return self.order.lookup_range(consumed + step * m * self.world + self.rank * m, m)

    def microbatch(self, consumed: int, step: int = 0) -> dict:
        ds_ids, sample_ids = self.sample_ids(consumed, step)
        ids, tgts, blobs = [], [], []
        for d, i in zip(ds_ids.tolist(), sample_ids.tolist()):
            tokens, labels, images = self.datasets[d][i]
            input_ids, targets, kept = fit_sample(tokens, labels, self.seq_length, self.pad_id,
                                                  self.image_start_id, self.num_image_tokens)
            ids.append(input_ids)
            tgts.append(targets)
            blobs.extend((d, i, j, b) for j, b in enumerate(images[:kept]))
        batch = {"input_ids": torch.from_numpy(np.stack(ids)), "targets": torch.from_numpy(np.stack(tgts)),
                 "images": None}
        if blobs:
            try:
                batch["images"] = self.transform([b for *_, b in blobs])
            except CorruptImageError as e:
                d, i, j, _ = blobs[e.index] if e.index is not None else (None, None, None, None)
                where = f"{self.datasets[d].prefix} sample {i} image {j}" if d is not None else "a sample"
                raise CorruptImageError(e.index, f"{where}: {e.reason}") from e
        return batch

    def global_batch(self, consumed: int, num_microbatches: int) -> list[dict]:
        return [self.microbatch(consumed, k) for k in range(num_microbatches)]

    def iterate(self, consumed: int, num_microbatches: int, global_batch_size: int) -> Iterator[list[dict]]:
        """Global batches from `consumed` on, the next one prepared in a background thread."""
        future = self._pool.submit(self.global_batch, consumed, num_microbatches)
        while True:
            batch = future.result()
            consumed += global_batch_size
            future = self._pool.submit(self.global_batch, consumed, num_microbatches)
            yield batch


class MockLoader:
    """Random tokens with one image span per sample and random pixels: a pure function of the sample index,
    so it has the same DP-independence and resume behaviour as the real loader (benchmarks, tests)."""

    def __init__(self, micro_batch_size: int, seq_length: int, vocab_size: int, image_size: int,
                 image_start_id: int, num_image_tokens: int, seed: int = 1234, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1):
        self.micro_batch_size, self.seq_length, self.vocab = micro_batch_size, seq_length, vocab_size
        self.image_size, self.start, self.q = image_size, image_start_id, num_image_tokens
        self.seed, self.rank, self.world = seed, data_parallel_rank, data_parallel_size
        if seq_length < num_image_tokens + 4:
            raise ValueError(f"--seq-length {seq_length} cannot hold an image span of {num_image_tokens} tokens")

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.seq_length + 1
        tokens = torch.randint(0, min(self.vocab, self.start), (n,), generator=g, device="cpu")  # host data
        tokens[1], tokens[2:2 + self.q], tokens[2 + self.q] = self.start, self.start + 2, self.start + 1
        labels = tokens.clone()
        labels[: 3 + self.q] = IGNORE_INDEX
        image = torch.randn(3, self.image_size, self.image_size, generator=g, device="cpu")
        return tokens.numpy(), labels.numpy(), image

    def microbatch(self, consumed: int, step: int = 0) -> dict:
        m = self.micro_batch_size
        first = consumed + step * m * self.world + self.rank * m
        samples = [self.sample(first + k) for k in range(m)]
        return {"input_ids": torch.from_numpy(np.stack([s[0][:-1] for s in samples])),
                "targets": torch.from_numpy(np.stack([s[1][1:] for s in samples])),
                "images": torch.stack([s[2] for s in samples])}

    def global_batch(self, consumed: int, num_microbatches: int) -> list[dict]:
        return [self.microbatch(consumed, k) for k in range(num_microbatches)]

    def iterate(self, consumed: int, num_microbatches: int, global_batch_size: int) -> Iterator[list[dict]]:
        while True:
            yield self.global_batch(consumed, num_microbatches)
            consumed += global_batch_size


__all__ = ["fit_sample", "MicroBatchLoader", "MockLoader", "ImageTransform", "IGNORE_INDEX"]
