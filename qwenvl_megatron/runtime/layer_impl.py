"""Which layer implementation builds the model: Transformer Engine (fused kernels) or megatron-core local.

The one place that probes optional GPU packages. An installed-but-broken package (for example TE without
its CUDA libraries) counts as absent instead of crashing the import, hence `except Exception`.
"""
from __future__ import annotations

import functools
import importlib.util

import torch


@functools.lru_cache(None)
def have_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider  # noqa: F401
        return True
    except Exception:
        return False


@functools.lru_cache(None)
def have_apex() -> bool:
    try:
        import apex  # noqa: F401
        from apex.normalization import FusedLayerNorm  # noqa: F401  (PyPI's unrelated `apex` lacks this)
        return True
    except Exception:
        return False


@functools.lru_cache(None)
def have_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # noqa: BLE001 - a broken package counts as absent
        return False


@functools.lru_cache(None)
def available_fusions() -> frozenset:
    """The fused kernels Megatron-LM turns on by default, as far as this machine has them (none without
    CUDA). Names are megatron TransformerConfig fields (models.parallel.FUSIONS).

    - bias_activation_fusion (SwiGLU), bias_dropout_fusion: megatron's jit-fused functions, any GPU;
    - masked_softmax_fusion: apex's softmax kernels (only the local attention uses it);
    - apply_rope_fusion: Transformer Engine's fused RoPE;
    - gradient_accumulation_fusion: apex's fused_weight_gradient_mlp_cuda (megatron's own linear layers,
      e.g. the LM head, refuse the flag without it, even under TE);
    - persist_layer_norm: apex's persistent LayerNorm.
    """
    if not torch.cuda.is_available():
        return frozenset()
    names = {"bias_activation_fusion", "bias_dropout_fusion"}
    if _has_module("scaled_upper_triang_masked_softmax_cuda") and _has_module("scaled_masked_softmax_cuda"):
        names.add("masked_softmax_fusion")
    if have_transformer_engine():
        names.add("apply_rope_fusion")
    if _has_module("fused_weight_gradient_mlp_cuda"):
        names.add("gradient_accumulation_fusion")
    if have_apex():
        names.add("persist_layer_norm")
    return frozenset(names)


def resolve_impl(impl: str = "auto") -> str:
    """'auto' -> 'te' when TE and CUDA are usable, else 'local'. Asking for 'te' without it is an error."""
    if impl not in ("auto", "te", "local"):
        raise ValueError(f"--transformer-impl must be auto, te or local, got {impl!r}")
    if impl == "auto":
        return "te" if have_transformer_engine() else "local"
    if impl == "te" and not have_transformer_engine():
        raise RuntimeError("--transformer-impl te needs Transformer Engine and a CUDA device; use local")
    return impl


def backend_provider(impl: str):
    """The megatron-core BackendSpecProvider for an implementation name ('te' or 'local')."""
    if impl == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider
    return LocalSpecProvider()
