#!/usr/bin/env python
"""Kernel benchmarks on Qwen-VL's shapes: attention (TE fused / SDPA / eager), RMSNorm, LayerNorm, SwiGLU,
RoPE, cross-entropy over the 151936-id vocabulary (fused and unfused), a GEMM roofline.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python tools/bench_kernels.py --json OUT.json
    python tools/bench_kernels.py --paper-shapes --json OUT.json      # on a GPU: the paper's shapes, bf16

Writes OUT.json (every figure, the device and versions) and OUT.png (roofline), OUT_attention.png. The CPU
default (fewer heads, small token counts, fp32) runs in a few minutes on 2 cores; --smoke in seconds
(tests only). Figures are medians with min/max over --repeats, implementations interleaved.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the figures here (the PNG charts go beside it)")
    p.add_argument("--paper-shapes", action="store_true", help="the paper's head counts and tokens (GPU-sized)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 3 on CPU, 5 on GPU; smoke 2)")
    p.add_argument("--parts", default="attention,ops,gemm", help="comma list of attention, ops, gemm")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 with --paper-shapes on a GPU, else fp32")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (the tests' mode)")
    a = p.parse_args(argv)
    import torch  # after parsing: --help stays fast

    from qwenvl_megatron.models import kernel_bench
    from qwenvl_megatron.runtime import bench, initialize
    device = initialize(1, 1)  # megatron's vocab-parallel cross-entropy needs its (one-rank) TP group
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[a.dtype]
    result = kernel_bench.run(device, paper=a.paper_shapes, repeats=a.repeats, smoke=a.smoke, dtype=dtype,
                              parts=tuple(a.parts.split(",")))
    result["command"] = " ".join(["tools/bench_kernels.py"] + (argv if argv is not None else sys.argv[1:]))
    result["charts"] = kernel_bench.charts(result, a.json)
    bench.write_json(a.json, result)
    env = result["environment"]
    print(f"{env['device']} | torch {env['torch']} | megatron-core {env['megatron_core']} | TE "
          f"{env['transformer_engine']} | {result['dtype']} | {env['threads']} threads")
    for r in result.get("attention", []):
        if "skipped" in r:
            print(f"attention {r['case']:12s} {r['impl']:9s} skipped: {r['skipped']}")
        else:
            print(f"attention {r['case']:12s} {r['impl']:9s} fwd {r['fwd_s']['median'] * 1e3:9.2f} ms "
                  f"{r['fwd_tflops']:8.3f} TFLOP/s | bwd {r['bwd_s']['median'] * 1e3:9.2f} ms "
                  f"{r['bwd_tflops']:8.3f} TFLOP/s")
    for r in result.get("ops", []):
        if "skipped" in r:
            print(f"op {r['op']:14s} {r['impl']:24s} skipped: {r['skipped']}")
        else:
            print(f"op {r['op']:14s} {r['impl']:24s} fwd {r['fwd_s']['median'] * 1e3:8.2f} ms {r['fwd_gbps']:7.1f} "
                  f"GB/s | bwd {r['bwd_s']['median'] * 1e3:8.2f} ms {r['bwd_gbps']:7.1f} GB/s")
    if "gemm" in result:
        g = result["gemm"]
        print(f"gemm peak {g['peak_tflops']:.3f} TFLOP/s, copy bandwidth {g['bandwidth_gbps']:.1f} GB/s")
        for r in g["gemms"]:
            print(f"gemm {r['name']:11s} M{r['M']:<5d} N{r['N']:<6d} K{r['K']:<5d} {r['s']['median'] * 1e3:9.2f} ms "
                  f"{r['tflops']:8.3f} TFLOP/s ({100 * r['fraction_of_peak']:.0f}% of peak, AI {r['intensity']:.0f})")
    print(f"wrote {a.json} and {', '.join(result['charts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
