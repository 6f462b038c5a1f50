"""Which layer implementation builds the model: Transformer Engine (fused kernels) or megatron-core local.

The one place that probes optional GPU packages. An installed-but-broken package (for example TE without
its CUDA libraries) counts as absent instead of crashing the import, hence `except Exception`.

It also speaks for megatron-core about them: megatron warns at import, once per module, that Transformer
Engine and apex are missing (five UserWarnings on a CPU machine). `quiet_megatron_fallback_warnings()`
(installed by the package's `__init__`, before anything imports megatron) drops those, and
`note_fallbacks()` (called by `runtime.initialize`) says it once per process, on rank 0, in one line.

Imports nothing heavy at module level (torch is imported inside the probes): the tools' argument parsing
reaches this module through the package `__init__`.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings

# megatron-core's import-time UserWarnings about missing optional packages (fsdp mixed_precision,
# optimizer/__init__, optimizer/optimizer, clip_grads; models/backends and the layer specs for apex).
MEGATRON_FALLBACK_WARNINGS = (r"Transformer Engine and Apex are not installed",
                              r"Apex is not installed\. Falling back to Torch Norm")
FALLBACK_NOTE = ("note: Transformer Engine and apex are not installed: megatron-core uses its PyTorch fallbacks "
                 "(fine on CPU; on GPUs install the gpu extras: pip install -e .[gpu])")
_noted = False


def quiet_megatron_fallback_warnings() -> None:
    """Ignore megatron-core's warnings about absent Transformer Engine / apex (`note_fallbacks` says it once)."""
    for message in MEGATRON_FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"megatron\.")


def skip_tp_group_warning() -> None:
    """megatron-core 0.16's RowParallelLinear passes `tp_group=None` to its own linear function, which then
    issues a DeprecationWarning (hidden by the default filters) on every call: ~20-30 us of warning
    machinery per layer call, a few percent of a small model's step and of each decoded token. Answers a
    missing group with the default one, as megatron does, without the warning."""
    import megatron.core.utils as mutils
    import torch
    from megatron.core import parallel_state

    original = mutils.get_tensor_model_parallel_group_if_none
    if getattr(original, "__qvl_quiet__", False):
        return

    def tp_group_or_default(tp_group, is_expert=False, check_initialized=True):
        if tp_group is None and torch.distributed.is_initialized() and parallel_state.is_initialized():
            get = (parallel_state.get_expert_tensor_parallel_group if is_expert
                   else parallel_state.get_tensor_model_parallel_group)
            return get(check_initialized=check_initialized)
        return original(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    tp_group_or_default.__qvl_quiet__ = True
    for name, module in list(sys.modules.items()):  # every megatron module that imported it by name (and
        # megatron.core.utils itself, for those imported later)
        if name.startswith("megatron.core") and getattr(module, "get_tensor_model_parallel_group_if_none",
                                                        None) is original:
            module.get_tensor_model_parallel_group_if_none = tp_group_or_default


def note_fallbacks(rank: int | None = None, file=None) -> bool:
    """Print FALLBACK_NOTE once per process, on rank 0, when megatron-core is imported and neither Transformer
    Engine nor apex is. Returns True when it printed."""
    global _noted
    if _noted or "megatron.core" not in sys.modules:
        return False
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank != 0 or have_transformer_engine_package() or have_apex():
        return False
    _noted = True
    print(FALLBACK_NOTE, file=file or sys.stderr, flush=True)
    return True


@functools.lru_cache(None)
def have_transformer_engine_package() -> bool:
    """Transformer Engine imports (whether or not there is a GPU to run it): megatron uses its optimizers."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:
        return False


@functools.lru_cache(None)
def have_transformer_engine() -> bool:
    import torch

    if not torch.cuda.is_available() or not have_transformer_engine_package():
        return False
    try:
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
    import torch

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
