"""AdamW on megatron-core with the paper's parameter groups, its LR schedule, and per-part freezing.

- Weight decay on weight matrices only: not on biases and norms (1-D), nor on the learned position table
  and the adapter's queries (they are embeddings of positions/slots, not projections).
- ViT layer-wise LR decay: the deepest ViT layer gets the full LR and each shallower one x decay;
  `ln_pre` sits below layer 0 (decay^L), the patch embedding and position table lowest (decay^(L+1)).
  The adapter and the LLM get the full LR.
- Each group carries its own `max_lr`/`min_lr` (= multiplier x the global ones), which is what megatron's
  `OptimizerParamScheduler` reads, so warmup and cosine decay keep every group's ratio.
- Frozen parts get `requires_grad=False` before DDP wraps the model: no gradient buffer, no optimizer
  state, and their values never change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..models.config import QwenVLConfig
from ..models.parallel import PARTS

_VIT_LAYER = re.compile(r"^vision\.decoder\.layers\.(\d+)\.")
_NO_WD_NAMES = ("vision.positional_embedding", "adapter.query")


def canonical_name(name: str) -> str:
    """Parameter name without wrapper prefixes (DDP's `module.`), as in QwenVLModel.named_parameters()."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def part_of(name: str) -> str:
    """Which part of the model a parameter belongs to: 'vit', 'adapter' or 'llm'.

    `ln_post`/`proj` run after the resampler in our adapter module, but the HF release keeps them in
    `transformer.visual` outside `attn_pool`, and its `fix_vit` (stage 3) freezes them with the ViT: they
    count as 'vit' here, so `--freeze vit` freezes what the official recipe freezes.
    """
    name = canonical_name(name)
    if name.startswith(("vision.", "adapter.ln_post.")) or name == "adapter.proj":
        return "vit"
    if name.startswith("adapter."):
        return "adapter"
    if name.startswith("language."):
        return "llm"
    raise ValueError(f"parameter {name!r} belongs to no known part of the model")


def lr_multiplier(name: str, vit_layers: int, vit_lr_decay: float) -> float:
    """Layer-wise LR decay factor of one parameter (1.0 outside the ViT or with decay 1)."""
    name = canonical_name(name)
    if not name.startswith("vision.") or vit_lr_decay == 1.0:
        return 1.0
    m = _VIT_LAYER.match(name)
    if m:
        depth = vit_layers - 1 - int(m.group(1))  # 0 for the deepest layer
    elif name.startswith("vision.ln_pre."):
        depth = vit_layers
    elif name.startswith(("vision.conv1.", "vision.positional_embedding")):
        depth = vit_layers + 1
    else:
        raise ValueError(f"no layer-wise LR rule for ViT parameter {name!r}")
    return vit_lr_decay ** depth


def wd_multiplier(name: str, param: torch.Tensor) -> float:
    name = canonical_name(name)
    if param.dim() < 2 or name.endswith(".bias") or name in _NO_WD_NAMES:
        return 0.0
    return 1.0


def group_multipliers(model_chunks: list, vit_layers: int, vit_lr_decay: float) -> dict[str, tuple[float, float]]:
    """{canonical name: (lr_mult, wd_mult)} for every trainable parameter of this rank."""
    out = {}
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if p.requires_grad:
                out[canonical_name(name)] = (lr_multiplier(name, vit_layers, vit_lr_decay), wd_multiplier(name, p))
    return out


@dataclass
class OptimizerSettings:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    clip_grad: float = 1.0
    vit_lr_decay: float = 0.95
    bf16: bool = False
    use_distributed_optimizer: bool = False


def _overrides(model_chunks: list, settings: OptimizerSettings, vit_layers: int) -> dict:
    """One megatron ParamKey per distinct (lr_mult, wd_mult): a name predicate selects its parameters."""
    combos = set(group_multipliers(model_chunks, vit_layers, settings.vit_lr_decay).values())
    overrides = {}
    for lr_mult, wd_mult in sorted(combos):
        def match(param, name, _lr=lr_mult, _wd=wd_mult):
            return (lr_multiplier(name, vit_layers, settings.vit_lr_decay) == _lr
                    and wd_multiplier(name, param) == _wd)
        key = ParamKey(with_name_predicate=ParamWithNamePredicate(name=f"lr{lr_mult!r}_wd{wd_mult!r}", fn=match))
        overrides[key] = {"lr_mult": lr_mult, "wd_mult": wd_mult,
                          "max_lr": settings.lr * lr_mult, "min_lr": settings.min_lr * lr_mult}
    return overrides


def build_optimizer(model_chunks: list, cfg: QwenVLConfig, settings: OptimizerSettings):
    """megatron's optimizer (distributed or not) over the trainable parameters, grouped as above."""
    config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, bf16=settings.bf16, params_dtype=torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer)
    return get_megatron_optimizer(config, model_chunks, config_overrides=_overrides(model_chunks, settings, cfg.vit.num_layers))


def build_scheduler(optimizer, settings: OptimizerSettings, warmup_iters: int, train_iters: int,
                    decay_style: str = "cosine") -> OptimizerParamScheduler:
    """Linear warmup from 0 to each group's max LR, then cosine to its min LR at `train_iters`."""
    if warmup_iters >= train_iters:
        raise ValueError(f"--lr-warmup-iters {warmup_iters} must be smaller than --train-iters {train_iters}")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=settings.lr, min_lr=settings.min_lr, lr_warmup_steps=warmup_iters,
        lr_decay_steps=train_iters, lr_decay_style=decay_style, start_wd=settings.weight_decay,
        end_wd=settings.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def freeze(model, parts) -> list[str]:
    """`requires_grad=False` on every parameter of the named parts ('vit' with ln_post/proj, 'adapter',
    'llm' with its embedding and head; see `part_of`). Call before DDP wraps the model. Returns the frozen
    names."""
    parts = tuple(parts or ())
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"--freeze parts must be among {PARTS}, got {sorted(unknown)}")
    frozen = []
    for name, p in model.named_parameters():
        if part_of(name) in parts:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


__all__ = ["OptimizerSettings", "build_optimizer", "build_scheduler", "freeze", "group_multipliers",
           "lr_multiplier", "wd_multiplier", "part_of", "canonical_name"]
