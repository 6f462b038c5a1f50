"""Process groups, devices, the CPU compatibility layer and the choice of layer implementation.

The names below load on first use (PEP 562): importing this package, or `runtime.layer_impl` (which the
package `__init__` does to quiet megatron's import-time warnings), does not import torch, so the tools'
`--help` stays fast.
"""
import importlib
import sys
import types

_WHERE = {"enable_cpu_compat": "cpu_compat",
          "HostTensorError": "device_discipline", "device_discipline": "device_discipline",
          "misplaced_tensors": "device_discipline",
          "device": "distributed", "initialize": "distributed",
          "backend_provider": "layer_impl", "have_apex": "layer_impl", "have_dali": "layer_impl",
          "have_transformer_engine": "layer_impl", "resolve_impl": "layer_impl", "note_fallbacks": "layer_impl"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE[name]}", __name__)
    for exported, where in _WHERE.items():  # every name of that submodule at once
        if where == _WHERE[name]:
            globals()[exported] = getattr(module, exported)
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


class _Package(types.ModuleType):
    """Importing a submodule binds its name on the package; `device_discipline` names a function here (as it
    did when this file imported everything eagerly), so the submodule must not replace it."""

    def __setattr__(self, name, value):
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
