"""Device discipline: a CPU machine that keeps host and accelerator memory apart, as a GPU machine does.

On a GPU machine a tensor created without a device lives in host memory, and CUDA kernels, NCCL and
Transformer Engine refuse it next to device tensors. On a CPU machine the two are the same memory, so
such a fault hides until the first cluster run. Inside `device_discipline()` they are two devices again:

- `accelerator="cpu"` (numerics): requests for CUDA get the CPU and compute for real; a tensor created
  without saying where lands on `meta`, which holds no data, so using it beside accelerator tensors, in
  a collective or with `.item()` fails as a host tensor would on a GPU.
- `accelerator="meta"` (placement, any model size): requests for CUDA get `meta`, unplaced tensors the
  CPU; `misplaced_tensors(module, "meta")` then lists what a GPU run would leave in host memory.

In both, collectives refuse host tensors (NCCL does). The default device is thread-local, so the data
loader's threads still make host tensors, as they do on a GPU machine.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from . import cpu_compat

# torch.distributed calls whose tensor arguments NCCL needs on the device. Not isend/irecv: P2POp checks
# their identity; megatron's pipeline sends go through batch_isend_irecv (batch_p2p_comm, its default).
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "send", "recv",
                "all_to_all", "all_to_all_single", "gather", "scatter", "batch_isend_irecv")

_host: torch.device | None = None  # the host device while a discipline is active


class HostTensorError(RuntimeError):
    """A tensor a GPU run would keep in host memory reached a place that needs it on the device."""


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dist.P2POp):
        yield value.tensor


def _guard(name, fn):
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if _host is not None:
            for t in _tensors(list(args) + list(kwargs.values())):
                if t.device == _host:
                    raise HostTensorError(
                        f"torch.distributed.{name} got a tensor {tuple(t.shape)} {t.dtype} in host memory: NCCL "
                        f"refuses it on a GPU. Create it on the training device (runtime.device()).")
        return fn(*args, **kwargs)

    checked.__qvl_guarded__ = True
    return checked


def _install_guards() -> None:
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "__qvl_guarded__", False):
            setattr(dist, name, _guard(name, fn))


@contextlib.contextmanager
def device_discipline(accelerator: str = "cpu"):
    """Host and accelerator as different devices on this CPU machine (see the module docstring).

    Only without CUDA: on a GPU machine the real devices already are disciplined.
    """
    global _host
    if torch.cuda.is_available():
        raise RuntimeError("device_discipline stands in for a GPU on a CPU machine; this one has CUDA")
    if accelerator not in ("cpu", "meta"):
        raise ValueError(f"accelerator must be 'cpu' or 'meta', got {accelerator!r}")
    if _host is not None:
        raise RuntimeError("device_discipline is already active")
    cpu_compat.enable_cpu_compat()
    _install_guards()
    host = torch.device("meta" if accelerator == "cpu" else "cpu")
    previous = cpu_compat.set_stand_in(accelerator)
    _host = host
    try:
        with torch.device(host):
            yield torch.device(accelerator)
    finally:
        _host = None
        cpu_compat.set_stand_in(previous)


def misplaced_tensors(module: torch.nn.Module, device) -> list[str]:
    """Names of the parameters, buffers and plain tensor attributes of `module` not on `device`
    (megatron keeps some tensors, e.g. RoPE's `inv_freq`, as attributes that `.to()` does not move)."""
    device = torch.device(device)

    def same(t):
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    out = [f"{n} ({t.device})" for n, t in module.named_parameters() if not same(t)]
    out += [f"{n}.main_grad ({p.main_grad.device})" for n, p in module.named_parameters()
            if getattr(p, "main_grad", None) is not None and not same(p.main_grad)]  # DDP's grad buffer
    out += [f"{n} ({t.device})" for n, t in module.named_buffers() if not same(t)]
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and not same(value):
                out.append(f"{prefix + '.' if prefix else ''}{attr} ({value.device})")
    return out


__all__ = ["device_discipline", "misplaced_tensors", "HostTensorError"]
