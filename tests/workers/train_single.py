"""One-process worker for the trainer tests (run as a plain subprocess: world size 1).

Writes into --out: init.pt (the shared initial weights), params_<case>.pt after one update of the
16-sample global batch (MBS16x1 and MBS4x4), and single.json with the freezing, parameter-group,
scheduler and parameter-count checks.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_common as T  # noqa: E402

from qwenvl_megatron.convert.sharding import gather_full_state_dict  # noqa: E402
from qwenvl_megatron.models.parallel import ParallelPlan  # noqa: E402
from qwenvl_megatron.runtime import initialize  # noqa: E402
from qwenvl_megatron.training.layout import part_parameters  # noqa: E402
from qwenvl_megatron.training.optimizer import (OptimizerSettings, build_optimizer, build_scheduler,  # noqa: E402
                                                canonical_name, freeze)
from qwenvl_megatron.training.step import build_model, forward_backward, unwrap  # noqa: E402

STAGE_FREEZE = {"1": ("llm",), "2": (), "3": ("vit",)}


def freezing_checks(cfg):
    """Per stage: grad buffers, optimizer state and values of frozen vs trainable parameters."""
    out = {}
    for stage, parts in STAGE_FREEZE.items():
        initialize(1, 1, seed=3)
        model = build_model(cfg, ParallelPlan(), freeze=lambda m: freeze(m, parts))
        ddp, inner = model[0], unwrap(model[0])
        names = {id(p): n for n, p in inner.named_parameters()}
        frozen = sorted(n for n, p in inner.named_parameters() if not p.requires_grad)
        in_buffers = sorted(names[id(p)] for buf in ddp.buffers for p in buf.params)
        settings = OptimizerSettings(lr=1e-2, min_lr=1e-3)
        opt = build_optimizer(model, cfg, settings)
        sched = build_scheduler(opt, settings, 0, 10)
        before = {n: p.detach().clone() for n, p in inner.named_parameters()}
        batches = T.microbatches(T.global_samples(cfg, seed=1, n=4), 2, 0, 1)
        for _ in range(2):
            for c in model:
                c.zero_grad_buffer()
            opt.zero_grad()
            forward_backward(model, batches, len(batches), T.SEQ, 2)
            opt.step()
            sched.step(1)
        in_groups = sorted(names[id(p)] for g in opt.param_groups for p in g["params"])
        with_state = sorted(names[id(p)] for p in opt.optimizer.state)
        out[stage] = {
            "frozen": frozen, "trainable": sorted(n for n in before if n not in frozen),
            "trainable_numel": sum(p.numel() for p in inner.parameters() if p.requires_grad),
            "in_grad_buffers": in_buffers, "in_param_groups": in_groups, "with_optimizer_state": with_state,
            "unchanged": sorted(n for n, p in inner.named_parameters() if torch.equal(p, before[n])),
            "main_grad_of_frozen": sorted(n for n, p in inner.named_parameters()
                                          if not p.requires_grad and getattr(p, "main_grad", None) is not None),
        }
    return out


def group_checks(cfg):
    """Per parameter: the (lr_mult, wd_mult, max_lr, min_lr) of its optimizer group, and each group's LR
    over a warmup + cosine schedule."""
    initialize(1, 1, seed=3)
    model = build_model(cfg, ParallelPlan())
    inner = unwrap(model[0])
    names = {id(p): n for n, p in inner.named_parameters()}
    settings = OptimizerSettings(lr=1e-3, min_lr=1e-5, weight_decay=0.05, vit_lr_decay=0.9)
    opt = build_optimizer(model, cfg, settings)
    sched = build_scheduler(opt, settings, warmup_iters=3, train_iters=10)
    groups = {}
    for g in opt.param_groups:
        for p in g["params"]:
            groups[names[id(p)]] = [g["lr_mult"], g["wd_mult"], g["max_lr"], g["min_lr"]]
    lrs = []  # per step: [(lr_mult, lr, weight_decay)] of every non-empty group
    for step in range(12):
        lrs.append([(g["lr_mult"], g["lr"], g["weight_decay"]) for g in opt.param_groups if g["params"]])
        sched.step(1)
    numel = sum(p.numel() for p in inner.parameters())
    counts = part_parameters(cfg)
    return {"groups": groups, "lrs": lrs, "numel": numel,
            "counted": counts["vit"] + counts["adapter"] + cfg.llm.num_layers * counts["llm_layer"]
            + counts["embedding"] + counts["head"] + counts["final_norm"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = T.config()
    initialize(1, 1, seed=11)
    init_model = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    init = gather_full_state_dict(unwrap(init_model[0]), cfg.llm.vocab_size)
    torch.save(init, os.path.join(a.out, "init.pt"))
    result = {"steps": {}}
    for case, mbs in (("mbs16x1", 16), ("mbs4x4", 4)):
        losses, norms, full = T.one_step(cfg, init, mbs)
        torch.save(full, os.path.join(a.out, f"params_{case}.pt"))
        result["steps"][case] = {"losses": losses, "grad_norms": norms}
    result["freezing"] = freezing_checks(cfg)
    result.update(group_checks(cfg))
    with open(os.path.join(a.out, "single.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    from qwenvl_megatron.runtime import device_discipline
    with device_discipline():  # host and device apart, as on a GPU machine (runtime/device_discipline.py)
        main()
