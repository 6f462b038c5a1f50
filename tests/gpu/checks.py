#!/usr/bin/env python
"""Issue #9's GPU acceptance: what only a GPU can show (docs/gpu.md, "Acceptance: tests/gpu/run.sh").

    te_vs_local_logits  Transformer Engine vs local layers, one checkpoint: fp32 logits within 1e-4, bf16 reported
    te_packed_thd       two samples packed in one row, per-sample attention (TE: THD, local: mask) = unpacked, 1e-4
    bf16_step_tiny      20 steps fp32 vs bf16: losses within 1%, nothing off the GPU, peak memory / --dry-run
    bf16_step_small     the same at 7B width (4 LLM layers, 4 ViT-bigG layers, seq 512, 224 px)
    stage_scripts       examples/ stages 1 -> 2 -> 3 in cluster mode on the demo's data, mcore-to-hf, generate
    dali_vs_pillow      DALI's GPU decoder vs Pillow on photos: the bound of docs/images.md
    multi_gpu           (2+ GPUs) TP2 and PP2 logits = TP1 over NCCL; sequence-parallel gradients = non-SP (TE)

`bash tests/gpu/run.sh` installs what the machine lacks and runs this: one line per check
(`PASS|FAIL|SKIP <check> <numbers>`), everything in the JSON report. Each check runs in its own process
under a time limit, so a crash or hang in one does not stop the others.

`--cpu-smoke` runs the same code on the CPU at tiny sizes (tests/test_gpu_acceptance.py): local layers
stand in for TE, DALI's CPU pipeline for its GPU decoder, gloo for NCCL, and the stage scripts get an
interpreter that answers their GPU probe with yes. What such a stand-in cannot show is reported SKIP
(TE vs local) or named in the numbers (SP); nothing a smoke run reports is a claim about a GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SMOKE = "--cpu-smoke" in sys.argv  # set in the parent and passed on to each check's process
OPTIONAL = ("megatron", "transformer_engine", "nvidia", "psutil")  # run.sh may fail to install these: SKIP


# ------------------------------------------------------------------------------------------------ helpers
def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd: list[str], env=None) -> str:
    """Run a command from the repository root, its stderr into this check's log; its stdout is returned
    (and logged). A non-zero exit raises, naming the command and the end of its output."""
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    print(p.stdout, flush=True)
    if p.returncode:
        tail = " | ".join(p.stdout.strip().splitlines()[-3:])
        raise RuntimeError(f"{os.path.basename(cmd[1] if len(cmd) > 1 else cmd[0])} exited {p.returncode}: {tail}")
    return p.stdout


# --------------------------------------------------------------------------------- 1. TE vs local logits
def te_vs_local_logits(work: str) -> dict:
    import torch
    from qwenvl_megatron.data.loader import MockLoader
    from qwenvl_megatron.models.config import tiny
    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.runtime import have_transformer_engine, initialize
    from qwenvl_megatron.runtime.layer_impl import available_fusions
    from qwenvl_megatron.training.checkpoint import load_model_weights, save_model_weights
    from qwenvl_megatron.training.step import build_model

    dev = initialize(1, 1)
    other = "te" if have_transformer_engine() else "local"  # without TE the code runs, local vs local
    cfg = tiny()
    batch = to_device(MockLoader(2, 64, cfg.llm.vocab_size, cfg.vit.image_size, cfg.image_start_id,
                                 cfg.adapter.num_queries).microbatch(0), dev)
    weights = os.path.join(work, "local_weights")
    save_model_weights(build_model(cfg, ParallelPlan(), wrap_ddp=False), weights, cfg)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        logits = {}
        for impl in ("local", other):
            plan = ParallelPlan(impl=impl, params_dtype=dtype, bf16=dtype == torch.bfloat16, fusions=available_fusions())
            model = build_model(cfg, plan, wrap_ddp=False)[0]
            load_model_weights([model], weights)  # the local checkpoint into a TE model (and into local)
            with torch.no_grad():
                logits[impl] = model.eval()(batch["input_ids"], batch["images"], None).float()
        out[f"{name}_max_diff"] = (logits["local"] - logits[other]).abs().max().item()
        out[f"{name}_max_abs_logit"] = logits["local"].abs().max().item()
    if other == "local":
        return dict(out, skip="no Transformer Engine (or no CUDA): local vs local only")
    return dict(out, ok=out["fp32_max_diff"] <= 1e-4)


# ----------------------------------------------------------------- 1b. packed per-sample attention (THD)
def te_packed_thd(work: str) -> dict:
    """Two samples packed into one row (positions restart at the second) give, under per-sample attention,
    each sample's own logits: through TE's THD fused attention (cu_seqlens, models/packed.py) and through the
    local layers' explicit mask, fp32, against the same samples unpacked."""
    import torch
    from qwenvl_megatron.data.loader import MockLoader
    from qwenvl_megatron.models.config import tiny
    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.runtime import have_transformer_engine, initialize
    from qwenvl_megatron.runtime.layer_impl import available_fusions
    from qwenvl_megatron.training.checkpoint import load_model_weights, save_model_weights
    from qwenvl_megatron.training.step import build_model

    dev = initialize(1, 1)
    other = "te" if have_transformer_engine() else "local"
    cfg, seq = tiny(), 64
    batch = to_device(MockLoader(2, seq, cfg.llm.vocab_size, cfg.vit.image_size, cfg.image_start_id,
                                 cfg.adapter.num_queries).microbatch(0), dev)
    ids, images = batch["input_ids"], batch["images"]
    packed_ids = ids.reshape(1, 2 * seq)  # sample 0 then sample 1; images stay in row-major order
    positions = torch.arange(seq, device=dev).repeat(2).reshape(1, 2 * seq)
    weights = os.path.join(work, "local_weights")
    save_model_weights(build_model(cfg, ParallelPlan(), wrap_ddp=False), weights, cfg)
    out = {}
    for impl in ("local", other) if other == "te" else ("local",):
        plan = ParallelPlan(impl=impl, params_dtype=torch.float32, fusions=available_fusions())
        model = build_model(cfg, plan, wrap_ddp=False)[0]
        load_model_weights([model], weights)
        with torch.no_grad():
            unpacked = model.eval()(ids, images, None).float()
            packed = model(packed_ids, images, None, position_ids=positions).float().reshape(unpacked.shape)
        out[f"{impl}_max_diff"] = (packed - unpacked).abs().max().item()
        out[f"{impl}_max_abs_logit"] = unpacked.abs().max().item()
    if other == "local":
        return dict(out, skip="no Transformer Engine (or no CUDA): the local mask path only")
    return dict(out, ok=max(out["te_max_diff"], out["local_max_diff"]) <= 1e-4)


# ------------------------------------------------------------------------------- 2. bf16 vs fp32 steps
def _train(argv: list[str], init: dict | None) -> dict:
    """The trainer's own step on mock data for --train-iters steps, starting from `init` (a state dict) or,
    when None, from a fresh model whose weights are returned. On CPU under device_discipline, which puts
    tensors created without a device on `meta`, so the placement checks mean what they mean on a GPU."""
    import torch
    from qwenvl_megatron.data.loader import MockLoader
    from qwenvl_megatron.runtime import device_discipline, initialize, misplaced_tensors
    from qwenvl_megatron.training.arguments import parse_args
    from qwenvl_megatron.training.layout import estimate_memory, parallel_plan, plan_layout
    from qwenvl_megatron.training.optimizer import OptimizerSettings, build_optimizer, build_scheduler
    from qwenvl_megatron.training.step import build_model, unwrap
    from qwenvl_megatron.training.train import train_step

    args = parse_args(argv)
    layout, cfg = plan_layout(args, 1), args.model_cfg
    dev = initialize(1, 1, seed=args.seed)
    cuda = dev.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with contextlib.nullcontext() if cuda else device_discipline("cpu"):
        model = build_model(cfg, parallel_plan(args))
        if init is None:
            init = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model[0]).state_dict().items()
                    if torch.is_tensor(v) and not k.endswith("_extra_state")}
        else:  # before the optimizer takes its fp32 master copy
            missing, unexpected = unwrap(model[0]).load_state_dict(init, strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        settings = OptimizerSettings(lr=args.lr, min_lr=args.min_lr, vit_lr_decay=args.vit_lr_decay, bf16=args.bf16)
        optimizer = build_optimizer(model, cfg, settings)
        scheduler = build_scheduler(optimizer, settings, args.lr_warmup_iters, args.train_iters, args.lr_decay_style)
        loader = MockLoader(layout.micro_batch_size, layout.seq_length, cfg.llm.vocab_size, args.image_size,
                            cfg.image_start_id, cfg.adapter.num_queries, seed=args.seed)
        losses, start = [], time.time()
        for it in range(args.train_iters):
            batches = loader.global_batch(it * layout.global_batch_size, layout.num_microbatches)
            loss, _, updated = train_step(model, optimizer, scheduler, [to_device(b, dev) for b in batches], layout)
            losses.append(loss if updated else float("nan"))
        seconds = time.time() - start
        misplaced = misplaced_tensors(model[0], dev) + off_device(optimizer, dev)
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    estimate = estimate_memory(args, layout)[0]["total"]
    del model, optimizer, scheduler
    return {"losses": losses, "misplaced": misplaced, "peak": peak, "estimate": estimate, "init": init,
            "s_per_step": seconds / args.train_iters}


def off_device(optimizer, dev) -> list[str]:
    """Optimizer parameters (fp32 master copies) and state not on the device. torch's Adam keeps its
    `step` counter on the host by design, so that one is not counted."""
    import torch
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                state = opt.optimizer.state.get(p, {})
                out += [f"optimizer {k} {tuple(v.shape)} ({v.device})" for k, v in [("param", p), *state.items()]
                        if torch.is_tensor(v) and k != "step" and v.device != dev]
    return out


def bf16_step(work: str, model_flags: list[str]) -> dict:
    steps = 3 if SMOKE else 20
    flags = model_flags + ["--mock-data", "--transformer-impl", "auto", "--train-iters", str(steps),
                           "--lr", "2e-4", "--min-lr", "2e-5", "--lr-warmup-iters", "1", "--seed", "7"]
    fp32 = _train(flags, None)
    bf16 = _train(flags + ["--bf16"], fp32["init"])
    rel = [abs(b - a) / abs(a) for a, b in zip(fp32["losses"], bf16["losses"])]
    out = {"steps": steps, "fp32_loss_first": fp32["losses"][0], "fp32_loss_last": fp32["losses"][-1],
           "bf16_loss_last": bf16["losses"][-1], "max_rel_loss_diff": max(rel),
           "misplaced": len(fp32["misplaced"]) + len(bf16["misplaced"]),
           "misplaced_names": (fp32["misplaced"] + bf16["misplaced"])[:8]}
    for name, run in (("fp32", fp32), ("bf16", bf16)):
        out[f"{name}_s_per_step"] = run["s_per_step"]
        out[f"{name}_estimate_gib"] = run["estimate"] / 2 ** 30
        if run["peak"] is not None:
            out[f"{name}_peak_gib"] = run["peak"] / 2 ** 30
            out[f"{name}_peak_over_estimate"] = run["peak"] / run["estimate"]
    finite = all(math.isfinite(x) for x in fp32["losses"] + bf16["losses"])
    return dict(out, ok=finite and max(rel) <= 0.01 and out["misplaced"] == 0)


def bf16_step_tiny(work: str) -> dict:
    seq, size = ("64", "56") if SMOKE else ("128", "112")
    return bf16_step(work, ["--model", "tiny", "--seq-length", seq, "--image-size", size,
                            "--micro-batch-size", "2", "--global-batch-size", "4"])


def bf16_step_small(work: str) -> dict:
    """qwen_vl_7b() at full width with 4 LLM and 4 ViT layers (a tiny model with 4 + 4 layers in the smoke run)."""
    from qwenvl_megatron.models.config import qwen_vl_7b, tiny
    cfg = (tiny() if SMOKE else qwen_vl_7b()).replace(llm={"num_layers": 4}, vit={"num_layers": 4})
    path = os.path.join(work, "small_config.json")
    with open(path, "w") as f:
        json.dump(cfg.to_hf_config(), f)
    seq, size = ("64", "56") if SMOKE else ("512", "224")
    return bf16_step(work, ["--model-config", path, "--seq-length", seq, "--image-size", size,
                            "--micro-batch-size", "1", "--global-batch-size", "2"])


# ------------------------------------------------------------------------------------ 3. stage scripts
def stage_python(work: str) -> str:
    """The stage scripts' interpreter ($PYTHON). On a GPU this Python. In the smoke run a wrapper that
    answers their one GPU probe (`torch.cuda.is_available()`) with yes and runs everything else as is, so
    that cluster mode (DATA_PATH set) runs on the CPU: gloo, local layers, bf16 on the CPU."""
    if not SMOKE:
        return sys.executable
    path = os.path.join(work, "python")
    with open(path, "w") as f:
        f.write(f'#!/usr/bin/env bash\ncase "$*" in *torch.cuda.is_available*) exit 0;; esac\nexec "{sys.executable}" "$@"\n')
    os.chmod(path, 0o755)
    return path


def stage_scripts(work: str) -> dict:
    from qwenvl_megatron.models.config import QwenVLConfig
    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.runtime import initialize
    from qwenvl_megatron.training.checkpoint import save_model_weights
    from qwenvl_megatron.training.step import build_model

    demo, ckpt, iters = os.path.join(work, "demo"), os.path.join(work, "checkpoints"), 2 if SMOKE else 20
    env = {k: v for k, v in os.environ.items() if k not in (
        "DATA_PATH", "QWENVL_DEMO", "INIT_CHECKPOINT", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(PYTHON=stage_python(work), DEMO_DIR=demo)
    # The demo's own preparation (examples/common.sh): synthetic corpus, SentencePiece tokenizer, tiny config.
    sh(["bash", "-c", f'source "{ROOT}/examples/common.sh" && prepare_demo'], dict(env, QWENVL_DEMO="1"))
    # Stage 1 starts from converted weights (INIT_CHECKPOINT): local layers in fp32, as the converter writes.
    with open(os.path.join(demo, "model_config.json")) as f:
        cfg = QwenVLConfig.from_hf_config(json.load(f))
    initialize(1, 1)
    save_model_weights(build_model(cfg, ParallelPlan(), wrap_ddp=False), os.path.join(work, "init"), cfg)

    extra = ["--model-config", os.path.join(demo, "model_config.json"), "--tokenizer-type", "sentencepiece",
             "--tokenizer-model", os.path.join(demo, "tok.model"), "--train-iters", str(iters),
             "--lr-warmup-iters", "1", "--lr", "1e-3", "--min-lr", "1e-5", "--micro-batch-size", "4",
             "--global-batch-size", "8", "--seq-length", "64" if SMOKE else "128", "--save-interval", str(iters),
             "--log-interval", "5"]
    out = {}
    for stage, script, size in ((1, "pretrain_stage1.sh", 56), (2, "pretrain_stage2.sh", 112),
                                (3, "finetune_stage3.sh", 112)):
        stage_env = dict(env, QWENVL_DEMO="0", DATA_PATH=os.path.join(demo, f"stage{stage}"), CKPT_ROOT=ckpt,
                         INIT_CHECKPOINT=os.path.join(work, "init"), GPUS_PER_NODE="1", TP="1", PP="1", MBS="4",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        log = sh(["bash", os.path.join(ROOT, "examples", script), *extra, "--image-size", str(size)], stage_env)
        out[f"stage{stage}_loss"] = float(re.findall(r"\| loss (\S+)", log)[-1])
        loaded = re.findall(r"^loaded (weights from )?(\S+)", log, re.M)
        out[f"stage{stage}_loaded"] = loaded[-1][1] if loaded else None
    hf = os.path.join(work, "hf")
    sh([sys.executable, "tools/convert_checkpoint.py", "mcore-to-hf", "--load", os.path.join(ckpt, "stage3"), "--out", hf])
    gen = sh([sys.executable, "tools/generate.py", "--hf-dir", hf, "--tokenizer-type", "sentencepiece",
              "--tokenizer-model", os.path.join(demo, "tok.model"), "--max-new-tokens", "8",
              "--image", os.path.join(demo, "raw", "images", "heldout", "000000.png"),
              "--prompt", "Generate the caption in English:"])
    answer = json.loads([line for line in gen.splitlines() if line.startswith("{")][-1])
    out.update(gen_tokens=len(answer["tokens"]), gen_stopped=answer["stopped"], gen_text=answer["text"])
    chain = [out["stage1_loaded"], out["stage2_loaded"], out["stage3_loaded"]]
    expected = [os.path.join(work, "init"), os.path.join(ckpt, "stage1"), os.path.join(ckpt, "stage2")]
    out["chain_ok"] = all(c is not None and c.startswith(e) for c, e in zip(chain, expected))
    return dict(out, ok=out["chain_ok"] and (out["gen_tokens"] > 0 or out["gen_stopped"]))


# -------------------------------------------------------------------------------------- 4. DALI vs Pillow
def photos() -> tuple[list[bytes], str]:
    """skimage's astronaut, chelsea and coffee as JPEG; without skimage, smooth Pillow-made images."""
    import io

    import numpy as np
    from PIL import Image, ImageFilter

    def jpeg(img):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=90)
        return buf.getvalue()

    try:
        from skimage import data
        return [jpeg(Image.fromarray(getattr(data, n)())) for n in ("astronaut", "chelsea", "coffee")], "skimage photos"
    except Exception as e:  # noqa: BLE001 - any failure: say so and use stand-ins
        rng = np.random.default_rng(0)
        imgs = []
        for w, h in ((512, 512), (451, 300), (600, 400)):
            base = Image.merge("RGB", [Image.radial_gradient("L").resize((w, h)), Image.linear_gradient("L").resize((w, h)),
                                       Image.effect_mandelbrot((w, h), (-2, -1.2, 0.8, 1.2), 40)])
            noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
            imgs.append(jpeg(Image.blend(base, noise, 0.3)))
        return imgs, f"Pillow-made stand-ins, not photos ({type(e).__name__}: {e})"


def dali_vs_pillow(work: str) -> dict:
    import torch
    from qwenvl_megatron.data.images import ImageTransform
    from qwenvl_megatron.runtime import have_dali

    if not have_dali():
        return {"skip": "DALI not installed"}
    blobs, source = photos()
    device = "cuda" if torch.cuda.is_available() else None  # None: DALI's CPU pipeline (smoke run)
    out = {"images": len(blobs), "source": source, "dali_device": device or "cpu"}
    for size in (224, 448):
        dali = ImageTransform(size, backend="dali", device=device, normalize=False)(blobs)
        pil = ImageTransform(size, backend="pil", normalize=False)(blobs)
        err = (dali.cpu().int() - pil.int()).abs()
        out[f"{size}_mean_abs_diff"] = err.float().mean().item()
        out[f"{size}_within_1_level"] = (err <= 1).float().mean().item()
        out[f"{size}_max_diff"] = err.max().item()
    ok = all(out[f"{s}_mean_abs_diff"] < 0.3 and out[f"{s}_within_1_level"] >= 0.99 for s in (224, 448))
    return dict(out, ok=ok)


# ------------------------------------------------------------------------------------------- 5. 2 GPUs
def multi_gpu(work: str) -> dict:
    import torch
    gpus = torch.cuda.device_count()
    if not SMOKE and gpus < 2:
        return {"skip": f"{gpus} GPU", "gpus": gpus}
    result = os.path.join(work, "multi_gpu.json")
    sh([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        os.path.join(HERE, "multi_gpu.py"), "--out", result])
    with open(result) as f:
        out = json.load(f)
    tol = 1e-4 * max(1.0, out["max_abs_logit"])
    ok = (out["tp2_logits_max_diff"] <= tol and out["pp2_logits_max_diff"] <= tol and not out["sp_missing_grads"]
          and out["sp_grad_max_diff"] <= 1e-5 * max(1.0, out["sp_grad_max_abs"]))
    return dict(out, ok=ok)


CHECKS = [  # name, function, time limit (s) on a GPU
    ("te_vs_local_logits", te_vs_local_logits, 120),
    ("te_packed_thd", te_packed_thd, 90),
    ("bf16_step_tiny", bf16_step_tiny, 120),
    ("bf16_step_small", bf16_step_small, 240),
    ("stage_scripts", stage_scripts, 300),
    ("dali_vs_pillow", dali_vs_pillow, 120),
    ("multi_gpu", multi_gpu, 180),
]


# ------------------------------------------------------------------------------------------- the driver
def child(name: str, result_path: str) -> None:
    """Run one check in this process and write its result ({"ok": bool} or {"skip": reason}, + numbers)."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the comparisons
    torch.backends.cudnn.allow_tf32 = False
    work = tempfile.mkdtemp(prefix=f"qwenvl_gpu_{name}_")
    try:
        result = dict(CHECKS_BY_NAME[name](work), work_dir=work)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in OPTIONAL:
            raise
        result = {"skip": f"{e.name} is not installed (run.sh: see its setup log)"}
    except Exception as e:  # noqa: BLE001 - a failing check is a result, not a crash
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:600], "work_dir": work}
    with open(result_path, "w") as f:
        json.dump(result, f, default=str)


CHECKS_BY_NAME = {name: fn for name, fn, _ in CHECKS}


def spawn(name: str, env: dict, limit: float, log_path: str) -> dict:
    result = log_path[:-4] + ".result.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--result", result] + (["--cpu-smoke"] if SMOKE else [])
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        with contextlib.suppress(ProcessLookupError):  # the check and whatever it started (torchrun ranks)
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    if os.path.exists(result):
        with open(result) as f:
            return json.load(f)
    return {"ok": False, "error": f"timed out after {limit:.0f} s" if timed_out else f"exited {p.returncode} without a result"}


def versions() -> dict:
    from importlib import metadata

    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for name in ("megatron-core", "transformer-engine", "transformer_engine", "nvidia-dali-cuda120",
                 "nvidia-dali-cuda130", "scikit-image"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def summary_line(status: str, name: str, result: dict) -> str:
    nums = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "ok"]
    why = result.get("skip") or result.get("error")
    return " ".join([status, name, *nums] + ([f"({why})".replace("\n", " ")] if why else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="run every check's code on the CPU, tiny sizes")
    ap.add_argument("--report", default=os.environ.get("GPU_REPORT", "gpu_report.json"))
    ap.add_argument("--budget-s", type=float, default=470, help="time for all checks (run.sh passes what is left)")
    ap.add_argument("--only", help="comma list of checks to run")
    ap.add_argument("--jobs", type=int, help="checks run at once (default 1; 2 with --cpu-smoke)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.result)
        return 0

    import torch
    start, deadline = time.time(), time.time() + (3600 if SMOKE else args.budget_s)
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if SMOKE:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with GPUs
    elif not torch.cuda.is_available():
        print(f"FAIL setup torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})")
        return 1
    report = os.path.abspath(args.report)
    logs = os.path.splitext(report)[0] + "_logs"
    os.makedirs(logs, exist_ok=True)
    setup_log = os.environ.get("QWENVL_GPU_SETUP_LOG")
    doc = {"mode": "cpu-smoke" if SMOKE else "gpu",
           "device": "cpu" if SMOKE else torch.cuda.get_device_name(0),
           "gpus": 0 if SMOKE else torch.cuda.device_count(), "versions": versions(),
           "setup": open(setup_log).read().splitlines() if setup_log and os.path.exists(setup_log) else [],
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": {}}
    wanted = [(name, limit) for name, _, limit in CHECKS if not args.only or name in args.only.split(",")]

    def run(name: str, limit: float) -> tuple[str, dict, dict]:
        t0, log = time.time(), os.path.join(logs, f"{name}.log")
        limit = min(limit * (3 if SMOKE else 1), deadline - t0)
        result = spawn(name, env, limit, log) if limit >= 15 else {"skip": "no time left of the 8-minute budget"}
        status = "SKIP" if "skip" in result else "PASS" if result.get("ok") else "FAIL"
        entry = {"status": status, "seconds": round(time.time() - t0, 1), "log": log,
                 "numbers": {k: v for k, v in result.items() if k not in ("ok", "skip", "error")}}
        if status != "PASS":
            entry["reason"] = result.get("skip") or result.get("error") or "a bound was not met (see numbers)"
        if status == "FAIL" and os.path.exists(log):
            with open(log, errors="replace") as f:
                entry["log_tail"] = f.read()[-3000:]
        return name, result, entry

    # One at a time on a GPU (memory figures, time limits); the smoke run uses both cores of a small machine.
    with concurrent.futures.ThreadPoolExecutor(args.jobs or (2 if SMOKE else 1)) as pool:
        longest_first = sorted(wanted, key=lambda w: -w[1]) if SMOKE else wanted
        futures = {name: pool.submit(run, name, limit) for name, limit in longest_first}
        for name, _ in wanted:  # reported in the order of CHECKS
            name, result, entry = futures[name].result()
            print(summary_line(entry["status"], name, result), flush=True)
            doc["checks"][name] = entry
            doc["elapsed_s"] = round(time.time() - start, 1)
            with open(report, "w") as f:  # after every check: a run cut short still leaves its figures
                json.dump(doc, f, indent=1, default=str)
    failed = [n for n, c in doc["checks"].items() if c["status"] == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
