"""Two-process torchrun worker for tests/test_packing.py, whole under device_discipline.

1. Per-sample packed attention: the per-token losses of packed rows (real loader, real indexed dataset with
   image spans) against the same samples unpacked, one padded row each, in fp32, under TP1 (each process
   alone), TP2 and PP2; the global-batch loss (mean over supervised tokens) of both; and the same packed
   rows under causal packed attention as a control (a later sample then sees the ones before it).
2. Exact resume of a packed trainer run (DP2): 4 iterations vs 2 + exit + resume.
Rank 0 writes packing.json into --out.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_common as T  # noqa: E402
from train_multi import train_args, write_dataset  # noqa: E402

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from qwenvl_megatron.convert.sharding import gather_full_state_dict, load_full_state_dict  # noqa: E402
from qwenvl_megatron.data.images import ImageTransform  # noqa: E402
from qwenvl_megatron.data.loader import MicroBatchLoader  # noqa: E402
from qwenvl_megatron.models.parallel import ParallelPlan  # noqa: E402
from qwenvl_megatron.runtime import device as runtime_device, initialize  # noqa: E402
from qwenvl_megatron.training import checkpoint as ckpt  # noqa: E402
from qwenvl_megatron.training import train  # noqa: E402
from qwenvl_megatron.training.step import build_model, forward_backward, unwrap  # noqa: E402

SEQ, ROWS = 128, 4


def loader(prefix, cfg, attention="per-sample"):
    return MicroBatchLoader([prefix], 2, SEQ, ImageTransform(cfg.vit.image_size, backend="pil"), 0,
                            cfg.image_start_id, cfg.adapter.num_queries, seed=7, tensor_parallel_size=1,
                            pack_sequences=True, packed_attention=attention)


def per_token_losses(model, batch):
    """Per-token loss [b, s] of one microbatch through megatron's forward-only schedule (any TP/PP)."""
    dev = runtime_device()
    batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def fwd(it, m):
        b = next(it)
        out = m(b["input_ids"], b["images"], b["targets"], position_ids=b.get("position_ids"))
        return out, lambda o: (o.sum() * 0, {"loss": o.detach()})

    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=fwd, data_iterator=iter([batch]), model=model, num_microbatches=1,
            seq_length=SEQ, micro_batch_size=batch["input_ids"].shape[0], forward_only=True)
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    mine = outs[0]["loss"].to("cpu") if ps.is_pipeline_last_stage() else None
    dist.all_gather_object(parts, mine, group=ps.get_pipeline_model_parallel_group())
    return next(p for p in parts if p is not None)


def equivalence(prefix, cfg, init, tp, pp):
    initialize(tp, pp, seed=5)
    model = build_model(cfg, ParallelPlan(tensor_parallel=tp, pipeline_parallel=pp), wrap_ddp=False)
    load_full_state_dict(unwrap(model[0]), init)
    model[0].eval()
    per_sample, causal = loader(prefix, cfg), loader(prefix, cfg, "causal")
    packed = per_sample.packer(ROWS).pack(0)
    rows = per_sample.packed_rows(packed, range(ROWS))
    samples = [(s.dataset, s.sample) for row in packed.rows for s in row]
    unpacked = per_sample.samples_batch(samples)
    got = per_token_losses(model, rows)
    got_causal = per_token_losses(model, causal.packed_rows(packed, range(ROWS)))
    want = per_token_losses(model, unpacked)
    diff, causal_first, causal_later, k = 0.0, 0.0, 0.0, 0
    for r, row in enumerate(rows["samples"]):
        for j, (_, _, at, n) in enumerate(row):
            diff = max(diff, (got[r, at: at + n] - want[k, :n]).abs().max().item())
            c = (got_causal[r, at: at + n] - want[k, :n]).abs().max().item()
            causal_first, causal_later = (max(causal_first, c), causal_later) if j == 0 else (causal_first, max(causal_later, c))
            k += 1
    # The loss of a global batch is the mean over its supervised tokens however it is packed.
    model[0].train()
    loss_packed, n_packed = forward_backward(model, [rows], 1, SEQ, ROWS, forward_only=True)
    loss_unpacked, n_unpacked = forward_backward(model, [unpacked], 1, SEQ, len(samples), forward_only=True)
    return {"max_diff": diff, "causal_first_diff": causal_first, "causal_later_diff": causal_later,
            "samples": len(samples), "samples_per_row": [len(r) for r in packed.rows],
            "supervised": int((want != 0).sum()), "loss_packed": loss_packed, "loss_unpacked": loss_unpacked,
            "tokens": [n_packed, n_unpacked], "images": int(rows["images"].shape[0]) if rows["images"] is not None else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = T.config()
    prefix = os.path.join(a.out, "data", "train")
    initialize(1, 1, seed=11)
    if dist.get_rank() == 0:
        write_dataset(prefix, cfg)
    dist.barrier()
    init = gather_full_state_dict(unwrap(build_model(cfg, ParallelPlan(), wrap_ddp=False)[0]), cfg.llm.vocab_size)
    result = {"equivalence": {}}
    for name, (tp, pp) in (("tp1", (1, 1)), ("tp2", (2, 1)), ("pp2", (1, 2))):
        result["equivalence"][name] = equivalence(prefix, cfg, init, tp, pp)

    packed = ("--seq-length", str(SEQ), "--pack-sequences", "--packed-attention", "per-sample")
    full_dir, split_dir = os.path.join(a.out, "full"), os.path.join(a.out, "split")
    run = train.main(train_args(prefix, *packed, "--save", full_dir, "--save-interval", "100"))
    first = train.main(train_args(prefix, *packed, "--save", split_dir, "--exit-interval", "2"))
    second = train.main(train_args(prefix, *packed, "--save", split_dir, "--load", split_dir))
    result["resume"] = {"full": run["history"], "first": first["history"], "second": second["history"],
                        "consumed": [run["consumed_samples"], first["consumed_samples"], second["consumed_samples"]],
                        "markers": [ckpt.latest_iteration(full_dir), ckpt.latest_iteration(split_dir)]}
    if dist.get_rank() == 0:
        with open(os.path.join(a.out, "packing.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    from qwenvl_megatron.runtime import device_discipline
    with device_discipline():  # host and device apart, as on a GPU machine (runtime/device_discipline.py)
        main()
