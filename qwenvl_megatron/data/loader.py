"""Microbatches for megatron's schedules: indexed dataset(s) + global sample order + image transform.

Global batch g covers samples `consumed .. consumed + GBS` of the seeded global order (sampler.py);
microbatch k of data-parallel rank r is the r-th slice of global micro step k. So the union of all ranks'
microbatches is the same set of samples whatever MBS and DP are, and resuming from `consumed_samples`
continues the exact sequence.

Each sample is cut or padded to `seq_length + 1` tokens and shifted: `input_ids = tokens[:-1]`,
`targets = labels[1:]` (labels are HF-style, unshifted, -100 = no loss; padding gets -100). A cut never
splits an image span: the sample ends before an `<img>` whose span would not fit, and that image is
dropped. The microbatch's images are stacked in row-major span order, which is what the model expects.

Packing (`pack_sequences`, data/packing.py): the global batch is num_microbatches x MBS x DP rows packed
from sample `consumed` on; rank r takes its slice of each global micro step's rows, as it does samples.
Each sample is fitted and shifted on its own and the row is its samples back to back, then padding; with
per-sample attention the batch carries `position_ids` that restart at 0 with every sample. Every batch
says how many of its positions are real (`real_tokens`) and where its samples lie (`samples`), and a
global batch says where the next one starts (`GlobalBatch.consumed_after`, the checkpoint's counter).

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
from .packing import Packer
from .sampler import SampleOrder

IGNORE_INDEX = -100
_PIXEL_DTYPES = (torch.float32, torch.uint8, torch.bfloat16, torch.float16)


def fit_sample(tokens: np.ndarray, labels: np.ndarray, seq_length: int, pad_id: int, image_start_id: int,
               num_image_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (input_ids [seq], targets [seq], number of leading images kept)."""
    return _fit(tokens, labels, seq_length, pad_id, image_start_id, num_image_tokens)[:3]


def _fit(tokens, labels, seq_length, pad_id, image_start_id, num_image_tokens):
    """fit_sample and the number of real (non-padding) input positions."""
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
    return tok[:-1], lab[1:], kept_images, max(m - 1, 0)


class GlobalBatch(list):
    """This rank's microbatches of one global batch, and where the next global batch starts in the global
    sample order (`consumed_after`: + GBS samples unpacked, the packer's next cursor when packing)."""

    def __init__(self, microbatches, consumed_after: int):
        super().__init__(microbatches)
        self.consumed_after = consumed_after


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
                 tensor_parallel_rank: int | None = None, tensor_parallel_size: int | None = None,
                 pack_sequences: bool = False, pack_same_task: bool = False, packed_attention: str = "per-sample",
                 tasks: Sequence[int] | None = None):
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
        if packed_attention not in ("causal", "per-sample"):
            raise ValueError(f"packed_attention must be 'causal' or 'per-sample', got {packed_attention!r}")
        self.pack_sequences, self.pack_same_task = pack_sequences, pack_same_task
        self.packed_attention, self.tasks = packed_attention, tasks
        self._packers: dict[int, Packer] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loader")

    def sample_ids(self, consumed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset ids, sample ids) of this rank's slice of global micro step `step` after `consumed`."""
        m = self.micro_batch_size
        return self.order.lookup_range(consumed + step * m * self.world + self.rank * m, m)

    def microbatch(self, consumed: int, step: int = 0) -> dict:
        """Unpacked: this rank's samples of global micro step `step`, each padded to a row."""
        ds_ids, sample_ids = self.sample_ids(consumed, step)
        rows = [[(d, i, None)] for d, i in zip(ds_ids.tolist(), sample_ids.tolist())]
        return self._assemble(rows)

    def samples_batch(self, samples: Sequence[tuple[int, int]]) -> dict:
        """A microbatch of the given (dataset id, sample id) pairs, one padded row each (tests, benchmarks)."""
        return self._assemble([[(int(d), int(i), None)] for d, i in samples])

    def packer(self, rows_per_batch: int) -> Packer:
        if rows_per_batch not in self._packers:
            self._packers[rows_per_batch] = Packer(self.order, [d.lengths for d in self.datasets], self.seq_length,
                                                   rows_per_batch, same_task=self.pack_same_task, tasks=self.tasks)
        return self._packers[rows_per_batch]

    def packed_rows(self, packed, rows: Sequence[int]) -> dict:
        """A microbatch of the rows `rows` of a PackedBatch."""
        return self._assemble([[(s.dataset, s.sample, s.tokens) for s in packed.rows[r]] for r in rows])

    def _assemble(self, rows: list[list[tuple[int, int, int | None]]]) -> dict:
        """rows: per row its samples (dataset id, sample id, positions taken; None = the whole row, padded).

        Each sample is fitted and shifted on its own (fit_sample), so no sample predicts the next one's first
        token; a packed row is its samples' inputs back to back, then padding. `position_ids` (per-sample
        packed attention only) restart at 0 with every sample and with the padding at the end of a row.
        """
        seq, packed = self.seq_length, any(n is not None for row in rows for _, _, n in row)
        ids = np.full((len(rows), seq), self.pad_id, np.int64)
        tgts = np.full((len(rows), seq), IGNORE_INDEX, np.int64)
        pos = np.zeros((len(rows), seq), np.int64)
        blobs, layout, real = [], [], 0
        for r, row in enumerate(rows):
            at, placed = 0, []
            for d, i, n in row:
                tokens, labels, images = self.datasets[d][i]
                input_ids, targets, kept, length = _fit(tokens, labels, seq, self.pad_id, self.image_start_id,
                                                        self.num_image_tokens)
                n = seq if n is None else n
                ids[r, at: at + n], tgts[r, at: at + n] = input_ids[:n], targets[:n]
                pos[r, at: at + n] = np.arange(n)
                real += min(length, n)
                placed.append((d, i, at, n))
                blobs.extend((d, i, j, b) for j, b in enumerate(images[:kept]))
                at += n
            pos[r, at:] = np.arange(seq - at)
            layout.append(placed)
        batch = {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(tgts), "images": None,
                 "real_tokens": real, "samples": layout}
        if packed and self.packed_attention == "per-sample":
            batch["position_ids"] = torch.from_numpy(pos)
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

    def global_batch(self, consumed: int, num_microbatches: int) -> GlobalBatch:
        """This rank's microbatches of the global batch that starts at sample `consumed` of the global order.
        Packing: the global batch is num_microbatches x MBS x DP rows (data/packing.py); row q of global
        micro step k goes to rank q // MBS, as samples do without packing."""
        m = self.micro_batch_size
        if not self.pack_sequences:
            return GlobalBatch([self.microbatch(consumed, k) for k in range(num_microbatches)],
                               consumed + num_microbatches * m * self.world)
        packed = self.packer(num_microbatches * m * self.world).pack(consumed)
        first = self.rank * m
        return GlobalBatch([self.packed_rows(packed, range(k * m * self.world + first, k * m * self.world + first + m))
                            for k in range(num_microbatches)], packed.next_cursor)

    def iterate(self, consumed: int, num_microbatches: int, global_batch_size: int) -> Iterator[GlobalBatch]:
        """Global batches from `consumed` on, the next one prepared in a background thread."""
        future = self._pool.submit(self.global_batch, consumed, num_microbatches)
        while True:
            batch = future.result()
            future = self._pool.submit(self.global_batch, batch.consumed_after, num_microbatches)
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

    def global_batch(self, consumed: int, num_microbatches: int) -> GlobalBatch:
        return GlobalBatch([self.microbatch(consumed, k) for k in range(num_microbatches)],
                           consumed + num_microbatches * self.micro_batch_size * self.world)

    def iterate(self, consumed: int, num_microbatches: int, global_batch_size: int) -> Iterator[GlobalBatch]:
        while True:
            batch = self.global_batch(consumed, num_microbatches)
            yield batch
            consumed = batch.consumed_after


__all__ = ["fit_sample", "GlobalBatch", "MicroBatchLoader", "MockLoader", "gather_images", "ImageTransform", "IGNORE_INDEX"]
