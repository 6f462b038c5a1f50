"""torchrun worker: the Megatron Qwen-VL under parallel layouts vs the reference and the 1-process run.

For each layout named on the command line it checks (1) logits against the independent reference
(tests/reference_qwenvl.py) at 224 and 448 px with 0, 1 and 2 images, and (2) loss and full gradients
of one global batch against the single-process megatron model. Rank 0 writes the numbers to --out.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import reference_qwenvl as R  # noqa: E402

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from qwenvl_megatron.convert.hf_layout import hf_to_model  # noqa: E402
from qwenvl_megatron.convert.sharding import gather_full_state_dict, load_full_state_dict  # noqa: E402
from qwenvl_megatron.models.config import QwenVLConfig  # noqa: E402
from qwenvl_megatron.models.parallel import ParallelPlan  # noqa: E402
from qwenvl_megatron.runtime import initialize  # noqa: E402
from qwenvl_megatron.training.step import build_model, forward_backward, unwrap  # noqa: E402

# name -> (plan overrides, reference-config overrides)
LAYOUTS = {
    "tp2": (dict(tensor_parallel=2), {}),
    "pp2": (dict(pipeline_parallel=2), {}),
    "dp2": ({}, {}),
    "tp2pp2": (dict(tensor_parallel=2, pipeline_parallel=2), {}),
    # 3 decoder layers split 1 | 2: the first stage also carries ViT + adapter + embedding.
    "pp2_uneven": (dict(pipeline_parallel=2, first_stage_layers=1), dict(num_hidden_layers=3)),
    "tp2_recompute": (dict(tensor_parallel=2, recompute=("vit", "adapter", "llm")), {}),
}


def make_ids(cfg, n_images_per_row, seq, gen):
    """Random text with image spans: row r gets n_images_per_row[r] spans."""
    q, s_id = cfg.adapter.num_queries, cfg.image_start_id
    ids = torch.randint(0, s_id - 5, (len(n_images_per_row), seq), generator=gen)
    for r, k in enumerate(n_images_per_row):
        pos = 2
        for _ in range(k):
            ids[r, pos] = s_id
            ids[r, pos + 1: pos + 1 + q] = s_id + 2
            ids[r, pos + 1 + q] = s_id + 1
            pos += q + 5
    return ids


def global_batch(cfg, gen, size=224):
    """4 samples: two with images (one with two), two text-only; seq 48."""
    counts = [1, 0, 2, 0]
    ids = make_ids(cfg, counts, 48, gen)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[ids == cfg.image_start_id + 2] = -100  # no loss on image positions
    targets[:, :3] = -100
    images = torch.randn(sum(counts), 3, size, size, generator=gen)
    return ids, targets, images, counts


def rows_batch(ids, targets, images, counts, rows):
    first = sum(counts[: rows[0]])
    n = sum(counts[r] for r in rows)
    return {"input_ids": ids[rows[0]: rows[-1] + 1], "targets": targets[rows[0]: rows[-1] + 1],
            "images": images[first: first + n] if n else None}


def gather_pp(d):
    """Merge per-stage dicts over the pipeline group."""
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, {k: v for k, v in d.items()}, group=ps.get_pipeline_model_parallel_group())
    out = {}
    for p in parts:
        out.update(p)
    return out


def check_logits(model, hfc, cfg, sd):
    ref = R.ReferenceQwenVL(hfc)
    ref.load_state_dict(sd)
    ref.eval()
    model.eval()
    results = {}
    gen = torch.Generator().manual_seed(7)
    for size in (224, 448):
        for n_img in (0, 1, 2):
            counts = [n_img, 0] if n_img < 2 else [1, 1]
            if n_img == 0:
                counts = [0, 0]
            ids = make_ids(cfg, counts, 44, gen)
            images = torch.randn(sum(counts), 3, size, size, generator=gen) if sum(counts) else None
            with torch.no_grad():
                expected = ref(ids, images)
            store = {}

            def fwd(it, m):
                b = next(it)
                out = m(b["input_ids"], b["images"], None)
                return out, lambda o: (o.sum() * 0, {"logits": o.detach()})

            with torch.no_grad():
                outs = get_forward_backward_func()(
                    forward_step_func=fwd, data_iterator=iter([{"input_ids": ids, "images": images}]),
                    model=[model], num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                    forward_only=True)
            if ps.is_pipeline_last_stage():
                store["diff"] = (outs[0]["logits"] - expected).abs().max().item()
            merged = gather_pp(store)
            results[f"{size}px_{n_img}img"] = merged["diff"]
    model.train()
    return results


def baseline(hfc, cfg, sd, batch):
    """Loss and gradients of the whole global batch in one process (TP1, PP1, no DDP)."""
    initialize(1, 1)
    model = build_model(cfg, ParallelPlan(), wrap_ddp=False)[0]
    load_full_state_dict(model, hf_to_model(sd, cfg))
    ids, targets, images, counts = batch
    per_token = model(ids, images, targets)
    n = (targets != -100).sum()
    loss = per_token.sum() / n
    loss.backward()
    grads = gather_full_state_dict(model, cfg.llm.vocab_size, grads=True)
    return loss.item(), grads


def run_layout(name, hfc, cfg, sd, batch, base_loss, base_grads):
    plan = ParallelPlan(**LAYOUTS[name][0])
    tp, pp = plan.tensor_parallel, plan.pipeline_parallel
    initialize(tp, pp)
    chunks = build_model(cfg, plan)
    load_full_state_dict(unwrap(chunks[0]), hf_to_model(sd, cfg))
    res = {"logits": check_logits(chunks[0], hfc, cfg, sd)}
    ids, targets, images, counts = batch
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = list(range(4))[dp_rank * 4 // dp: (dp_rank + 1) * 4 // dp]
    mbs = 2 if pp > 1 else len(rows)
    micro = [rows_batch(ids, targets, images, counts, rows[i: i + mbs]) for i in range(0, len(rows), mbs)]
    for c in chunks:
        c.zero_grad_buffer()
    loss, ntok = forward_backward(chunks, micro, len(micro), ids.shape[1], mbs)
    grads = gather_pp(gather_full_state_dict(unwrap(chunks[0]), cfg.llm.vocab_size, grads=True))
    missing = sorted(set(base_grads) - set(grads))
    res["loss_diff"] = abs(loss - base_loss)
    res["missing_grads"] = missing
    res["grad_max_diff"] = max((grads[k] - base_grads[k]).abs().max().item() for k in base_grads if k in grads)
    res["grad_max_abs"] = max(g.abs().max().item() for g in base_grads.values())
    res["vision_grad_norm"] = grads["vision.conv1.weight"].norm().item() if "vision.conv1.weight" in grads else None
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results, baselines = {}, {}
    for name in args.layouts.split(","):
        overrides = LAYOUTS[name][1]
        hfc = R.tiny_hf_config(**overrides)
        cfg = QwenVLConfig.from_hf_config(hfc)
        sd = R.random_hf_state_dict(hfc, seed=0)
        batch = global_batch(cfg, torch.Generator().manual_seed(3))
        key = json.dumps(overrides, sort_keys=True)
        if key not in baselines:
            baselines[key] = baseline(hfc, cfg, sd, batch)
        base_loss, base_grads = baselines[key]
        results[name] = run_layout(name, hfc, cfg, sd, batch, base_loss, base_grads)
        results[name]["base_loss"] = base_loss
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
