"""Two-process torchrun worker for the trainer tests.

1. One update of the 16-sample global batch under DP2 x MBS2 x 4 (with and without the distributed
   optimizer, and with gradient reduction overlapped with the backward pass), TP2 (MBS16 x 1) and PP2 (MBS4 x 4), from the weights in --init: params_<case>.pt.
2. Exact resume: train.main for 4 iterations on a small indexed dataset, vs 2 iterations + exit + resume.
3. The uninterrupted run's checkpoint loaded under TP1/DP2, TP2 and PP2: the same loss on a fixed batch,
   and (optimizer resharded) the same weights after one more update.
Rank 0 writes multi.json and the .pt files into --out.
"""
import argparse
import io
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_common as T  # noqa: E402

from qwenvl_megatron.convert.sharding import gather_full_state_dict  # noqa: E402
from qwenvl_megatron.data.indexed import IndexedDatasetWriter  # noqa: E402
from qwenvl_megatron.models.parallel import ParallelPlan  # noqa: E402
from qwenvl_megatron.runtime import initialize  # noqa: E402
from qwenvl_megatron.training import checkpoint as ckpt  # noqa: E402
from qwenvl_megatron.training import train  # noqa: E402
from qwenvl_megatron.training.optimizer import OptimizerSettings, build_optimizer, build_scheduler  # noqa: E402
from qwenvl_megatron.training.step import build_model, forward_backward, unwrap  # noqa: E402


class _Sample:
    def __init__(self, tokens, labels, images):
        self.tokens, self.labels, self.images = tokens, labels, images


def write_dataset(prefix, cfg, n=40):
    """Random token samples, half with one image span and a real PNG; some longer than the sequence."""
    from PIL import Image
    rng = np.random.default_rng(0)
    q, s_id = cfg.adapter.num_queries, cfg.image_start_id
    with IndexedDatasetWriter(prefix) as w:
        for i in range(n):
            length = int(rng.integers(20, 70))
            tokens = rng.integers(0, s_id - 5, length)
            labels = tokens.copy()
            labels[:3] = -100
            blobs = []
            if i % 2 == 0:
                tokens[2], tokens[3:3 + q], tokens[3 + q] = s_id, s_id + 2, s_id + 1
                labels[: 4 + q] = -100
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
                blobs.append(buf.getvalue())
            w.add(_Sample(tokens, labels, ["img"] * len(blobs)), blobs)


def train_args(prefix, *extra):
    return ["--model", "tiny", "--data-path", prefix, "--seq-length", str(T.SEQ), "--image-size", "112",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4", "--lr", "1e-3",
            "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--stage", "2", "--vit-lr-decay", "0.9",
            "--log-interval", "1", "--seed", "7", "--image-backend", "pil", *extra]


def relayout(cfg, load_dir, tp, pp):
    """Full load under (tp, pp): loss on the fixed batch, then one update, then the gathered weights."""
    initialize(tp, pp, seed=9)
    from megatron.core import parallel_state as ps
    model = build_model(cfg, ParallelPlan(tensor_parallel=tp, pipeline_parallel=pp))
    settings = OptimizerSettings(lr=1e-3, min_lr=1e-4, vit_lr_decay=0.9)
    opt = build_optimizer(model, cfg, settings)
    sched = build_scheduler(opt, settings, 1, 4)
    info = ckpt.load_checkpoint(load_dir, model, opt, sched)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = T.microbatches(T.global_samples(cfg, seed=3), 4, rank, dp)
    loss, _ = forward_backward(model, batches, len(batches), T.SEQ, 4, forward_only=True)
    for c in model:
        c.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(model, batches, len(batches), T.SEQ, 4)
    opt.step()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, gather_full_state_dict(unwrap(model[0]), cfg.llm.vocab_size))
    full = {}
    for p in parts:
        full.update(p)
    return loss, info["iteration"], sched.num_steps, full


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", required=True)
    a = ap.parse_args()
    cfg = T.config()
    init = torch.load(a.init)
    result = {"steps": {}}
    for case, kw in (("dp2_mbs2x4", dict(mbs=2)), ("dp2_mbs2x4_distopt", dict(mbs=2, distributed_optimizer=True)),
                     ("dp2_mbs2x4_overlap", dict(mbs=2, distributed_optimizer=True, overlap=True)),
                     ("tp2_mbs16x1", dict(mbs=16, tp=2)), ("pp2_mbs4x4", dict(mbs=4, pp=2))):
        losses, norms, full = T.one_step(cfg, init, **kw)
        result["steps"][case] = {"losses": losses, "grad_norms": norms}
        if dist.get_rank() == 0:
            torch.save(full, os.path.join(a.out, f"params_{case}.pt"))

    prefix = os.path.join(a.out, "data", "train")
    if dist.get_rank() == 0:
        write_dataset(prefix, cfg)
    dist.barrier()
    full_dir, split_dir = os.path.join(a.out, "full"), os.path.join(a.out, "split")
    run = train.main(train_args(prefix, "--save", full_dir, "--save-interval", "100"))
    first = train.main(train_args(prefix, "--save", split_dir, "--exit-interval", "2"))
    second = train.main(train_args(prefix, "--save", split_dir, "--load", split_dir))
    result["resume"] = {"full": run["history"], "first": first["history"], "second": second["history"],
                        "consumed": [run["consumed_samples"], first["consumed_samples"], second["consumed_samples"]],
                        "markers": [ckpt.latest_iteration(full_dir), ckpt.latest_iteration(split_dir)]}
    relayouts = {}
    for name, (tp, pp) in (("dp2", (1, 1)), ("tp2", (2, 1)), ("pp2", (1, 2))):
        loss, it, steps, full = relayout(cfg, full_dir, tp, pp)
        relayouts[name] = {"loss": loss, "iteration": it, "scheduler_steps": steps}
        if dist.get_rank() == 0:
            torch.save(full, os.path.join(a.out, f"relayout_{name}.pt"))
    result["relayout"] = relayouts
    if dist.get_rank() == 0:
        with open(os.path.join(a.out, "multi.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    from qwenvl_megatron.runtime import device_discipline
    with device_discipline():  # host and device apart, as on a GPU machine (runtime/device_discipline.py)
        main()
