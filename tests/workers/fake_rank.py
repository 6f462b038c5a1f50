"""One CPU process as one rank of a large job (torch's fake process group: real groups and shapes, no
peers, no values), for placement checks of models of any size. Prints one JSON line.

    python fake_rank.py placement --world 32 --tp 8 --pp 4 --rank 31 --model qwen-vl-7b --freeze vit
    python fake_rank.py sequence-parallel --world 2 --tp 2
"""
import argparse
import json

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore


def init(world, rank, tp, pp):
    from megatron.core import parallel_state

    from qwenvl_megatron.runtime import enable_cpu_compat
    enable_cpu_compat()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    # megatron's extra gloo groups cannot sit on a FakeStore
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             create_gloo_process_groups=False)


def placement(a):
    """Build this rank's stage through the trainer's own builder (DDP included) with `meta` standing in
    for the GPU: list every tensor left anywhere else."""
    from qwenvl_megatron.models.config import get_preset
    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.runtime import device_discipline, misplaced_tensors
    from qwenvl_megatron.training.optimizer import freeze
    from qwenvl_megatron.training.step import build_model, unwrap

    cfg = get_preset(a.model)
    parts = tuple(p for p in a.freeze.split(",") if p)
    with device_discipline("meta") as dev:
        try:
            model = build_model(cfg, ParallelPlan(tensor_parallel=a.tp, pipeline_parallel=a.pp),
                                freeze=lambda m: freeze(m, parts), use_distributed_optimizer=a.distopt)
        except RuntimeError as e:  # build_model's own placement check
            return {"error": str(e)}
        inner = unwrap(model[0])  # (megatron's optimizer needs gloo groups, which a FakeStore cannot hold)
        return {"misplaced": misplaced_tensors(model[0], dev),
                "grad_buffers": [str(b.grad_data.device) for b in model[0].buffers],
                "params": sum(p.numel() for p in inner.parameters()),
                "has_vision": hasattr(inner, "vision"), "has_head": hasattr(inner.language, "output_layer")}


def sequence_parallel(a):
    """The ViT and the adapter under a TP + sequence-parallel plan (local layers, which refuse SP)."""
    from qwenvl_megatron.models.adapter import VisionLanguageAdapter
    from qwenvl_megatron.models.config import get_preset
    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.models.specs import adapter_spec, transformer_layer_spec
    from qwenvl_megatron.models.vision import VisionTransformer
    from qwenvl_megatron.runtime import backend_provider

    cfg = get_preset(a.model)
    plan = ParallelPlan(tensor_parallel=a.tp, sequence_parallel=True, impl="te")
    local = backend_provider("local")
    out = {"llm_sp": plan.llm_config(cfg).sequence_parallel}
    try:
        with torch.device("meta"):
            vit = VisionTransformer(cfg.vit, plan.vit_config(cfg),
                                    transformer_layer_spec(local, rms_norm=False, causal=False),
                                    local.layer_norm(rms_norm=False, for_qk=False))
            adapter = VisionLanguageAdapter(cfg.adapter, cfg.vit.width, plan.adapter_config(cfg), adapter_spec(local))
    except Exception as e:  # noqa: BLE001 - reported to the test
        return dict(out, error=f"{type(e).__name__}: {e}")
    marked = [n for m, prefix in ((vit, "vision"), (adapter, "adapter")) for n, p in m.named_parameters(prefix)
              if getattr(p, "sequence_parallel", False)]
    return dict(out, sp_marked=marked)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("check", choices=["placement", "sequence-parallel"])
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--freeze", default="")
    ap.add_argument("--distopt", action="store_true")
    a = ap.parse_args()
    init(a.world, a.rank, a.tp, a.pp)
    result = placement(a) if a.check == "placement" else sequence_parallel(a)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
