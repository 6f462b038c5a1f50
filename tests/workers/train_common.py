"""Shared by the train_* workers: a fixed random global batch (text + image spans, real pixels through
the ViT, varying supervised-token counts) and its split into (DP rank, microbatch) pieces."""
import torch

from qwenvl_megatron.models.config import tiny

SEQ = 48
GBS = 16


def config():
    return tiny()


def global_samples(cfg, seed=0, n=GBS, seq=SEQ):
    """n samples: input_ids [seq], targets [seq] (some -100), images [k, 3, S, S] with k in {0, 1, 2}."""
    with torch.device("cpu"):  # host data, as the loader's threads make it
        return _global_samples(cfg, seed, n, seq)


def _global_samples(cfg, seed, n, seq):
    g = torch.Generator().manual_seed(seed)
    q, s_id, size = cfg.adapter.num_queries, cfg.image_start_id, cfg.vit.image_size
    out = []
    for i in range(n):
        k = (0, 1, 1, 2)[i % 4]
        ids = torch.randint(0, s_id - 5, (seq,), generator=g)
        tgt = torch.randint(0, s_id - 5, (seq,), generator=g)
        pos = 1
        for _ in range(k):
            ids[pos], ids[pos + 1: pos + 1 + q], ids[pos + 1 + q] = s_id, s_id + 2, s_id + 1
            tgt[pos: pos + q + 1] = -100
            pos += q + 3
        tgt[: 1 + i % 5] = -100  # different supervised counts per sample
        out.append({"input_ids": ids, "targets": tgt, "images": torch.randn(k, 3, size, size, generator=g)})
    return out


def microbatches(samples, mbs, dp_rank, dp):
    """This DP rank's microbatches: global micro step k covers samples [k*mbs*dp, (k+1)*mbs*dp)."""
    out = []
    for start in range(0, len(samples), mbs * dp):
        part = samples[start + dp_rank * mbs: start + (dp_rank + 1) * mbs]
        images = torch.cat([s["images"] for s in part])
        out.append({"input_ids": torch.stack([s["input_ids"] for s in part]),
                    "targets": torch.stack([s["targets"] for s in part]),
                    "images": images if images.shape[0] else None})
    return out


def one_step(cfg, init_full, mbs, tp=1, pp=1, distributed_optimizer=False, steps=1, lr=1e-3, overlap=False):
    """`steps` optimizer updates on the fixed global batch from the `init_full` weights under a layout.
    Returns (losses, grad norms, full parameters after the updates) on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from qwenvl_megatron.convert.sharding import gather_full_state_dict, load_full_state_dict
    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.runtime import initialize
    from qwenvl_megatron.training.optimizer import OptimizerSettings, build_optimizer, build_scheduler
    from qwenvl_megatron.training.step import build_model, forward_backward, unwrap

    initialize(tp, pp, seed=5)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    model = build_model(cfg, ParallelPlan(tensor_parallel=tp, pipeline_parallel=pp),
                        use_distributed_optimizer=distributed_optimizer, overlap_grad_reduce=overlap)
    load_full_state_dict(unwrap(model[0]), init_full)
    settings = OptimizerSettings(lr=lr, min_lr=lr / 10, weight_decay=0.05, clip_grad=1.0, vit_lr_decay=0.9,
                                 use_distributed_optimizer=distributed_optimizer)
    opt = build_optimizer(model, cfg, settings)
    sched = build_scheduler(opt, settings, 0, 10)
    batches = microbatches(global_samples(cfg), mbs, dp_rank, dp)
    losses, norms = [], []
    for _ in range(steps):
        for c in model:
            c.zero_grad_buffer()
        opt.zero_grad()
        loss, _ = forward_backward(model, batches, len(batches), SEQ, mbs)
        ok, norm, _ = opt.step()
        assert ok
        sched.step(1)
        losses.append(loss)
        norms.append(float(norm))
    stage = gather_full_state_dict(unwrap(model[0]), cfg.llm.vocab_size)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, stage)
    full = {}
    for p in parts:
        full.update(p)
    return losses, norms, full
