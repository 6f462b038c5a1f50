"""The multimodal indexed dataset: ``prefix.bin`` + ``prefix.idx`` holding (tokens, labels, image bytes).

Preprocessing writes it once (``IndexedDatasetWriter``, ``merge_datasets``); training reads it through the
C++ memory-mapped reader (``IndexedDataset``) so random access costs no Python parsing and no copies of
the index. Images stay in their original encoded form (PNG/JPEG/...): decoding belongs to ``images.py``.
The byte layout is documented in csrc/indexed_format.h and docs/indexed_dataset.md.
"""
from __future__ import annotations

import os
import struct
import zlib
from array import array
from typing import Sequence

import numpy as np

from qwenvl_megatron import _indexed

INDEX_MAGIC = b"QVLIDX\x00\x01"
BIN_MAGIC = b"QVLBIN\x00\x01"
FORMAT_VERSION = 1
# magic, version, header_crc, num_samples, num_images, num_tokens, bin_size, index_crc, data_crc, reserved
_HEADER = struct.Struct("<8sIIQQQQIIQ")
_BIN_HEADER_SIZE = 16
_COPY_CHUNK = 64 << 20


def _header_bytes(num_samples: int, num_images: int, num_tokens: int, bin_size: int,
                  index_crc: int, data_crc: int) -> bytes:
    fields = [INDEX_MAGIC, FORMAT_VERSION, 0, num_samples, num_images, num_tokens, bin_size, index_crc,
              data_crc, 0]
    fields[2] = zlib.crc32(_HEADER.pack(*fields))
    return _HEADER.pack(*fields)


def _write_index(path: str, sample_offsets: np.ndarray, image_start: np.ndarray, image_offsets: np.ndarray,
                 image_sizes: np.ndarray, lengths: np.ndarray, bin_size: int, data_crc: int) -> None:
    """Write ``path`` atomically (temp file + rename) so a crash never leaves a plausible half index."""
    arrays = [np.ascontiguousarray(sample_offsets, dtype="<u8"), np.ascontiguousarray(image_start, dtype="<u8"),
              np.ascontiguousarray(image_offsets, dtype="<u8"), np.ascontiguousarray(image_sizes, dtype="<u8"),
              np.ascontiguousarray(lengths, dtype="<i4")]
    index_crc = 0
    for a in arrays:
        index_crc = zlib.crc32(a.data, index_crc)
    header = _header_bytes(len(lengths), len(image_sizes), int(lengths.sum(dtype=np.int64)), bin_size,
                           index_crc, data_crc)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        for a in arrays:
            f.write(a.data)
    os.replace(tmp, path)


class IndexedDatasetWriter:
    """Streams samples into ``prefix.bin`` and writes ``prefix.idx`` at :meth:`finalize`.

    ``add(sample, image_bytes)`` takes a :class:`~qwenvl_megatron.data.formats.Sample` (or anything with
    ``tokens``/``labels``/``images``) and the encoded bytes of each of its images, in order.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin_path = prefix + ".bin"
        self._bin = open(self._bin_path + ".tmp", "wb")
        self._bin.write(BIN_MAGIC + bytes(8))
        self._pos = _BIN_HEADER_SIZE
        self._crc = 0
        self._sample_offsets = array("Q", [self._pos])
        self._image_start = array("Q", [0])
        self._image_offsets = array("Q")
        self._image_sizes = array("Q")
        self._lengths = array("i")
        self._finalized = False

    def __len__(self) -> int:
        return len(self._lengths)

    def _write(self, data) -> None:
        self._bin.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._pos += len(memoryview(data).cast("B"))

    def add(self, sample, image_bytes: Sequence[bytes] = ()) -> None:
        if self._finalized:
            raise RuntimeError(f"{self.prefix}: add() after finalize()")
        tokens = np.ascontiguousarray(sample.tokens, dtype="<i4")
        labels = np.ascontiguousarray(sample.labels, dtype="<i4")
        if tokens.ndim != 1 or tokens.shape != labels.shape:
            raise ValueError(f"{self.prefix}: sample {len(self)}: tokens {tokens.shape} and labels "
                             f"{labels.shape} must be equal 1-D arrays")
        refs = list(getattr(sample, "images", []) or [])
        if len(refs) != len(image_bytes):
            raise ValueError(f"{self.prefix}: sample {len(self)} names {len(refs)} images but "
                             f"{len(image_bytes)} image byte blobs were given")
        self._write(tokens.data)
        self._write(labels.data)
        for blob in image_bytes:
            self._image_offsets.append(self._pos)
            self._image_sizes.append(len(blob))
            self._write(blob)
        self._lengths.append(len(tokens))
        self._image_start.append(len(self._image_sizes))
        self._sample_offsets.append(self._pos)

    def finalize(self) -> None:
        """Close the data file and write the index; only then do the files appear under their names."""
        if self._finalized:
            return
        self._bin.close()
        os.replace(self._bin_path + ".tmp", self._bin_path)
        _write_index(self.prefix + ".idx", np.frombuffer(self._sample_offsets, np.uint64),
                     np.frombuffer(self._image_start, np.uint64), np.frombuffer(self._image_offsets, np.uint64),
                     np.frombuffer(self._image_sizes, np.uint64), np.frombuffer(self._lengths, np.int32),
                     self._pos, self._crc)
        self._finalized = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._bin.close()


def _read_index_arrays(prefix: str):
    """Header fields and index arrays of ``prefix.idx`` (validated by opening the C++ reader first)."""
    _indexed.IndexedReader(prefix)  # raises with the file named if anything is off
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    (_, _, _, n, m, _, bin_size, _, data_crc, _) = _HEADER.unpack_from(raw)
    off = _HEADER.size
    out = []
    for count, dtype in ((n + 1, "<u8"), (n + 1, "<u8"), (m, "<u8"), (m, "<u8"), (n, "<i4")):
        a = np.frombuffer(raw, dtype=dtype, count=count, offset=off)
        off += a.nbytes
        out.append(a)
    return out, bin_size, data_crc


def merge_datasets(prefixes: Sequence[str], out_prefix: str) -> None:
    """Concatenate datasets in the given order into ``out_prefix`` (data copied, offsets shifted)."""
    if not prefixes:
        raise ValueError(f"merge_datasets({out_prefix!r}): no input datasets")
    parts = []
    for p in prefixes:
        if os.path.abspath(p) == os.path.abspath(out_prefix):
            raise ValueError(f"merge_datasets: output prefix {out_prefix} is also an input")
        parts.append(_read_index_arrays(p))
    offsets, starts, img_offsets, img_sizes, lengths = [], [], [], [], []
    pos, n_images, crc = _BIN_HEADER_SIZE, 0, 0
    tmp_bin = out_prefix + ".bin.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(tmp_bin, "wb") as out:
        out.write(BIN_MAGIC + bytes(8))
        for prefix, ((s_off, s_img, i_off, i_size, lens), bin_size, _) in zip(prefixes, parts):
            shift = pos - _BIN_HEADER_SIZE
            offsets.append(s_off[:-1] + np.uint64(shift))
            starts.append(s_img[:-1] + np.uint64(n_images))
            img_offsets.append(i_off + np.uint64(shift))
            img_sizes.append(i_size)
            lengths.append(lens)
            with open(prefix + ".bin", "rb") as src:
                src.seek(_BIN_HEADER_SIZE)
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
                    crc = zlib.crc32(chunk, crc)
            pos += bin_size - _BIN_HEADER_SIZE
            n_images += len(i_size)
    offsets.append(np.array([pos], np.uint64))
    starts.append(np.array([n_images], np.uint64))
    os.replace(tmp_bin, out_prefix + ".bin")
    _write_index(out_prefix + ".idx", np.concatenate(offsets), np.concatenate(starts), np.concatenate(img_offsets),
                 np.concatenate(img_sizes), np.concatenate(lengths), pos, crc)


class IndexedDataset:
    """Random access to a preprocessed dataset: ``ds[i] -> (tokens int32, labels int32, list[bytes])``.

    Opening validates magic, version, header checksum and exact file sizes (a truncated or corrupt file
    raises ``RuntimeError`` naming it); :meth:`verify` also checks every offset and the data checksums.
    """

    def __init__(self, prefix: str):
        for suffix in (".idx", ".bin"):
            if not os.path.isfile(prefix + suffix):
                raise FileNotFoundError(f"indexed dataset file not found: {prefix + suffix}")
        self.prefix = prefix
        self._reader = _indexed.IndexedReader(prefix)

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        return self._reader.get(int(index))

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        return self._reader.get(int(index))

    def gather(self, indices) -> list[tuple[np.ndarray, np.ndarray, list[bytes]]]:
        """Many samples at once; the copying runs in C++ with the GIL released."""
        return self._reader.gather(np.asarray(indices, dtype=np.int64).tolist())

    @property
    def lengths(self) -> np.ndarray:
        """Token count per sample: a read-only view into the memory-mapped index (no copy)."""
        return self._reader.lengths

    @property
    def image_counts(self) -> np.ndarray:
        return self._reader.image_counts

    @property
    def num_images(self) -> int:
        return self._reader.num_images

    @property
    def num_tokens(self) -> int:
        return self._reader.num_tokens

    def verify(self) -> None:
        self._reader.verify()

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, samples={len(self)}, images={self.num_images})"


def remove_dataset(prefix: str) -> None:
    """Delete ``prefix.bin``/``prefix.idx`` (used to clean up per-worker shards after a merge)."""
    for suffix in (".bin", ".idx"):
        try:
            os.remove(prefix + suffix)
        except FileNotFoundError:
            pass


__all__ = ["IndexedDataset", "IndexedDatasetWriter", "merge_datasets", "remove_dataset", "INDEX_MAGIC",
           "BIN_MAGIC", "FORMAT_VERSION"]
