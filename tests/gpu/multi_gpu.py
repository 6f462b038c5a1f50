"""torchrun --nproc_per_node 2 tests/gpu/multi_gpu.py --out F   (tests/gpu/checks.py, check multi_gpu)

TP2 and PP2 logits against TP1 (forward-only through megatron's schedule; NCCL on GPUs, gloo in the CPU
smoke run), and the gradients of one step of TP2 with sequence parallelism against TP2 without (needs
Transformer Engine; without it the same comparison runs with SP off on both sides, so that the code runs,
and says so). Weights and batch are those of tests/workers/model_parallel.py: the tiny reference config,
random HF weights, 4 samples with 0-2 images. Rank 0 writes the numbers to --out.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "workers"))
import model_parallel as MP  # noqa: E402

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from qwenvl_megatron.convert.hf_layout import hf_to_model  # noqa: E402
from qwenvl_megatron.convert.sharding import gather_full_state_dict, load_full_state_dict  # noqa: E402
from qwenvl_megatron.models.config import QwenVLConfig  # noqa: E402
from qwenvl_megatron.models.parallel import ParallelPlan  # noqa: E402
from qwenvl_megatron.runtime import have_transformer_engine, initialize, resolve_impl  # noqa: E402
from qwenvl_megatron.training.step import build_model, forward_backward, unwrap  # noqa: E402


def build(plan, cfg, sd, ddp):
    dev = initialize(plan.tensor_parallel, plan.pipeline_parallel)
    chunks = build_model(cfg, plan, wrap_ddp=ddp)
    load_full_state_dict(unwrap(chunks[0]), hf_to_model(sd, cfg))
    return chunks, dev


def on(batch, dev):
    return {k: v.to(dev) if v is not None else None for k, v in batch.items()}


def logits(plan, cfg, sd, batch):
    """The full logits of the batch, on every rank (the last pipeline stage's, shared over the pipeline)."""
    chunks, dev = build(plan, cfg, sd, ddp=False)
    b = on(batch, dev)

    def step(it, model):
        mb = next(it)
        return model(mb["input_ids"], mb["images"], None), lambda o: (o.sum() * 0, {"logits": o.detach()})

    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([b]), model=chunks, num_microbatches=1,
            seq_length=b["input_ids"].shape[1], micro_batch_size=b["input_ids"].shape[0], forward_only=True)
    mine = {"logits": outs[0]["logits"].float().cpu()} if ps.is_pipeline_last_stage() else {}
    return MP.gather_pp(mine)["logits"]


def tp2_grads(sequence_parallel, impl, cfg, sd, batch):
    """Loss and full gradients of one forward/backward of the batch under TP2."""
    plan = ParallelPlan(tensor_parallel=2, sequence_parallel=sequence_parallel, impl=impl)
    chunks, dev = build(plan, cfg, sd, ddp=True)
    b = on(batch, dev)
    for c in chunks:
        c.zero_grad_buffer()
    loss, _ = forward_backward(chunks, [b], 1, b["input_ids"].shape[1], b["input_ids"].shape[0])
    return loss, {k: v.float().cpu() for k, v in gather_full_state_dict(unwrap(chunks[0]), cfg.llm.vocab_size, grads=True).items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hfc = MP.R.tiny_hf_config()
    cfg, sd = QwenVLConfig.from_hf_config(hfc), MP.R.random_hf_state_dict(hfc, seed=0)
    ids, targets, images, counts = MP.global_batch(cfg, torch.Generator().manual_seed(3))
    batch = MP.rows_batch(ids, targets, images, counts, [0, 1, 2, 3])
    impl = resolve_impl("auto")
    ref = logits(ParallelPlan(impl=impl), cfg, sd, batch)
    res = {"impl": impl, "world": dist.get_world_size(), "backend": dist.get_backend(),
           "max_abs_logit": ref.abs().max().item()}
    for name, plan in (("tp2", ParallelPlan(tensor_parallel=2, impl=impl)),
                       ("pp2", ParallelPlan(pipeline_parallel=2, impl=impl))):
        res[f"{name}_logits_max_diff"] = (logits(plan, cfg, sd, batch) - ref).abs().max().item()
    te = have_transformer_engine()
    (loss0, g0), (loss1, g1) = (tp2_grads(sp, impl, cfg, sd, batch) for sp in (False, te))
    res["sp"] = "te" if te else "stand-in: no Transformer Engine, SP off on both sides"
    res["sp_loss_diff"] = abs(loss1 - loss0)
    res["sp_missing_grads"] = sorted(set(g0) ^ set(g1))
    res["sp_grad_max_diff"] = max((g1[k] - g0[k]).abs().max().item() for k in g0 if k in g1)
    res["sp_grad_max_abs"] = max(g.abs().max().item() for g in g0.values())
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
