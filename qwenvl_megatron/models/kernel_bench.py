"""Kernel benchmarks on the model's own shapes (tools/bench_kernels.py is the CLI).

- attention: LLM (causal, 32 heads x 128), ViT (bidirectional, 16 x 104), the adapter's cross-attention
  (256 queries over the patches), each through Transformer Engine's fused attention (with TE and CUDA),
  torch SDPA and eager math; forward and backward time, achieved TFLOP/s (matmul FLOPs: forward
  4 b h sq sk d, half of it causal; backward 2x forward).
- memory-bound ops: RMSNorm, LayerNorm, SwiGLU, RoPE, vocab-parallel cross-entropy over 151936 ids, fused
  and unfused where both exist; achieved GB/s (bytes each pass must read and write at least once).
- GEMMs of the model's linear layers (y = x W^T) against the device's measured matmul peak and copy
  bandwidth: the roofline.

Implementations are timed interleaved within one repeat (runtime.bench.interleaved); figures are medians
with min and max. The CPU default keeps the paper's head sizes and sequence lengths with fewer heads (per-
head work is the same); `paper=True` takes the paper's head counts, token counts and bf16.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..runtime import bench
from .config import qwen_vl_7b
from .parallel import padded_vocab_size


def _have_te(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------------- shapes
def attention_cases(paper: bool, smoke: bool = False) -> list[dict]:
    """(name, heads, head dim, queries, keys, causal) of the three attentions at their sequence lengths."""
    if smoke:
        return [dict(name="llm_s64", heads=2, dim=32, sq=64, sk=64, causal=True),
                dict(name="adapter_k64", heads=2, dim=32, sq=16, sk=64, causal=False)]
    llm_h, vit_h, ad_h = (32, 16, 32) if paper else (4, 4, 4)
    out = [dict(name=f"llm_s{s}", heads=llm_h, dim=128, sq=s, sk=s, causal=True) for s in (512, 2048)]
    out += [dict(name=f"vit_s{s}", heads=vit_h, dim=104, sq=s, sk=s, causal=False) for s in (256, 1024)]
    out += [dict(name=f"adapter_k{k}", heads=ad_h, dim=128, sq=256, sk=k, causal=False) for k in (256, 1024)]
    return out


def attention_flops(c: dict) -> tuple[float, float]:
    fwd = 4.0 * c["heads"] * c["sq"] * c["sk"] * c["dim"] * (0.5 if c["causal"] else 1.0)
    return fwd, 2 * fwd


def _eager_attention(q, k, v, causal):  # [b, h, s, d]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def attention_impls(device) -> dict[str, Callable]:
    impls = {"sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
             "eager": _eager_attention}
    if _have_te(device):
        import transformer_engine.pytorch as te
        cache = {}

        def te_attention(q, k, v, causal):
            key = (q.shape[1], q.shape[-1], causal)
            if key not in cache:
                cache[key] = te.DotProductAttention(q.shape[1], q.shape[-1], qkv_format="bshd",
                                                    attn_mask_type="causal" if causal else "no_mask")
            # TE takes [b, s, h, d]
            return cache[key](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        impls = {"te_fused": te_attention, **impls}
    return impls


class _FwdBwd:
    """One training pass of an op on inputs made once: forward then backward, each timed (synchronised)."""

    def __init__(self, make_inputs, run, device):
        self.inputs, self.run, self.device = make_inputs(), run, device
        self.fwd: list[float] = []
        self.bwd: list[float] = []

    def __call__(self):
        import time
        for t in self.inputs:
            t.grad = None
        bench.sync(self.device)
        t0 = time.perf_counter()
        out = self.run(*self.inputs)
        bench.sync(self.device)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        bench.sync(self.device)
        self.fwd.append(t1 - t0)
        self.bwd.append(time.perf_counter() - t1)

    def timings(self, repeats: int) -> tuple[list[float], list[float]]:
        return self.fwd[-repeats:], self.bwd[-repeats:]


def bench_attention(device, dtype, paper: bool, repeats: int, smoke: bool = False) -> list[dict]:
    impls, rows = attention_impls(device), []
    for c in attention_cases(paper, smoke):
        fwd_flops, bwd_flops = attention_flops(c)
        cases, skipped = {}, {}
        for name, fn in impls.items():
            def make(c=c):
                g = torch.Generator(device=device).manual_seed(0)
                shape_q, shape_k = (1, c["heads"], c["sq"], c["dim"]), (1, c["heads"], c["sk"], c["dim"])
                return [torch.randn(s, device=device, dtype=dtype, generator=g).requires_grad_()
                        for s in (shape_q, shape_k, shape_k)]
            try:
                case = _FwdBwd(make, lambda q, k, v, fn=fn, c=c: fn(q, k, v, c["causal"]), device)
                case()
            except Exception as e:  # noqa: BLE001 - e.g. a TE backend without this head size
                skipped[name] = f"{type(e).__name__}: {str(e)[:120]}"
                continue
            cases[name] = case
        times = bench.interleaved(cases, device, repeats)
        for name in impls:
            if name in skipped:
                rows.append({"case": c["name"], "impl": name, "skipped": skipped[name], **c})
                continue
            fwd, bwd = cases[name].timings(repeats)
            f, b, fb = bench.summary(fwd), bench.summary(bwd), bench.summary(times[name])
            rows.append({"case": c["name"], "impl": name, **{k: v for k, v in c.items() if k != "name"},
                         "fwd_s": f, "bwd_s": b, "fwd_bwd_s": fb, "fwd_flops": fwd_flops, "bwd_flops": bwd_flops,
                         "fwd_tflops": fwd_flops / f["median"] / 1e12,
                         "bwd_tflops": bwd_flops / max(b["median"], 1e-12) / 1e12,
                         "fwd_bwd_tflops": (fwd_flops + bwd_flops) / fb["median"] / 1e12})
    return rows


# ------------------------------------------------------------------------------------- memory-bound ops
def _rms_eager(x, w, eps=1e-6):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) * w


def _ln_eager(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt(var + eps) * w + b


def _swiglu_eager(x):
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def _rope_eager(t, freqs):  # megatron's unfused rotate-half, [s, b, h, d]
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    return _apply_rotary_pos_emb_bshd(t, freqs)


def _ce_eager(logits, target):
    return (torch.logsumexp(logits.float(), -1) - logits.float().gather(-1, target.unsqueeze(-1)).squeeze(-1)).sum()


def op_cases(device, dtype, paper: bool, smoke: bool = False) -> list[dict]:
    """Each op: shapes, implementations {name: (make_inputs, run)}, bytes of one forward and backward."""
    cfg = qwen_vl_7b()
    h, f, vit_w = cfg.llm.hidden_size, cfg.llm.ffn_hidden_size, cfg.vit.width
    tokens = 64 if smoke else (8192 if paper else 2048)
    ce_tokens = 16 if smoke else (4096 if paper else 256)
    vocab = 1024 if smoke else padded_vocab_size(cfg.llm.vocab_size, 1)
    heads = 32
    if smoke:
        h, f, vit_w, heads = 256, 512, 128, 4
    es = dtype.itemsize
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, grad=True, dt=dtype):
        t = torch.randn(*shape, device=device, dtype=dt, generator=g)
        return t.requires_grad_() if grad else t

    ops = []
    n = tokens * h
    rms = {"eager": (lambda: [rnd(tokens, h), rnd(h)], _rms_eager)}
    if hasattr(F, "rms_norm"):
        rms["torch_rms_norm"] = (lambda: [rnd(tokens, h), rnd(h)], lambda x, w: F.rms_norm(x, (h,), w, 1e-6))
    if _have_te(device):
        import transformer_engine.pytorch as te
        te_rms = te.RMSNorm(h, eps=1e-6, params_dtype=dtype, device=device)
        rms["te_fused"] = (lambda: [rnd(tokens, h)], te_rms)
    ops.append(dict(op="rmsnorm", shape=[tokens, h], impls=rms, fwd_bytes=2 * n * es, bwd_bytes=3 * n * es))

    nv = tokens * vit_w
    ln = {"eager": (lambda: [rnd(tokens, vit_w), rnd(vit_w), rnd(vit_w)], _ln_eager),
          "torch_layer_norm": (lambda: [rnd(tokens, vit_w), rnd(vit_w), rnd(vit_w)],
                               lambda x, w, b: F.layer_norm(x, (vit_w,), w, b, 1e-6))}
    if _have_te(device):
        te_ln = te.LayerNorm(vit_w, eps=1e-6, params_dtype=dtype, device=device)
        ln["te_fused"] = (lambda: [rnd(tokens, vit_w)], te_ln)
    ops.append(dict(op="layernorm", shape=[tokens, vit_w], impls=ln, fwd_bytes=2 * nv * es, bwd_bytes=3 * nv * es))

    sw_tokens = tokens // 4
    ns = sw_tokens * f
    sw = {"eager": (lambda: [rnd(sw_tokens, 2 * f)], _swiglu_eager)}
    try:
        from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
        sw["megatron_fused"] = (lambda: [rnd(sw_tokens, 2 * f)], lambda x: bias_swiglu_impl(x, None))
    except Exception:  # noqa: BLE001
        pass
    ops.append(dict(op="swiglu", shape=[sw_tokens, 2 * f], impls=sw, fwd_bytes=3 * ns * es, bwd_bytes=5 * ns * es))

    seq = tokens // 4 if not smoke else 32
    dim = h // heads
    nr = seq * heads * dim
    freqs = torch.randn(seq, 1, 1, dim, device=device, dtype=torch.float32, generator=g)
    rope = {"eager": (lambda: [rnd(seq, 1, heads, dim)], lambda t: _rope_eager(t, freqs))}
    if _have_te(device):
        try:
            from megatron.core.models.common.embeddings.rope_utils import fused_apply_rotary_pos_emb
            rope["te_fused"] = (lambda: [rnd(seq, 1, heads, dim)], lambda t: fused_apply_rotary_pos_emb(t, freqs))
        except Exception:  # noqa: BLE001
            pass
    ops.append(dict(op="rope", shape=[seq, 1, heads, dim], impls=rope, fwd_bytes=2 * nr * es, bwd_bytes=2 * nr * es))

    nce = ce_tokens * vocab
    target = torch.randint(0, vocab, (ce_tokens,), device=device, generator=g)
    ce = {"eager": (lambda: [rnd(ce_tokens, vocab, dt=torch.float32)], lambda x: _ce_eager(x, target)),
          "torch_cross_entropy": (lambda: [rnd(ce_tokens, vocab, dt=torch.float32)],
                                  lambda x: F.cross_entropy(x, target, reduction="sum"))}
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        if parallel_state.model_parallel_is_initialized():
            ce["megatron_vocab_parallel"] = (lambda: [rnd(ce_tokens, 1, vocab, dt=torch.float32)],
                                             lambda x: vocab_parallel_cross_entropy(x, target.unsqueeze(1)).sum())
    except Exception:  # noqa: BLE001
        pass
    ops.append(dict(op="cross_entropy", shape=[ce_tokens, vocab], impls=ce, fwd_bytes=nce * 4, bwd_bytes=2 * nce * 4))
    return ops


def bench_ops(device, dtype, paper: bool, repeats: int, smoke: bool = False) -> list[dict]:
    rows = []
    for op in op_cases(device, dtype, paper, smoke):
        cases, skipped = {}, {}
        for name, (make, run) in op["impls"].items():
            def call(*xs, run=run):
                return run(*xs)
            try:
                case = _FwdBwd(make, call, device)
                case()
            except Exception as e:  # noqa: BLE001
                skipped[name] = f"{type(e).__name__}: {str(e)[:120]}"
                continue
            cases[name] = case
        bench.interleaved(cases, device, repeats)
        for name in op["impls"]:
            if name in skipped:
                rows.append({"op": op["op"], "impl": name, "skipped": skipped[name]})
                continue
            fwd, bwd = cases[name].timings(repeats)
            f, b = bench.summary(fwd), bench.summary(bwd)
            rows.append({"op": op["op"], "impl": name, "shape": op["shape"], "fwd_s": f, "bwd_s": b,
                         "fwd_bytes": op["fwd_bytes"], "bwd_bytes": op["bwd_bytes"],
                         "fwd_gbps": op["fwd_bytes"] / f["median"] / 1e9,
                         "bwd_gbps": op["bwd_bytes"] / max(b["median"], 1e-12) / 1e9})
    return rows


# ---------------------------------------------------------------------------------------------- GEMMs
def gemm_shapes(paper: bool, smoke: bool = False) -> list[dict]:
    """(name, M, N, K) of the model's linear layers: M = tokens of a microbatch (LLM) / patches (ViT)."""
    cfg = qwen_vl_7b()
    h, f, w, fv = cfg.llm.hidden_size, cfg.llm.ffn_hidden_size, cfg.vit.width, cfg.vit.ffn_hidden_size
    vocab = padded_vocab_size(cfg.llm.vocab_size, 1)
    if smoke:
        return [dict(name="llm_qkv", M=32, N=96, K=64), dict(name="llm_fc2", M=32, N=64, K=128)]
    m_llm, m_vit = (4096, 4096) if paper else (128, 256)
    return [dict(name="llm_qkv", M=m_llm, N=3 * h, K=h), dict(name="llm_out", M=m_llm, N=h, K=h),
            dict(name="llm_fc1", M=m_llm, N=2 * f, K=h), dict(name="llm_fc2", M=m_llm, N=h, K=f),
            dict(name="lm_head", M=m_llm // (8 if not paper else 1), N=vocab, K=h),
            dict(name="vit_qkv", M=m_vit, N=3 * w, K=w), dict(name="vit_out", M=m_vit, N=w, K=w),
            dict(name="vit_fc1", M=m_vit, N=fv, K=w), dict(name="vit_fc2", M=m_vit, N=w, K=fv),
            dict(name="adapter_kv", M=m_vit, N=h, K=w)]


def bench_gemms(device, dtype, paper: bool, repeats: int, smoke: bool = False) -> dict:
    """The model's GEMMs and, interleaved with them in every repeat, a square n^3 matmul whose best repeat is
    the measured peak (so a busy spell lowers the peak and the GEMMs alike) and a large copy (bandwidth)."""
    es = dtype.itemsize
    shapes = gemm_shapes(paper, smoke)
    g = torch.Generator(device=device).manual_seed(0)
    n = 256 if smoke else (8192 if device.type == "cuda" else 1024)
    square = (torch.randn(n, n, device=device, dtype=dtype, generator=g),
              torch.randn(n, n, device=device, dtype=dtype, generator=g))
    copy_n = (8 if smoke else 256) * 2 ** 20 // 4
    src = torch.randn(copy_n, device=device, dtype=torch.float32, generator=g)
    dst = torch.empty_like(src)
    inputs = {s["name"]: (torch.randn(s["M"], s["K"], device=device, dtype=dtype, generator=g),
                          torch.randn(s["N"], s["K"], device=device, dtype=dtype, generator=g)) for s in shapes}
    cases = {"_peak": lambda: torch.matmul(*square), "_copy": lambda: dst.copy_(src)}
    cases.update({s["name"]: (lambda x=inputs[s["name"]]: F.linear(x[0], x[1])) for s in shapes})
    times = bench.interleaved(cases, device, repeats)
    peak = 2.0 * n ** 3 / min(times["_peak"]) / 1e12
    bw = 2.0 * copy_n * 4 / min(times["_copy"]) / 1e9
    rows = []
    for s in shapes:
        flops = 2.0 * s["M"] * s["N"] * s["K"]
        nbytes = es * (s["M"] * s["K"] + s["N"] * s["K"] + s["M"] * s["N"])
        t = bench.summary(times[s["name"]])
        ai = flops / nbytes
        rows.append({**s, "flops": flops, "bytes": nbytes, "intensity": ai, "s": t,
                     "tflops": flops / t["median"] / 1e12, "tflops_best": flops / t["min"] / 1e12,
                     "roof_tflops": min(peak, bw * ai / 1e3), "fraction_of_peak": flops / t["median"] / 1e12 / peak})
    return {"peak_tflops": peak, "peak_matmul_n": n, "peak_tflops_median": 2.0 * n ** 3 / bench.summary(times["_peak"])["median"] / 1e12,
            "bandwidth_gbps": bw, "gemms": rows}


def run(device=None, paper: bool = False, repeats: int | None = None, smoke: bool = False, dtype=None,
        parts=("attention", "ops", "gemm")) -> dict:
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or (torch.bfloat16 if paper and device.type == "cuda" else torch.float32)
    repeats = repeats or (2 if smoke else 5 if device.type == "cuda" else 3)
    out = {"environment": bench.environment(device), "dtype": str(dtype).replace("torch.", ""),
           "paper_shapes": paper, "smoke": smoke, "repeats": repeats,
           "transformer_engine_used": _have_te(device)}
    if "attention" in parts:
        out["attention"] = bench_attention(device, dtype, paper, repeats, smoke)
    if "ops" in parts:
        out["ops"] = bench_ops(device, dtype, paper, repeats, smoke)
    if "gemm" in parts:
        out["gemm"] = bench_gemms(device, dtype, paper, repeats, smoke)
    return out


def charts(result: dict, json_path: str) -> list[str]:
    """The roofline (GEMMs against peak and bandwidth) and the attention TFLOP/s per implementation."""
    paths = []
    if "gemm" in result:
        g = result["gemm"]
        ais = sorted(r["intensity"] for r in g["gemms"])
        lo, hi = ais[0] / 4, ais[-1] * 4
        ridge = g["peak_tflops"] * 1e3 / g["bandwidth_gbps"]
        roof = [(x, min(g["peak_tflops"], g["bandwidth_gbps"] * x / 1e3))
                for x in sorted({lo, hi, min(max(ridge, lo), hi)})]
        series = {"~roof": roof}
        for r in g["gemms"]:
            series[r["name"]] = [(r["intensity"], r["tflops"])]
        paths.append(bench.chart(bench.png_path(json_path), series,
                                 title=f"GEMM roofline {result['dtype']} peak {g['peak_tflops']:.3g} TFLOP/s "
                                       f"{g['bandwidth_gbps']:.3g} GB/s", xlabel="FLOP per byte",
                                 ylabel="TFLOP/s", logx=True, logy=True, lines=False))
    if result.get("attention"):
        series = {}
        cases = list(dict.fromkeys(r["case"] for r in result["attention"]))
        for r in result["attention"]:
            if "skipped" not in r:
                series.setdefault(r["impl"] + " fwd+bwd", []).append((cases.index(r["case"]) + 1, r["fwd_bwd_tflops"]))
        paths.append(bench.chart(bench.png_path(json_path, "attention"), series,
                                 title="attention TFLOP/s: " + " ".join(f"{i + 1}={c}" for i, c in enumerate(cases)),
                                 xlabel="case", ylabel="TFLOP/s"))
    return paths


__all__ = ["run", "charts", "attention_cases", "attention_flops", "gemm_shapes", "bench_attention", "bench_ops",
           "bench_gemms"]
