"""Which layer implementation builds the model: Transformer Engine (fused kernels) or megatron-core local.

The one place that probes optional GPU packages. An installed-but-broken package (for example TE without
its CUDA libraries) counts as absent instead of crashing the import, hence `except Exception`.
"""
from __future__ import annotations

import functools

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
