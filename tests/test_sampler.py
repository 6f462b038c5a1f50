"""The global sample order: per-epoch permutations, blending, DP-size independence and resume."""
import numpy as np
import pytest

from qwenvl_megatron.data.sampler import DataParallelSampler, SampleOrder


def _reference_blend(weights, count):
    """Sainte-Lague by brute force: next sample goes to argmin over i of (2*c_i + 1) / w_i (ties: lower id)."""
    w = np.asarray(weights, float) / sum(weights)
    c = np.zeros(len(w), int)
    out = []
    for _ in range(count):
        i = int(np.argmin((2 * c + 1) / w))
        out.append(i)
        c[i] += 1
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_each_epoch_is_a_fresh_permutation(n):
    order = SampleOrder([n], seed=11)
    ds, ids = order.lookup_range(0, 3 * n)
    assert (ds == 0).all()
    epochs = ids.reshape(3, n)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    if n >= 17:
        assert (epochs[0] != epochs[1]).mean() > 0.8 and (epochs[1] != epochs[2]).mean() > 0.8
        assert (epochs[0] != np.arange(n)).mean() > 0.8  # actually shuffled


def test_lookup_matches_range_and_seed_matters():
    order = SampleOrder([50, 13, 7], weights=[0.6, 0.3, 0.1], seed=5)
    ds, ids = order.lookup_range(0, 400)
    assert [order.lookup(k) for k in range(400)] == list(zip(ds.tolist(), ids.tolist()))
    for start in (1, 2, 99, 250, 333):
        d2, i2 = order.lookup_range(start, 50)
        np.testing.assert_array_equal(d2, ds[start:start + 50])
        np.testing.assert_array_equal(i2, ids[start:start + 50])
    other = SampleOrder([50, 13, 7], weights=[0.6, 0.3, 0.1], seed=6).lookup_range(0, 400)
    np.testing.assert_array_equal(other[0], ds)  # blending pattern depends on weights only
    assert (other[1] != ids).mean() > 0.5


def test_blending_follows_weights_exactly():
    weights = [0.5, 0.25, 0.15, 0.1]
    order = SampleOrder([1000, 200, 30, 5], weights=weights, seed=1)
    ds, ids = order.lookup_range(0, 2000)
    np.testing.assert_array_equal(ds, _reference_blend(weights, 2000))
    for k in (0, 1, 7, 100, 1999, 2000):
        np.testing.assert_array_equal(order.draws_before(k), np.bincount(ds[:k], minlength=4))
        assert np.all(np.abs(np.bincount(ds[:k], minlength=4) - np.asarray(weights) * k) <= 1)
    # Within each dataset, its draws walk through epochs of permutations of [0, n).
    for d, n in enumerate(order.dataset_sizes):
        mine = ids[ds == d]
        full = len(mine) // n
        for e in range(full):
            np.testing.assert_array_equal(np.sort(mine[e * n:(e + 1) * n]), np.arange(n))
        np.testing.assert_array_equal(mine, [order._order.sample_of_draw(d, j) for j in range(len(mine))])


def test_unequal_integer_weights_and_ties():
    order = SampleOrder([10, 10], weights=[1, 1], seed=0)
    ds, _ = order.lookup_range(0, 10)
    np.testing.assert_array_equal(ds, [0, 1] * 5)
    order = SampleOrder([10, 10, 10], weights=[3, 2, 1], seed=0)
    np.testing.assert_array_equal(order.lookup_range(0, 600)[0], _reference_blend([3, 2, 1], 600))


def test_far_positions_single_dataset_1p4b():
    n = 1_400_000_000
    order = SampleOrder([n], seed=1234)
    start = 1_539_999_000  # second epoch, near the end of stage 1
    ds, ids = order.lookup_range(start, 1000)
    assert (ds == 0).all() and ids.min() >= 0 and ids.max() < n and len(np.unique(ids)) == 1000
    assert order.lookup(start + 999) == (0, int(ids[-1]))
    assert order.epochs_before(start)[0] == pytest.approx(start / n)
    # Same position within epochs 0 and 1 maps to different samples.
    assert order.lookup(5)[1] != order.lookup(n + 5)[1]


def test_far_positions_blended():
    order = SampleOrder([1_000_000_000, 300_000_000, 7], weights=[0.7, 0.299, 0.001], seed=3)
    k = 1_500_000_123
    ds, ids = order.lookup_range(k - 5, 10)
    assert [order.lookup(k - 5 + i) for i in range(10)] == list(zip(ds.tolist(), ids.tolist()))
    counts = order.draws_before(k)
    assert sum(counts) == k
    assert all(abs(c - w * k) <= 1 for c, w in zip(counts, [0.7, 0.299, 0.001]))


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_global_sequence_independent_of_dp_size(dp_size):
    order = SampleOrder([97, 31], weights=[2, 1], seed=9)
    m = 2
    steps = 12 // dp_size  # 24 samples of global sequence in every configuration
    per_rank = [list(DataParallelSampler(order, m, r, dp_size, total_samples=steps * m * dp_size))
                for r in range(dp_size)]
    assert all(len(p) == steps for p in per_rank)
    glued_ds, glued_ids = [], []
    for s in range(steps):
        for r in range(dp_size):
            glued_ds.append(per_rank[r][s][0])
            glued_ids.append(per_rank[r][s][1])
    expected = order.lookup_range(0, 24)
    np.testing.assert_array_equal(np.concatenate(glued_ds), expected[0])
    np.testing.assert_array_equal(np.concatenate(glued_ids), expected[1])


def test_resume_from_consumed_samples():
    order = SampleOrder([50, 20], weights=[0.8, 0.2], seed=2)
    full = list(DataParallelSampler(order, 3, 1, 2, total_samples=60))
    resumed = list(DataParallelSampler(order, 3, 1, 2, consumed_samples=24, total_samples=60))
    assert len(full) == 10 and len(resumed) == 6
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # A fresh object with the same arguments rebuilds the same order (pure function of the seed).
    again = SampleOrder([50, 20], weights=[0.8, 0.2], seed=2)
    np.testing.assert_array_equal(again.lookup_range(24, 36)[1], order.lookup_range(24, 36)[1])


def test_no_shuffle_is_sequential():
    ds, ids = SampleOrder([4], shuffle=False).lookup_range(0, 10)
    np.testing.assert_array_equal(ids, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset 1 has size 0"):
        SampleOrder([3, 0])
    with pytest.raises(ValueError, match="2 weights for 3 datasets"):
        SampleOrder([3, 3, 3], weights=[1, 2])
    with pytest.raises(ValueError, match="must be > 0"):
        SampleOrder([3], weights=[0])
    order = SampleOrder([3])
    with pytest.raises(ValueError, match="multiple of"):
        DataParallelSampler(order, 2, 0, 2, consumed_samples=3)
    with pytest.raises(ValueError, match="not in"):
        DataParallelSampler(order, 2, 2, 2)
