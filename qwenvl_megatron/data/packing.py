"""Sequence packing: consecutive samples of the global order packed into rows of `--seq-length` tokens.

A global batch of R rows (R = `--global-batch-size`, counted in rows when packing) starting at cursor c
(the number of samples of the global order consumed before it) is built by one deterministic pass over
samples c, c+1, ...: each sample goes into the first of the last `open_rows` rows of its task that still has
room for it; when none has, a new row is opened; the batch ends at the first sample that would need row
R + 1, and that sample is the next batch's cursor. So:

- which samples a row holds is a pure function of (seed, dataset sizes and weights, cursor, R, seq_length,
  same_task): never of the data-parallel size, the micro batch size or anything that happened before the
  cursor. The cursor is the `consumed_samples` counter the checkpoints already keep; a resumed run
  continues exactly (every batch starts with no open row, so there is no packer state to save);
- the samples of a batch are a contiguous stretch [c, c') of the global order: nothing is skipped or
  deferred, and the blend weights and epochs of sampler.py hold as for unpacked training;
- the pass reads only the index's `lengths` (no tokens, no images) of the samples of this one batch:
  nothing per-sample is materialised for the run (stage 2: 78M samples), nothing is set up at start.

A sample occupies `min(max(len - 1, 1), seq_length)` positions (its shifted input, loader.fit_sample);
a longer sample is cut as without packing (never inside an image span) and fills a row alone. Samples stay
whole, so image spans are never split. With `same_task` a row only holds samples of one task; the task of
a sample is its dataset's: one `--data-path` prefix per task, the stage-2 blend of per-task datasets
(preprocess each task's records into its own prefix, as tools/bench_packing.py does; the index format is
unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .sampler import SampleOrder


@dataclass(frozen=True)
class PackedSample:
    position: int  # index in the global order
    dataset: int
    sample: int
    tokens: int  # positions it occupies in its row


@dataclass
class PackedBatch:
    rows: list[list[PackedSample]]
    cursor: int  # the first sample of this batch in the global order
    next_cursor: int  # the first sample of the next batch

    @property
    def num_samples(self) -> int:
        return self.next_cursor - self.cursor

    def row_tokens(self) -> list[int]:
        return [sum(s.tokens for s in row) for row in self.rows]


class Packer:
    """`pack(cursor) -> PackedBatch` of `rows_per_batch` rows (see the module docstring).

    lengths: per dataset, the samples' token counts (IndexedDataset.lengths; int arrays, indexed by sample
    id). tasks: task id per dataset (default: every dataset its own task); used only with same_task.
    open_rows: how many of the most recently opened rows of a task still take samples (first fit over them).
    """

    def __init__(self, order: SampleOrder, lengths: Sequence[np.ndarray], seq_length: int, rows_per_batch: int,
                 same_task: bool = False, tasks: Sequence[int] | None = None, open_rows: int = 16):
        if len(lengths) != order.num_datasets:
            raise ValueError(f"Packer: {len(lengths)} length arrays for {order.num_datasets} datasets")
        if rows_per_batch < 1 or seq_length < 1 or open_rows < 1:
            raise ValueError("Packer: rows_per_batch, seq_length and open_rows must be >= 1")
        self.order, self.lengths = order, list(lengths)
        self.seq_length, self.rows_per_batch = int(seq_length), int(rows_per_batch)
        self.same_task, self.open_rows = bool(same_task), int(open_rows)
        self.tasks = np.asarray(list(tasks) if tasks is not None else range(order.num_datasets), np.int64)

    def sample_tokens(self, dataset_ids: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
        """Positions each sample occupies in a row (its shifted input, cut at seq_length)."""
        out = np.empty(len(sample_ids), np.int64)
        for d in np.unique(dataset_ids):
            sel = dataset_ids == d
            out[sel] = self.lengths[int(d)][sample_ids[sel]]
        return np.clip(out - 1, 1, self.seq_length)

    def pack(self, cursor: int) -> PackedBatch:
        cursor = int(cursor)
        if cursor < 0:
            raise ValueError(f"Packer: cursor {cursor} must be >= 0")
        R, seq, keep = self.rows_per_batch, self.seq_length, self.open_rows
        rows: list[list[PackedSample]] = []
        free: list[int] = []
        open_by_task: dict[int, list[int]] = {}
        k, chunk = cursor, max(64, 4 * R)
        while True:
            ds_ids, sample_ids = self.order.lookup_range(k, chunk)
            tokens = self.sample_tokens(ds_ids, sample_ids)
            task_ids = self.tasks[ds_ids] if self.same_task else np.zeros(len(ds_ids), np.int64)
            for d, i, n, t in zip(ds_ids.tolist(), sample_ids.tolist(), tokens.tolist(), task_ids.tolist()):
                candidates = open_by_task.setdefault(t, [])
                row = next((r for r in candidates if free[r] >= n), None)
                if row is None:
                    if len(rows) == R:
                        return PackedBatch(rows, cursor, k)
                    row = len(rows)
                    rows.append([])
                    free.append(seq)
                    candidates.append(row)
                    if len(candidates) > keep:
                        candidates.pop(0)
                rows[row].append(PackedSample(k, d, i, n))
                free[row] -= n
                if free[row] == 0:
                    candidates.remove(row)
                k += 1
            chunk *= 2


__all__ = ["Packer", "PackedBatch", "PackedSample"]
