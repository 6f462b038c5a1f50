#!/usr/bin/env python
"""Build a Qwen-VL on the meta device (no memory, no weights) and print its parameter counts per part,
grouped as the HF layout groups them.

    python tools/count_parameters.py --model qwen-vl-7b
    python tools/count_parameters.py --model-config path/to/config.json
"""
import argparse
import json

from qwenvl_megatron.models.config import PRESETS, QwenVLConfig, get_preset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen-vl-7b", choices=sorted(PRESETS))
    ap.add_argument("--model-config", help="HF config.json (overrides --model)")
    args = ap.parse_args()
    if args.model_config:
        with open(args.model_config) as f:
            cfg = QwenVLConfig.from_hf_config(json.load(f))
    else:
        cfg = get_preset(args.model)
    import torch

    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.models.qwen_vl import QwenVLModel, parameter_counts
    from qwenvl_megatron.runtime import initialize

    initialize(1, 1)
    with torch.device("meta"):
        model = QwenVLModel(cfg, ParallelPlan())
    counts = parameter_counts(model)
    for part in ("vit", "adapter", "llm"):
        print(f"{part:8s} {counts[part]:>15,d}  ({counts[part] / 1e9:.3f}B)")
    total = sum(counts.values())
    print(f"{'total':8s} {total:>15,d}  ({total / 1e9:.3f}B)")


if __name__ == "__main__":
    main()
