"""Image decoding: the Pillow path against an independent computation, DALI against Pillow, bad bytes."""
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from qwenvl_megatron.data import images
from qwenvl_megatron.data.images import CLIP_MEAN, CLIP_STD, CorruptImageError, ImageTransform, image_size_of


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo_like(seed: int, w: int, h: int) -> Image.Image:
    """Smooth colour gradients + soft blobs + mild noise: the statistics of a photo, not of a drawing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        g = 128 + 60 * np.sin(a * x / w * 4 + b * y / h * 4 + p * 6)
        for _ in range(3):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * w
            g += rng.uniform(-50, 50) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        chans.append(g + rng.normal(0, 4, (h, w)))
    return Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).round().astype(np.uint8))


def drawing(seed: int, w: int, h: int) -> Image.Image:
    """A synthetic-corpus-like image: one flat shape on a light background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 240, 3)))
    d = ImageDraw.Draw(img)
    cx, cy, r = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7), min(w, h) * 0.3
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 30, 40))
    return img


def reference_pixels(blobs, size):
    """Independent of images.py: PIL resize, then numpy scaling and CLIP normalisation."""
    out = []
    for b in blobs:
        img = Image.open(io.BytesIO(b)).convert("RGB").resize((size, size), Image.BICUBIC)
        a = np.asarray(img, dtype=np.float64) / 255.0
        out.append(((a - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1))
    return np.stack(out)


@pytest.fixture(scope="module")
def mixed_blobs():
    rgb = photo_like(1, 120, 90)
    return [
        encode(rgb, "PNG"),
        encode(photo_like(2, 64, 80), "JPEG", quality=90),
        encode(rgb.convert("L"), "PNG"),  # grayscale -> RGB
        encode(drawing(3, 50, 40).convert("RGBA"), "PNG"),  # alpha dropped
        encode(drawing(4, 70, 70).convert("P"), "PNG"),  # palette
    ]


def test_pil_matches_independent_computation(mixed_blobs):
    t = ImageTransform(56, backend="pil", num_threads=2)
    got = t(mixed_blobs)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 56, 56)
    np.testing.assert_allclose(got.numpy(), reference_pixels(mixed_blobs, 56), rtol=0, atol=1e-5)


def test_unnormalized_is_resized_uint8(mixed_blobs):
    got = ImageTransform(40, backend="pil", normalize=False)(mixed_blobs)
    assert got.dtype == torch.uint8
    want = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((40, 40), Image.BICUBIC))
                     for b in mixed_blobs]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got.numpy(), want)
    # the normalised output is exactly the uint8 output scaled and normalised
    norm = ImageTransform(40, backend="pil")(mixed_blobs)
    expect = (got.float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, expect, rtol=0, atol=1e-6)


def test_single_thread_equals_threaded(mixed_blobs):
    a = ImageTransform(32, backend="pil", num_threads=1)(mixed_blobs)
    b = ImageTransform(32, backend="pil", num_threads=2)(mixed_blobs)
    assert torch.equal(a, b)


def test_image_size_of(mixed_blobs):
    assert [image_size_of(b) for b in mixed_blobs] == [(120, 90), (64, 80), (120, 90), (50, 40), (70, 70)]
    with pytest.raises(CorruptImageError, match="cannot be decoded"):
        image_size_of(b"not an image")


def corrupt_batch(mixed_blobs):
    jpeg = mixed_blobs[1]
    return [mixed_blobs[0], b"definitely not an image", mixed_blobs[2], jpeg[: len(jpeg) // 2], b"", mixed_blobs[4]]


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_corrupt_images_raise_with_index(backend, mixed_blobs):
    if backend == "dali" and not images.DALI_AVAILABLE:
        pytest.skip("NVIDIA DALI not importable")
    t = ImageTransform(32, backend=backend)
    with pytest.raises(CorruptImageError, match=r"image #1 of the batch") as e:
        t(corrupt_batch(mixed_blobs))
    assert e.value.index == 1
    with pytest.raises(CorruptImageError) as e:  # header fine, data truncated
        t([mixed_blobs[0], mixed_blobs[1][:300]])
    assert e.value.index == 1
    # the transform still works after an error (DALI rebuilds its pipeline)
    assert t([mixed_blobs[0]]).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_corrupt_images_skip(backend, mixed_blobs):
    if backend == "dali" and not images.DALI_AVAILABLE:
        pytest.skip("NVIDIA DALI not importable")
    t = ImageTransform(32, backend=backend, normalize=False, on_error="skip")
    pixels, bad = t(corrupt_batch(mixed_blobs))
    assert bad == [1, 3, 4]
    assert t.num_skipped == 3
    good, none_bad = t([mixed_blobs[0], mixed_blobs[2], mixed_blobs[4]])
    assert none_bad == [] and t.num_skipped == 3
    assert torch.equal(pixels, good)
    empty, all_bad = t([b"x", b"y"])
    assert empty.shape == (0, 3, 32, 32) and all_bad == [0, 1] and t.num_skipped == 5


def test_bad_arguments_and_auto():
    with pytest.raises(ValueError, match="backend"):
        ImageTransform(32, backend="opencv")
    with pytest.raises(ValueError, match="on_error"):
        ImageTransform(32, on_error="ignore")
    if not torch.cuda.is_available():
        assert ImageTransform(32).backend == "pil"


def test_pickles_for_dataloader_workers(mixed_blobs):
    t = ImageTransform(24, backend="pil")
    before = t(mixed_blobs)  # creates the thread pool, which must not travel
    clone = pickle.loads(pickle.dumps(t))
    assert torch.equal(clone(mixed_blobs), before)


@pytest.mark.skipif(not images.DALI_AVAILABLE, reason="NVIDIA DALI not importable")
def test_dali_matches_pillow_before_normalisation():
    blobs = [encode(photo_like(10 + i, 320, 240), "JPEG", quality=92) for i in range(3)]
    blobs += [encode(photo_like(20, 200, 300), "PNG"), encode(drawing(21, 150, 120), "PNG"),
              encode(drawing(22, 90, 90), "JPEG", quality=95), encode(photo_like(23, 60, 50), "PNG")]  # upscale
    size = 112
    dali = ImageTransform(size, backend="dali", normalize=False, max_batch_size=4)(blobs)  # 2 chunks
    pil = ImageTransform(size, backend="pil", normalize=False)(blobs)
    assert dali.dtype == torch.uint8 and dali.shape == pil.shape == (len(blobs), 3, size, size)
    err = (dali.int() - pil.int()).abs()
    assert err.float().mean().item() < 0.3
    assert (err <= 1).float().mean().item() >= 0.99
    # the normalised DALI output means the same thing as the Pillow one
    dn = ImageTransform(size, backend="dali")(blobs)
    pn = ImageTransform(size, backend="pil")(blobs)
    assert (dn - pn).abs().mean().item() < 0.3 / 255 / min(CLIP_STD)
