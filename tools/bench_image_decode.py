#!/usr/bin/env python
"""Images per second of each available decode backend (Pillow threads, DALI CPU, DALI GPU).

    python tools/bench_image_decode.py --num-images 256 --batch-size 32 --image-size 448 --source-size 640x480

The images are photo-like JPEGs (smooth gradients + noise), made in memory, so the numbers measure
decode + resize + normalise only. A backend that cannot run here is reported as skipped, with why.
"""
from __future__ import annotations

import argparse
import io
import sys
import time

# numpy, torch, Pillow and the package are imported where they are used: `--help` stays fast.


def make_jpegs(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        a, b, p = rng.uniform(-1, 1, (3, 3))
        img = 128 + 70 * np.sin(a[:, None, None] * x / width * 6 + b[:, None, None] * y / height * 6 + p[:, None, None] * 6)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench(transform, blobs: list[bytes], batch_size: int, repeats: int) -> float:
    import torch

    transform(blobs[:batch_size])  # warm-up: thread pool / pipeline build
    if transform.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(blobs), batch_size):
            transform(blobs[i:i + batch_size])
    if transform.device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * len(blobs) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=448, help="output side S (448: stages 2-3, 224: stage 1)")
    p.add_argument("--source-size", default="640x480", help="WxH of the encoded JPEGs")
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.source_size.lower().split("x"))
    except ValueError:
        p.error(f"--source-size must be WxH, got {args.source_size!r}")
    import torch

    from qwenvl_megatron.data.images import DALI_AVAILABLE, ImageTransform

    blobs = make_jpegs(args.num_images, w, h)
    print(f"{args.num_images} JPEGs {w}x{h} -> {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.num_threads} threads", flush=True)
    runs = [("pil", "cpu"), ("dali", "cpu"), ("dali", "cuda")]
    for backend, device in runs:
        name = f"{backend}-{device}"
        if backend == "dali" and not DALI_AVAILABLE:
            print(f"{name:10s} skipped: NVIDIA DALI does not import")
            continue
        if device == "cuda" and not torch.cuda.is_available():
            print(f"{name:10s} skipped: no CUDA device")
            continue
        t = ImageTransform(args.image_size, backend=backend, num_threads=args.num_threads, device=device,
                           max_batch_size=args.batch_size)
        print(f"{name:10s} {bench(t, blobs, args.batch_size, args.repeats):8.1f} img/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
