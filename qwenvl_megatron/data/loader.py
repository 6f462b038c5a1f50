"""Microbatches for megatron's schedules: indexed dataset(s) + global sample order + image transform.

Global batch g covers samples `consumed .. consumed + GBS` of the seeded global order (sampler.py);
microbatch k of data-parallel rank r is the r-th slice of global micro step k. So the union of all ranks'
microbatches is the same set of samples whatever MBS and DP are, and resuming from `consumed_samples`
continues the exact sequence.

Each sample is cut or padded to `seq_length + 1` tokens and shifted: `input_ids = tokens[:-1]`,
`targets = labels[1:]` (labels are HF-style, unshifted, -100 = no loss; padding gets -100). A cut never
splits an image span: the sample ends before an `<img>` whose span would not fit, and that image is
dropped. The microbatch's images are stacked in row-major span order, which is what the model expects.

Under tensor parallelism every rank of a TP group gets the same samples, so image decoding is split:
TP rank r decodes images r, r + tp, r + 2 tp, ... of each microbatch (in the loader's background thread),
and `gather_images`, called on the main thread once the batch is on the training device, all-gathers
the pixels over the TP group into the full `images` tensor. The gather stays off the loader thread
because NCCL collectives must not run concurrently with the training step's. A corrupt image does not
raise in the loader thread under TP: the error travels with the batch and `gather_images` raises it on
every rank of the group after they have agreed on it, so no rank is left waiting in the gather.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .images import CorruptImageError, ImageTransform
from .indexed import IndexedDataset
from .sampler import SampleOrder

IGNORE_INDEX = -100
_PIXEL_DTYPES = (torch.float32, torch.uint8, torch.bfloat16, torch.float16)


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
    With `tensor_parallel_size` > 1 (default: megatron's parallel state when initialised, else 1) a batch
    with images holds only this rank's share until `gather_images` (module docstring).
    """

    def __init__(self, datasets: Sequence, micro_batch_size: int, seq_length: int, image_transform,
                 pad_id: int, image_start_id: int, num_image_tokens: int, weights: Sequence[float] | None = None,
                 seed: int = 1234, data_parallel_rank: int = 0, data_parallel_size: int = 1,
                 tensor_parallel_rank: int | None = None, tensor_parallel_size: int | None = None):
        self.datasets = [d if isinstance(d, IndexedDataset) else IndexedDataset(d) for d in datasets]
        if not self.datasets:
            raise ValueError("MicroBatchLoader: no datasets (--data-path)")
        self.order = SampleOrder([len(d) for d in self.datasets], weights, seed=seed)
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.rank, self.world = data_parallel_rank, data_parallel_size
        self.transform = image_transform
        self.pad_id, self.image_start_id, self.num_image_tokens = pad_id, image_start_id, num_image_tokens
        if tensor_parallel_size is None:
            from megatron.core import parallel_state
            if parallel_state.model_parallel_is_initialized():
                tensor_parallel_rank = parallel_state.get_tensor_model_parallel_rank()
                tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank, self.tp_size = tensor_parallel_rank or 0, tensor_parallel_size or 1
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
        if blobs and self.tp_size == 1:
            batch["images"] = self._decode(blobs, range(len(blobs)))
        elif blobs:  # this TP rank's share; gather_images completes it (and raises a decode error)
            mine = range(self.tp_rank, len(blobs), self.tp_size)
            batch["image_count"], batch["image_error"] = len(blobs), None
            try:
                batch["images"] = self._decode(blobs, mine) if len(mine) else None
            except CorruptImageError as e:
                batch["image_error"] = e
        return batch

    def _decode(self, blobs: list, which: range) -> torch.Tensor:
        """Images `which` of the microbatch; a corrupt one is named by dataset file, sample and image."""
        try:
            return self.transform([blobs[k][3] for k in which])
        except CorruptImageError as e:
            k = which[e.index] if e.index is not None else None
            d, i, j, _ = blobs[k] if k is not None else (None, None, None, None)
            where = f"{self.datasets[d].prefix} sample {i} image {j}" if d is not None else "a sample"
            raise CorruptImageError(k, f"{where}: {e.reason}") from e

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


def gather_images(batch: dict, group=None) -> dict:
    """Complete a microbatch whose images were decoded in shares over the tensor-parallel group.

    Call on the main thread after the batch is on the training device (NCCL gathers device tensors; on
    gloo the device is the CPU); every rank of the group calls it for the same microbatches. Batches
    without shares (TP 1, no images, MockLoader) pass through. First one small all-gather of
    (failed, image shape, dtype) per rank: if any rank failed to decode, every rank raises that
    CorruptImageError (the failing rank its own); otherwise the shares, padded to equal size, are
    all-gathered and interleaved back into microbatch order.
    """
    if "image_count" not in batch:
        return batch
    batch = dict(batch)
    n, error, share = batch.pop("image_count"), batch.pop("image_error"), batch["images"]
    if group is None:
        from megatron.core import parallel_state
        group = parallel_state.get_tensor_model_parallel_group()
    size, device = dist.get_world_size(group), batch["input_ids"].device
    info = [int(error is not None), 0, 0, 0, 0]  # failed, image shape, dtype
    if error is None and share is not None:
        info[1:] = [*share.shape[1:], _PIXEL_DTYPES.index(share.dtype)]
    meta = torch.tensor(info, dtype=torch.int64, device=device)
    metas = [torch.empty(5, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(metas, meta, group=group)
    metas = [m.tolist() for m in metas]
    if any(m[0] for m in metas):
        errors = [None] * size
        dist.all_gather_object(errors, None if error is None else (error.index, error.reason), group=group)
        if error is not None:
            raise error
        raise CorruptImageError(*next(e for e in errors if e is not None))
    shape, dtype = next((m[1:4], _PIXEL_DTYPES[m[4]]) for m in metas if m[1])
    per_rank = -(-n // size)
    padded = torch.zeros((per_rank, *shape), dtype=dtype, device=device)
    if share is not None:
        padded[: len(share)] = share
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    # Rank r's p-th image is image p * size + r of the microbatch.
    batch["images"] = torch.stack(parts, 1).flatten(0, 1)[:n]
    return batch


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


__all__ = ["fit_sample", "MicroBatchLoader", "MockLoader", "gather_images", "ImageTransform", "IGNORE_INDEX"]
