#!/usr/bin/env python
"""Draw loss, learning rate, grad norm and throughput per training stage to one PNG.

    python tools/plot_training.py RUN_DIR [--out training.png]

RUN_DIR holds one subdirectory per stage with the TensorBoard event files of `--tensorboard-dir` (the demo:
demo_output/tensorboard/{warmup,stage1,stage2,stage3}); rows are stages in the order they ran, columns the
four curves. matplotlib draws it when installed, otherwise the package's own small renderer (numpy + zlib).
"""
from __future__ import annotations

import argparse
import sys

TOOL = "plot_training"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=TOOL, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory with one TensorBoard log directory per stage")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/training.png)")
    p.add_argument("--backend", choices=("auto", "matplotlib", "numpy"), default="auto",
                   help="auto: matplotlib when it imports, else the built-in renderer")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from qwenvl_megatron.training.plot import plot_training

    try:
        path, stages, backend = plot_training(args.run_dir, args.out, args.backend)
    except (ValueError, OSError, ImportError) as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}: {len(stages)} stages ({', '.join(stages)}), {backend}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
