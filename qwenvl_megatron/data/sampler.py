"""The global sample order: which (dataset, sample) is the k-th sample of training.

The order is a pure function of (seed, dataset sizes, weights, k), computed on the fly in C++
(csrc/sample_order.cpp): nothing proportional to the number of samples is ever built, so 1.5B samples
cost no memory and no set-up time. Because the *global* sequence is fixed, a data-parallel rank just takes
its slice of each global micro step, and resuming from ``consumed_samples`` continues the same sequence.

- Blending: dataset i's draws are spaced at period ~1/w_i and merged by time (Webster/Sainte-Lague
  apportionment), so after any k samples each dataset has contributed round(w_i * k) +- 1.
- Epochs: dataset i's draw j is epoch ``j // n_i``; every epoch is a fresh keyed Feistel permutation of
  [0, n_i) (cycle walking), keyed by (seed, dataset, epoch).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from qwenvl_megatron import _indexed


class SampleOrder:
    """``lookup(k) -> (dataset_id, sample_id)``; ``lookup_range(start, count) -> (dataset_ids, sample_ids)``."""

    def __init__(self, dataset_sizes: Sequence[int], weights: Sequence[float] | None = None, seed: int = 1234,
                 shuffle: bool = True):
        sizes = [int(s) for s in dataset_sizes]
        if not sizes:
            raise ValueError("SampleOrder: dataset_sizes is empty")
        for i, s in enumerate(sizes):
            if s <= 0:
                raise ValueError(f"SampleOrder: dataset {i} has size {s}; every dataset needs >= 1 sample")
        w = [float(x) for x in weights] if weights is not None else []
        if w and len(w) != len(sizes):
            raise ValueError(f"SampleOrder: {len(w)} weights for {len(sizes)} datasets")
        for i, x in enumerate(w):
            if not x > 0:
                raise ValueError(f"SampleOrder: weight {x} of dataset {i} must be > 0")
        if not 0 <= int(seed) < 2 ** 64:
            raise ValueError(f"SampleOrder: seed {seed} must be in [0, 2**64)")
        self.dataset_sizes = sizes
        self.weights = w or [1.0] * len(sizes)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._order = _indexed.SampleOrder(sizes, w, self.seed, shuffle)

    @property
    def num_datasets(self) -> int:
        return len(self.dataset_sizes)

    def lookup(self, k: int) -> tuple[int, int]:
        return self._order.lookup(int(k))

    def lookup_range(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``start .. start+count-1``: (dataset_ids int32, sample_ids int64); the GIL is released."""
        return self._order.lookup_range(int(start), int(count))

    def draws_before(self, k: int) -> list[int]:
        """How many of the first ``k`` samples each dataset contributed (its epoch = draws // size)."""
        return self._order.draws_before(int(k))

    def epochs_before(self, k: int) -> list[float]:
        return [d / n for d, n in zip(self.draws_before(k), self.dataset_sizes)]


class DataParallelSampler:
    """This rank's micro batches of the global order.

    Global micro step s covers samples ``consumed + s*m*D .. + m*D``; rank r takes the r-th slice of m.
    The union over ranks, in rank order, is exactly the global sequence, whatever D, and starting at
    ``consumed_samples`` (which must be a multiple of m*D, as it is at a global-batch boundary) resumes it.
    Yields ``(dataset_ids, sample_ids)`` arrays of length m.
    """

    def __init__(self, order: SampleOrder, micro_batch_size: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, consumed_samples: int = 0, total_samples: int | None = None):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        step = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(f"consumed_samples {consumed_samples} must be a non-negative multiple of "
                             f"micro_batch_size * data_parallel_size = {step}")
        self.order = order
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.world = data_parallel_size
        self.consumed_samples = consumed_samples
        self.total_samples = total_samples

    def micro_batch(self, consumed_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's micro batch of the global micro step that starts at ``consumed_samples``."""
        return self.order.lookup_range(consumed_samples + self.rank * self.micro_batch_size,
                                       self.micro_batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = self.micro_batch_size * self.world
        while self.total_samples is None or self.consumed_samples + step <= self.total_samples:
            batch = self.micro_batch(self.consumed_samples)
            self.consumed_samples += step
            yield batch


__all__ = ["SampleOrder", "DataParallelSampler"]
