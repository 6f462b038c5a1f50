"""Image bytes -> normalised pixel tensors, with one meaning on two decoders.

Qwen-VL's preprocessing (reference §1.3): convert to RGB, resize to SxS with PIL bicubic (antialiased),
scale to [0, 1], normalise with the CLIP mean/std. Pillow is the definition and always works; NVIDIA DALI
does the same on a GPU (nvJPEG decode, cubic+antialias resize, fused normalise) so decoding keeps up with
a fast model. Both round the resized image to 8 bits before normalising, so they agree to about one
8-bit level (DALI's cubic kernel differs from Pillow's only on sharp edges).

A corrupt image must not take down a training run silently or anonymously: every failure names the
image's index in the batch (`CorruptImageError`), and `on_error="skip"` drops bad images and counts them.
"""
from __future__ import annotations

import inspect
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BACKENDS = ("auto", "dali", "pil")
ERROR_POLICIES = ("raise", "skip")

try:  # optional: a broken DALI install (e.g. missing CUDA libraries) must not break the Pillow path
    from nvidia.dali import Pipeline as _DaliPipeline
    from nvidia.dali import fn as _dali_fn
    from nvidia.dali import pipeline_def as _dali_pipeline_def
    from nvidia.dali import types as _dali_types
    from nvidia.dali.plugin.pytorch import feed_ndarray as _dali_feed_ndarray

    DALI_AVAILABLE = True
except Exception:  # noqa: BLE001 - any import failure means "no DALI"
    DALI_AVAILABLE = False


class CorruptImageError(ValueError):
    """An image in a batch could not be decoded; `index` is its position in the batch (None: no batch).
    `reason` is one line; on the DALI path it holds DALI's failing operator and message, and `dali_error`
    DALI's whole error text."""

    def __init__(self, index: Optional[int], reason: str):
        self.index = index
        self.reason = reason
        self.dali_error: Optional[str] = None
        where = "image" if index is None else f"image #{index} of the batch"
        super().__init__(f"{where} cannot be decoded: {reason}")


@dataclass
class DecodedBatch:
    """Pixels of the good images (in batch order) and the batch indices that were skipped as corrupt."""

    pixels: torch.Tensor
    bad_indices: list[int] = field(default_factory=list)


def image_size_of(blob: bytes) -> tuple[int, int]:
    """(width, height) from the image header alone, without decoding pixels (cheap for grounding boxes)."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return img.size
    except Exception as e:  # noqa: BLE001 - PIL raises several types for bad bytes
        raise CorruptImageError(None, f"{type(e).__name__}: {e}") from e


# What both decoders read the same way: one frame of 8-bit RGB or grayscale in a format DALI decodes.
AGREED_FORMATS = ("JPEG", "PNG", "WEBP")
AGREED_MODES = ("RGB", "L")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bit_depth(blob: bytes) -> Optional[int]:
    """Bits per sample from a PNG's IHDR (Pillow reads 16-bit RGB as mode RGB, so the mode cannot tell)."""
    if blob[:8] == _PNG_SIGNATURE and blob[12:16] == b"IHDR" and len(blob) > 24:
        return blob[24]
    return None


def normalize_image(blob: bytes) -> tuple[bytes, Optional[str]]:
    """Make an image mean the same to Pillow and to DALI: `(bytes to store, what was changed or None)`.

    Kept byte for byte: one frame of 8-bit RGB or grayscale JPEG, PNG or WebP. Anything else is replaced
    by what the official transform sees, `Image.open(...).convert("RGB")` (the first frame), stored as an
    8-bit RGB PNG: animated GIF/PNG/WebP (DALI refuses GIF, and decodes frames differently), 16-bit PNG
    (Pillow clips 16-bit grayscale at 255 and keeps the high byte of 16-bit colour; DALI rescales),
    CMYK JPEG, palette, alpha and 1-bit images, other formats (BMP, TIFF, ...). Raises
    `CorruptImageError` for bytes Pillow cannot fully decode (truncated, zero-byte, not an image)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) == 0:
        raise CorruptImageError(None, "empty or not bytes")
    blob = bytes(blob)
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.verify()
        with Image.open(io.BytesIO(blob)) as img:
            changes = []
            if img.format not in AGREED_FORMATS:
                changes.append(f"{img.format} image")
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                changes.append(f"{frames} frames (the first kept)")
            if img.mode not in AGREED_MODES:
                changes.append(f"mode {img.mode}")
            depth = _png_bit_depth(blob)
            if depth not in (None, 8):
                changes.append(f"{depth}-bit PNG")
            img.load()  # the full decode of the first frame: truncated files fail here
            if not changes:
                return blob, None
            rgb = img.convert("RGB")
    except CorruptImageError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data
        raise CorruptImageError(None, f"{type(e).__name__}: {e}") from e
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue(), "re-encoded as 8-bit RGB PNG: " + ", ".join(changes)


def _check_header(blob: bytes, index: int) -> None:
    """Reject bytes that are not a recognised image before they reach DALI (which fails a whole batch)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) == 0:
        raise CorruptImageError(index, "empty or not bytes")
    try:
        with Image.open(io.BytesIO(blob)):
            pass
    except Exception as e:  # noqa: BLE001
        raise CorruptImageError(index, f"{type(e).__name__}: {e}") from e


def pil_decode_resize(blob: bytes, image_size: int, index: int = 0) -> np.ndarray:
    """One image -> uint8 [S, S, 3]: the reference definition (RGB, PIL bicubic antialiased resize)."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()  # force the full decode so truncated files fail here, not later
            rgb = img.convert("RGB")
        out = rgb.resize((image_size, image_size), resample=Image.BICUBIC)
        return np.asarray(out, dtype=np.uint8)
    except CorruptImageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CorruptImageError(index, f"{type(e).__name__}: {e}") from e


def _dali_reason(err: Exception) -> str:
    """The useful line of a DALI pipeline error (the operator that failed and what it said)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    op = next((ln for ln in lines if ln.startswith("Error in")), "")
    what = next((ln for ln in lines if ln.startswith(("Failed", "Could not", "Assert", "Unsupported"))),
                lines[-1] if lines else "")
    return f"DALI: {op} {what}".strip()


class ImageTransform:
    """Decode a batch of encoded images into `[n, 3, S, S]` CLIP-normalised float tensors.

    backend: "pil" (threaded Pillow, CPU), "dali" (NVIDIA DALI; GPU when `device` is CUDA, else its CPU
    pipeline) or "auto" (DALI on the GPU when DALI imports and CUDA is available, else Pillow).
    device: where the output lives; None = the current CUDA device for DALI-on-GPU, else the CPU.
    normalize=False returns uint8 `[n, 3, S, S]` in [0, 255] (the resized image before normalisation).
    on_error: "raise" -> `CorruptImageError`; "skip" -> `__call__` returns `(pixels, bad_indices)` and
    `num_skipped` counts skipped images over the transform's life.
    """

    def __init__(
        self,
        image_size: int,
        backend: str = "auto",
        num_threads: int = 2,
        device: Optional[torch.device | str] = None,
        normalize: bool = True,
        on_error: str = "raise",
        max_batch_size: int = 64,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"ImageTransform: backend must be one of {BACKENDS}, got {backend!r}")
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"ImageTransform: on_error must be one of {ERROR_POLICIES}, got {on_error!r}")
        if int(image_size) <= 0:
            raise ValueError(f"ImageTransform: image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.num_threads = max(1, int(num_threads))
        self.normalize = normalize
        self.on_error = on_error
        self.max_batch_size = max(1, int(max_batch_size))
        self.num_skipped = 0

        cuda = torch.cuda.is_available()
        if backend == "auto":
            backend = "dali" if (DALI_AVAILABLE and cuda and (device is None or torch.device(device).type == "cuda")) else "pil"
        if backend == "dali" and not DALI_AVAILABLE:
            raise RuntimeError("ImageTransform: backend='dali' but NVIDIA DALI does not import; "
                               "install nvidia-dali-cuda120 or use backend='pil'")
        self.backend = backend
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if (backend == "dali" and cuda) else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pipe = None
        self._lock = threading.Lock()

    # -- pickling (DataLoader workers): thread pools and DALI pipelines are rebuilt lazily in the worker
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"] = None
        state["_pipe"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"normalize={self.normalize}, on_error={self.on_error!r})")

    # -- public API
    def __call__(self, blobs: Sequence[bytes]):
        result = self.decode_batch(blobs)
        if self.on_error == "skip":
            return result.pixels, result.bad_indices
        return result.pixels

    def decode_batch(self, blobs: Sequence[bytes]) -> DecodedBatch:
        """Decode all `blobs`; corrupt ones raise or are skipped according to `on_error`."""
        blobs = list(blobs)
        if self.backend == "dali":
            chunks = [self._dali_chunk(blobs[i:i + self.max_batch_size], i)
                      for i in range(0, len(blobs), self.max_batch_size)]
            good = [c[0] for c in chunks]
            bad = [b for c in chunks for b in c[1]]
            uint8_nchw = torch.cat(good) if good else self._empty()
        else:
            uint8_nchw, bad = self._pil_batch(blobs)
        self.num_skipped += len(bad)
        return DecodedBatch(self._finish(uint8_nchw), bad)

    # -- shared helpers
    def _empty(self) -> torch.Tensor:
        return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8, device=self.device)

    def _finish(self, uint8_nchw: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> output dtype/device; normalisation as (x/255 - mean) / std in fp32."""
        x = uint8_nchw.to(self.device)
        if not self.normalize:
            return x
        mean, std = self._mean.to(x.device), self._std.to(x.device)
        return (x.float().div_(255.0) - mean).div_(std)

    def _fail(self, err: CorruptImageError, bad: list[int]) -> None:
        if self.on_error == "raise":
            raise err
        bad.append(err.index)

    # -- Pillow backend
    def _pil_batch(self, blobs: list[bytes]) -> tuple[torch.Tensor, list[int]]:
        if self._pool is None and self.num_threads > 1 and len(blobs) > 1:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="image-decode")

        def one(i: int):
            try:
                return pil_decode_resize(blobs[i], self.image_size, i)
            except CorruptImageError as e:
                return e

        results = list(self._pool.map(one, range(len(blobs)))) if self._pool else [one(i) for i in range(len(blobs))]
        bad: list[int] = []
        good = []
        for r in results:
            if isinstance(r, CorruptImageError):
                self._fail(r, bad)
            else:
                good.append(r)
        if not good:
            return self._empty().cpu(), bad
        hwc = torch.from_numpy(np.stack(good))
        return hwc.permute(0, 3, 1, 2).contiguous(), bad

    # -- DALI backend
    def _build_pipe(self):
        gpu = self.device.type == "cuda"
        size = self.image_size

        options = dict(batch_size=self.max_batch_size, num_threads=self.num_threads,
                       device_id=self.device.index if gpu else None, prefetch_queue_depth=1)
        if "exec_dynamic" in inspect.signature(_DaliPipeline.__init__).parameters:
            options["exec_dynamic"] = False  # DALI >= 1.4x: the classic executor takes feed_input batches

        @_dali_pipeline_def(**options)
        def pipeline():
            encoded = _dali_fn.external_source(name="encoded", dtype=_dali_types.UINT8)
            img = _dali_fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                          output_type=_dali_types.RGB, adjust_orientation=False)
            # dtype stays uint8: DALI rounds after resizing, as Pillow does
            img = _dali_fn.resize(img, resize_x=size, resize_y=size,
                                  interp_type=_dali_types.INTERP_CUBIC, antialias=True)
            return _dali_fn.transpose(img, perm=[2, 0, 1])

        pipe = pipeline()
        pipe.build()
        return pipe

    def _dali_run(self, blobs: list[bytes]) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build_pipe()
        self._pipe.feed_input("encoded", [np.frombuffer(bytes(b), dtype=np.uint8) for b in blobs])
        try:
            (out,) = self._pipe.run()
        except Exception:
            self._pipe = None  # a failed DALI pipeline is unusable; rebuild on next use
            raise
        tensor = out.as_tensor()
        dst = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        _dali_feed_ndarray(tensor, dst, cuda_stream=stream)
        return dst

    def _dali_chunk(self, blobs: list[bytes], offset: int) -> tuple[torch.Tensor, list[int]]:
        """Run one chunk; on a DALI failure, locate the corrupt images one by one."""
        bad: list[int] = []
        keep: list[int] = []
        for i, b in enumerate(blobs):
            try:
                _check_header(b, offset + i)
                keep.append(i)
            except CorruptImageError as e:
                self._fail(e, bad)
        if not keep:
            return self._empty(), bad
        with self._lock:
            try:
                return self._dali_run([blobs[i] for i in keep]), bad
            except Exception:  # noqa: BLE001 - DALI raises RuntimeError for the whole batch
                pass
            good = []
            for i in keep:
                try:
                    good.append(self._dali_run([blobs[i]]))
                except Exception as e:  # noqa: BLE001
                    err = CorruptImageError(offset + i, _dali_reason(e))
                    err.dali_error = str(e)  # DALI's whole text, for the log
                    self._fail(err, bad)
        bad.sort()
        return (torch.cat(good) if good else self._empty()), bad
