"""The .bin/.idx multimodal dataset: round trip, batched gather, merge, and corruption caught at open."""
import os
import struct
import zlib

import numpy as np
import pytest

from qwenvl_megatron import _indexed
from qwenvl_megatron.data.formats import Sample
from qwenvl_megatron.data.indexed import IndexedDataset, IndexedDatasetWriter, merge_datasets


def _samples(seed: int, count: int):
    """Random samples with 0..2 images of random bytes each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        L = int(rng.integers(1, 40))
        tokens = rng.integers(0, 151860, L).astype(np.int32)
        labels = np.where(rng.random(L) < 0.5, -100, tokens).astype(np.int32)
        n_img = int(rng.integers(0, 3))
        blobs = [rng.integers(0, 256, int(rng.integers(0, 300))).astype(np.uint8).tobytes() for _ in range(n_img)]
        out.append((Sample(tokens, labels, [f"img/{i}_{k}.png" for k in range(n_img)]), blobs))
    return out


def _write(prefix, samples):
    with IndexedDatasetWriter(prefix) as w:
        for s, blobs in samples:
            w.add(s, blobs)
    return prefix


def _assert_same(got, expected):
    sample, blobs = expected
    tokens, labels, images = got
    assert tokens.dtype == np.int32 and labels.dtype == np.int32
    np.testing.assert_array_equal(tokens, sample.tokens)
    np.testing.assert_array_equal(labels, sample.labels)
    assert images == blobs


def test_round_trip_get_gather_lengths(tmp_path):
    samples = _samples(0, 50)
    ds = IndexedDataset(_write(str(tmp_path / "a"), samples))
    assert len(ds) == 50
    for i, expected in enumerate(samples):
        _assert_same(ds[i], expected)
    _assert_same(ds[-1], samples[-1])
    order = [7, 3, 3, 49, 0, -2]
    for got, i in zip(ds.gather(np.array(order)), order):
        _assert_same(got, samples[i])
    np.testing.assert_array_equal(ds.lengths, [len(s.tokens) for s, _ in samples])
    np.testing.assert_array_equal(ds.image_counts, [len(b) for _, b in samples])
    assert not ds.lengths.flags.writeable
    assert ds.num_images == sum(len(b) for _, b in samples)
    assert ds.num_tokens == sum(len(s.tokens) for s, _ in samples)
    ds.verify()
    with pytest.raises(IndexError, match="out of range"):
        ds[50]


def test_lengths_view_keeps_reader_alive(tmp_path):
    samples = _samples(1, 5)
    lengths = IndexedDataset(_write(str(tmp_path / "a"), samples)).lengths  # dataset object dropped
    np.testing.assert_array_equal(lengths, [len(s.tokens) for s, _ in samples])


def test_header_checksums_match_zlib(tmp_path):
    prefix = _write(str(tmp_path / "a"), _samples(2, 10))
    idx = open(prefix + ".idx", "rb").read()
    bin_ = open(prefix + ".bin", "rb").read()
    magic, version, header_crc, n, m, ntok, bin_size, index_crc, data_crc, _ = struct.unpack_from("<8sIIQQQQIIQ", idx)
    assert (magic, version, n, bin_size) == (b"QVLIDX\x00\x01", 1, 10, len(bin_))
    assert index_crc == zlib.crc32(idx[64:]) == _indexed.crc32(idx[64:])
    assert data_crc == zlib.crc32(bin_[16:])
    assert header_crc == zlib.crc32(idx[:12] + bytes(4) + idx[16:64])


def test_merge_concatenates_in_order(tmp_path):
    a, b, c = _samples(3, 7), _samples(4, 0), _samples(5, 11)
    prefixes = [_write(str(tmp_path / name), s) for name, s in (("a", a), ("b", b), ("c", c))]
    merge_datasets(prefixes, str(tmp_path / "m"))
    merged = IndexedDataset(str(tmp_path / "m"))
    merged.verify()
    assert len(merged) == 18
    for i, expected in enumerate(a + b + c):
        _assert_same(merged[i], expected)
    # Writing the same samples directly gives byte-identical files.
    _write(str(tmp_path / "direct"), a + c)
    for suffix in (".bin", ".idx"):
        assert open(tmp_path / f"m{suffix}", "rb").read() == open(tmp_path / f"direct{suffix}", "rb").read()


def test_empty_dataset(tmp_path):
    ds = IndexedDataset(_write(str(tmp_path / "e"), []))
    assert len(ds) == 0 and ds.lengths.shape == (0,)
    ds.verify()


def _corrupt(path, offset, value: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)


@pytest.mark.parametrize("damage,message", [
    ("truncate_bin", "a.bin: size"),
    ("truncate_idx", "a.idx: size"),
    ("bad_magic", "a.idx: not a qwenvl"),
    ("header_flip", "a.idx: header checksum"),
    ("bin_magic", "a.bin: not a qwenvl"),
    ("missing_bin", "a.bin"),
])
def test_corruption_detected_at_open(tmp_path, damage, message):
    prefix = _write(str(tmp_path / "a"), _samples(6, 20))
    if damage == "truncate_bin":
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 3)
    elif damage == "truncate_idx":
        os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 4)
    elif damage == "bad_magic":
        _corrupt(prefix + ".idx", 0, b"X")
    elif damage == "header_flip":
        _corrupt(prefix + ".idx", 16, b"\x15")  # num_samples
    elif damage == "bin_magic":
        _corrupt(prefix + ".bin", 0, b"Y")
    elif damage == "missing_bin":
        os.remove(prefix + ".bin")
    with pytest.raises((RuntimeError, FileNotFoundError), match=message):
        IndexedDataset(prefix)


def test_verify_detects_payload_corruption(tmp_path):
    prefix = _write(str(tmp_path / "a"), _samples(7, 20))
    ds = IndexedDataset(prefix)
    ds.verify()
    _corrupt(prefix + ".bin", os.path.getsize(prefix + ".bin") - 1, b"\xAA" if open(
        prefix + ".bin", "rb").read()[-1:] != b"\xAA" else b"\xBB")
    with pytest.raises(RuntimeError, match="a.bin: data checksum mismatch"):
        IndexedDataset(prefix).verify()


def test_writer_rejects_mismatched_images(tmp_path):
    w = IndexedDatasetWriter(str(tmp_path / "w"))
    with pytest.raises(ValueError, match="names 1 images but 0 image byte blobs"):
        w.add(Sample(np.arange(3), np.arange(3), ["x.png"]), [])
