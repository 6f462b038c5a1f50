#!/usr/bin/env python
"""Images per second of each available decode backend (Pillow threads, DALI CPU, DALI GPU), interleaved.

    python tools/bench_image_decode.py --json OUT.json [--num-images 256 --batch-size 32 --image-size 448
                                       --source-size 640x480 --repeats 5]

The images are photo-like JPEGs (smooth gradients + noise), made in memory, so the numbers measure
decode + resize + normalise only. Each repeat decodes every image once with every backend, the order
rotated per repeat; the figures are the median img/s with min and max. A backend that cannot run here is
reported as skipped, with why. OUT.json gets every figure and the machine; OUT.png plots img/s per repeat.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the figures here (the PNG chart goes beside it)")
    p.add_argument("--num-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=448, help="output side S (448: stages 2-3, 224: stage 1)")
    p.add_argument("--source-size", default="640x480", help="WxH of the encoded JPEGs")
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="8 small images, seconds (the tests' mode)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_images, args.batch_size, args.image_size, args.source_size, args.repeats = 8, 4, 64, "96x64", 2
    try:
        w, h = (int(v) for v in args.source_size.lower().split("x"))
    except ValueError:
        p.error(f"--source-size must be WxH, got {args.source_size!r}")
    import torch

    from qwenvl_megatron.data.images import DALI_AVAILABLE, ImageTransform
    from qwenvl_megatron.runtime import bench

    blobs = make_jpegs(args.num_images, w, h)
    print(f"{args.num_images} JPEGs {w}x{h} -> {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.num_threads} threads", flush=True)
    cases, skipped = {}, {}
    for backend, device in (("pil", "cpu"), ("dali", "cpu"), ("dali", "cuda")):
        name = f"{backend}-{device}"
        if backend == "dali" and not DALI_AVAILABLE:
            skipped[name] = "NVIDIA DALI does not import"
        elif device == "cuda" and not torch.cuda.is_available():
            skipped[name] = "no CUDA device"
        else:
            t = ImageTransform(args.image_size, backend=backend, num_threads=args.num_threads, device=device,
                               max_batch_size=args.batch_size)
            batches = [blobs[i:i + args.batch_size] for i in range(0, len(blobs), args.batch_size)]
            # one timed call decodes every image; the device is synchronised around it
            cases[name] = lambda t=t, batches=batches: [t(b) for b in batches]
    for name, why in skipped.items():
        print(f"{name:10s} skipped: {why}")
    device = torch.device("cuda" if "dali-cuda" in cases else "cpu")
    times = bench.interleaved(cases, device, args.repeats)
    rates = {name: [args.num_images / s for s in ts] for name, ts in times.items()}
    result = {"environment": bench.environment(device), "command": "tools/bench_image_decode.py " + " ".join(
              argv if argv is not None else sys.argv[1:]), "num_images": args.num_images, "batch_size": args.batch_size,
              "image_size": args.image_size, "source_size": [w, h], "num_threads": args.num_threads,
              "images_per_s": {name: bench.summary(r) for name, r in rates.items()}, "skipped": skipped}
    for name, r in result["images_per_s"].items():
        print(f"{name:10s} {r['median']:8.1f} img/s (min {r['min']:.1f}, max {r['max']:.1f}, {r['n']} repeats)")
    result["charts"] = [bench.chart(bench.png_path(args.json), {name: list(enumerate(r, 1)) for name, r in rates.items()},
                                    title="image decode + resize + normalise", xlabel="repeat", ylabel="img/s")]
    bench.write_json(args.json, result)
    print(f"wrote {args.json} and {result['charts'][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
