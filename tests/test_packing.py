"""Sequence packing (--pack-sequences): the packer's rows, the loader's packed microbatches, per-sample
attention against unpacked samples (TP1, TP2, PP2), the loss and exact resume of a packed trainer run.
The model checks run in workers/packing.py under torchrun and device_discipline (~30 s)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from qwenvl_megatron.data.packing import Packer
from qwenvl_megatron.data.sampler import SampleOrder
from qwenvl_megatron.models import packed as P

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "workers"))


def _packer(rows=16, seq=2048, same_task=False, seed=3):
    rng = np.random.default_rng(0)
    sizes = [500, 300, 200]
    lengths = [rng.integers(30, 700, n).astype(np.int32) for n in sizes]
    lengths[2][7] = 5000  # longer than a row: cut, alone in its row
    order = SampleOrder(sizes, [0.5, 0.3, 0.2], seed=seed)
    return Packer(order, lengths, seq, rows, same_task=same_task), order, lengths


@pytest.mark.parametrize("same_task", [False, True])
def test_rows_hold_whole_contiguous_samples(same_task):
    packer, order, lengths = _packer(same_task=same_task)
    cursor, seen_cut = 0, False
    for _ in range(30):
        batch = packer.pack(cursor)
        assert batch.cursor == cursor and len(batch.rows) == 16
        flat = [s for row in batch.rows for s in row]
        assert sorted(s.position for s in flat) == list(range(cursor, batch.next_cursor)), "contiguous, none skipped"
        for s in flat:
            assert (s.dataset, s.sample) == order.lookup(s.position)
            assert s.tokens == min(max(int(lengths[s.dataset][s.sample]) - 1, 1), 2048)
        for row in batch.rows:
            assert sum(s.tokens for s in row) <= 2048
            if any(s.tokens == 2048 for s in row):
                assert len(row) == 1
                seen_cut = True
            if same_task:
                assert len({s.dataset for s in row}) == 1, "a row mixes tasks"
        # The next sample did not fit: the batch could not have taken it.
        cursor = batch.next_cursor
    assert seen_cut


def test_packing_is_a_pure_function_of_the_cursor():
    a, _, _ = _packer()
    cursors = [0]
    for _ in range(5):
        cursors.append(a.pack(cursors[-1]).next_cursor)
    b, _, _ = _packer()  # fresh packer, straight to the 4th batch: same rows
    assert b.pack(cursors[4]).rows == a.pack(cursors[4]).rows
    assert _packer(seed=4)[0].pack(0).rows != a.pack(0).rows  # the seed matters


@pytest.mark.parametrize("same_task,limit", [(False, 0.02), (True, 0.10)])
def test_padding_is_small(same_task, limit):
    packer, _, _ = _packer(rows=256, same_task=same_task)
    batch = packer.pack(1000)
    padding = 1 - sum(batch.row_tokens()) / (256 * 2048)
    assert padding < limit, padding


def test_attention_mask_rotary_and_thd_params():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    mask = P.attention_mask(pos)
    assert mask.shape == (2, 1, 6, 6)
    seen = ~mask[0, 0]
    want = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6)):
        want[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(seen, want)
    table = torch.arange(10.0).reshape(10, 1, 1, 1).expand(10, 1, 1, 4)
    rot = P.rotary_per_token(table, pos)
    assert rot.shape == (6, 2, 1, 4) and torch.equal(rot[:, 1, 0, 0], torch.tensor([0.0, 1, 2, 3, 0, 1]))
    params = P.packed_seq_params(pos)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 10, 12] and params.max_seqlen_q == 4
    x = torch.randn(6, 2, 8)
    assert torch.equal(P.to_thd(x)[6:, 0], x[:, 1]) and torch.equal(P.from_thd(P.to_thd(x), 2), x)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from train_multi import write_dataset
    from qwenvl_megatron.models.config import tiny
    prefix = str(tmp_path_factory.mktemp("packdata") / "train")
    write_dataset(prefix, tiny(), n=60)
    return prefix


def _loader(prefix, mbs, rank, world, attention="per-sample"):
    from qwenvl_megatron.data.images import ImageTransform
    from qwenvl_megatron.data.loader import MicroBatchLoader
    from qwenvl_megatron.models.config import tiny
    cfg = tiny()
    return MicroBatchLoader([prefix], mbs, 128, ImageTransform(112, backend="pil"), 0, cfg.image_start_id,
                            cfg.adapter.num_queries, seed=7, data_parallel_rank=rank, data_parallel_size=world,
                            tensor_parallel_size=1, pack_sequences=True, packed_attention=attention)


def test_rows_do_not_depend_on_data_parallel_size(dataset):
    """DP1 x MBS4 vs DP2 x MBS2: the same rows, in the same global order, over two global batches."""
    one = _loader(dataset, 4, 0, 1)
    two = [_loader(dataset, 2, r, 2) for r in range(2)]
    cursor = 0
    for _ in range(2):
        a = one.global_batch(cursor, 2)
        b = [ld.global_batch(cursor, 2) for ld in two]
        assert a.consumed_after == b[0].consumed_after == b[1].consumed_after > cursor
        for k in range(2):
            for key in ("input_ids", "targets", "position_ids", "images"):
                joined = torch.cat([b[0][k][key], b[1][k][key]])
                assert torch.equal(a[k][key], joined), key
            assert a[k]["samples"] == b[0][k]["samples"] + b[1][k]["samples"]
        cursor = a.consumed_after


def test_packed_microbatch_layout(dataset):
    from qwenvl_megatron.data.indexed import IndexedDataset
    from qwenvl_megatron.models.config import tiny
    cfg, ds = tiny(), IndexedDataset(dataset)
    batch = _loader(dataset, 4, 0, 1).global_batch(0, 1)[0]
    q, ids, pos = cfg.adapter.num_queries, batch["input_ids"], batch["position_ids"]
    real = 0
    for r, row in enumerate(batch["samples"]):
        assert len(row) >= 2, "rows hold several samples"
        for d, i, at, n in row:
            tokens, labels, _ = ds[i]
            assert n == min(len(tokens) - 1, 128)
            assert ids[r, at: at + n].tolist() == tokens[:n].tolist()  # the sample whole, in place
            assert batch["targets"][r, at: at + n].tolist() == labels[1: n + 1].tolist()  # shifted on its own
            assert pos[r, at: at + n].tolist() == list(range(n))
            real += n
        starts = (ids[r] == cfg.image_start_id).nonzero().flatten().tolist()
        for s in starts:  # an image span lies inside one sample
            assert (pos[r, s: s + q + 2] == pos[r, s] + torch.arange(q + 2)).all()
            assert ids[r, s + q + 1] == cfg.image_start_id + 1
    assert batch["real_tokens"] == real
    assert batch["images"].shape[0] == int((ids == cfg.image_start_id).sum())
    assert "position_ids" not in _loader(dataset, 4, 0, 1, "causal").global_batch(0, 1)[0]


def test_flags(tmp_path):
    from qwenvl_megatron.training.arguments import parse_args
    prefix = str(tmp_path / "x")  # input paths are checked when the flags are resolved: they must exist
    for suffix in (".bin", ".idx"):
        open(prefix + suffix, "wb").close()
    base = ["--model", "tiny", "--train-iters", "4", "--global-batch-size", "8", "--data-path", prefix]
    with pytest.raises(SystemExit, match="need --pack-sequences"):
        parse_args(base + ["--pack-same-task"])
    with pytest.raises(SystemExit, match="not implemented"):
        parse_args(base + ["--pack-sequences", "--sequence-parallel"])
    args = parse_args(base + ["--pack-sequences"])
    assert args.packed_attention == "per-sample" and not args.pack_same_task


# ------------------------------------------------------------------------------------- model, trainer
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("packing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, os.path.join(HERE, "workers", "packing.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=420,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "packing.json").read_text())


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_per_sample_losses_equal_unpacked(worker, layout):
    r = worker["equivalence"][layout]
    assert r["samples"] > len(r["samples_per_row"]) and r["images"] > 0
    assert r["max_diff"] <= 1e-5, f"{layout}: packed per-token losses differ by {r['max_diff']}"
    # Control: under causal packed attention a later sample of a row sees the ones before it.
    assert r["causal_first_diff"] <= 1e-5 and r["causal_later_diff"] > 1e-3
    assert r["tokens"][0] == r["tokens"][1]
    assert r["loss_packed"] == pytest.approx(r["loss_unpacked"], rel=1e-6)


def test_packed_resume_reproduces_the_uninterrupted_run(worker):
    r = worker["resume"]
    assert [h[0] for h in r["full"]] == [1, 2, 3, 4]
    assert r["first"] + r["second"] == r["full"], "per-step loss, grad norm and LR must be identical"
    full, first, second = r["consumed"]
    assert second == full and 0 < first < full and full > 4 * 8, "the cursor counts samples, not rows"
    assert r["markers"] == [4, 4]
