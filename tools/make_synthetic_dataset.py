#!/usr/bin/env python
"""Write the synthetic demo corpus (coloured shapes, 7 stage-2 tasks, ChatML, held-out captions).

    python tools/make_synthetic_dataset.py --out data/synthetic --seed 0 --num-train 29000 --num-heldout 1000

The same seed gives byte-identical files. See qwenvl_megatron/data/synthetic.py for what is drawn.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created; existing files are overwritten)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=29000, help="training images (stage 1/2/3 records use them)")
    p.add_argument("--num-heldout", type=int, default=1000, help="evaluation images, used by no training file")
    p.add_argument("--image-size", type=int, default=96, help="side of the square PNG images, pixels")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    from qwenvl_megatron.data.synthetic import generate_corpus, print_progress  # numpy, Pillow: after parsing

    try:
        summary = generate_corpus(args.out, seed=args.seed, num_train=args.num_train, num_heldout=args.num_heldout,
                                  image_size=args.image_size, workers=args.workers,
                                  progress=None if args.quiet else print_progress)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(vars(summary)))
    print(f"wrote {os.path.abspath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
