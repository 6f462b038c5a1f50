"""Lets megatron-core 0.16 run on a machine without CUDA (gloo backend, fp32).

megatron-core assumes a GPU in a handful of places: it allocates small tensors with `device="cuda"`
(schedules, optimizer, grad clipping, DDP), calls `torch.cuda.current_device()` for buffers,
`torch.cuda.synchronize()` around communication and checkpoint saves, checks
`param.type() == "torch.cuda.FloatTensor"` in its optimizers, and keeps its tensor-parallel RNG streams
in CUDA generators. This module answers all of those with the CPU, and is the only place that does.

It is a no-op when CUDA is available, so the same program runs unchanged on GPUs with NCCL.

Where a CUDA tensor is asked for, the answer is the *stand-in* device: the CPU, except inside
`runtime.device_discipline`, which can make the stand-in `meta` to check placement of a model of any size.

The answers to device requests come from a function mode, a Python hook on every torch call: it costs more
than a small model's kernels. So the hot paths run without it (`plain_torch`): megatron's `forward_step` and
`backward_step` (the model's math; its one CUDA request there, the causal mask, is answered by a patch),
the torch optimizers' `step` and generation's model call. Only megatron's bookkeeping (schedules, grad
norm, DDP, checkpoints) goes through the hook. Also for speed on a CPU: megatron's no-apex norm and
clipping fallbacks become one foreach call each, and gloo all-reduce/broadcast over a group of one rank
return at once (docs/performance.md, "Trainer overhead").
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_mode: TorchFunctionMode | None = None
_stand_in = torch.device("cpu")  # what a request for a CUDA tensor gets


def stand_in() -> torch.device:
    """The device that answers for CUDA on this machine (the CPU unless a discipline test changed it)."""
    return _stand_in


def set_stand_in(device) -> torch.device:
    """Answer CUDA requests with `device` from now on; returns the previous stand-in."""
    global _stand_in
    previous, _stand_in = _stand_in, torch.device(device)
    return previous


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
                    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
                    torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor"}


class _CudaToStandIn(TorchFunctionMode):
    """Maps every request for a CUDA tensor to the stand-in device and reports float tensors there under
    the CUDA type name that megatron's optimizer assertions look for."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to(_stand_in)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=_stand_in)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _stand_in) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            if args[0].device == _stand_in and args[0].dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[args[0].dtype]
            return func(*args)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """megatron's named RNG streams (model-parallel, data-parallel, expert) kept as CPU generator states.

    `fork(name)` swaps the named state into the CPU default generator for the duration of the block, which
    is what megatron's CUDA tracker does with the CUDA generator. Used for TP-aware init and recompute.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _patch_rng():
    import megatron.core.tensor_parallel.random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # `initialize_rng_tracker(force_reset=True)` would rebuild a CUDA tracker; keep ours instead.
    original_init = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(*args, force_reset=False, **kwargs):
        if force_reset:
            tracker.reset()
        mrandom._CUDA_RNG_STATE_TRACKER = tracker
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_rng_tracker.__wrapped__ = original_init
    mrandom.initialize_rng_tracker = initialize_rng_tracker
    # Activation recompute saves and restores the "device" RNG: on CPU that is the default generator.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The recomputed forward runs inside autograd's backward, where the function mode installed below is
    # not on the stack: enter it there too.
    ckpt = mrandom.CheckpointFunction
    original_backward = ckpt.backward

    def backward(ctx, *grads):
        with _CudaToStandIn():
            return original_backward(ctx, *grads)

    ckpt.backward = staticmethod(backward)


@contextlib.contextmanager
def plain_torch():
    """The block runs without the CUDA-to-stand-in hook (for code that makes no CUDA requests: model and
    optimizer math). Other function modes (e.g. a `torch.device` context) stay, in their order."""
    stack = torch.overrides._get_current_function_mode_stack()
    if not any(isinstance(m, _CudaToStandIn) for m in stack):
        yield
        return
    for _ in stack:
        torch.overrides._pop_mode()
    for m in stack:
        if not isinstance(m, _CudaToStandIn):
            torch.overrides._push_mode(m)
    try:
        yield
    finally:
        while torch.overrides._get_current_function_mode_stack():
            torch.overrides._pop_mode()
        for m in stack:
            torch.overrides._push_mode(m)


def _plain(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with plain_torch():
            return fn(*args, **kwargs)
    run.__qvl_plain__ = True
    return run


@functools.lru_cache(maxsize=16)
def _causal_mask(sq: int, device: torch.device) -> torch.Tensor:
    return torch.ones(sq, sq, dtype=torch.bool, device=device).triu(1)


def _patch_hot_paths():
    """Run the model's forward/backward and the optimizers' update without the hook (see the docstring)."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    from megatron.core.pipeline_parallel import schedules

    # The unfused softmax asks for a fresh [sq, sq] causal mask on "cuda" in every layer: one per length.
    fused_softmax.get_default_causal_mask = lambda sq: _causal_mask(sq, _stand_in)
    for name in ("forward_step", "backward_step"):
        fn = getattr(schedules, name)
        if not getattr(fn, "__qvl_plain__", False):
            setattr(schedules, name, _plain(fn))
    for cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        if not getattr(cls.step, "__qvl_plain__", False):
            cls.step = _plain(cls.step)


def _skip_single_rank(fn):
    """gloo makes a round trip (~0.1-0.3 ms) even over a group of one rank, where all-reduce and broadcast
    change nothing; megatron issues a dozen per step over its size-1 groups (TP cross-entropy, DP, norms)."""
    @functools.wraps(fn)
    def run(tensor, *args, **kwargs):
        # all_reduce(tensor, op, group, async_op), broadcast(tensor, src, group, async_op, ...)
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        async_op = kwargs.get("async_op", args[2] if len(args) > 2 else False)
        if (not async_op and dist.is_initialized()
                and dist.get_world_size(group) == 1):
            return None
        return fn(tensor, *args, **kwargs)
    run.__qvl_single_rank__ = True
    return run


def _patch_collectives():
    for name in ("all_reduce", "broadcast"):
        fn = getattr(dist, name)
        if not getattr(fn, "__qvl_single_rank__", False):
            setattr(dist, name, _skip_single_rank(fn))


def _l2_norm_on_device(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's no-apex fallback for `multi_tensor_l2norm`, without its round trip through a host
    tensor and a Python float, and one foreach call instead of a Python loop: the norm stays where the
    gradients are."""
    norms = [n for tensors in tensor_lists for n in torch._foreach_norm(tensors)]
    return torch.norm(torch.stack(norms)).float().reshape(1), None


def _scale_on_device(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's no-apex fallback for `multi_tensor_scale` (gradient clipping), in place and in one foreach
    call where source and destination are the same tensors (its fallback copies `src * scale` per tensor)."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _patch_grad_norm():
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _l2_norm_on_device
    if clip_grads.multi_tensor_scale_impl is local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _scale_on_device


def is_active() -> bool:
    return _mode is not None


def enable_cpu_compat() -> bool:
    """Install the CPU answers to megatron-core's CUDA assumptions. Returns True if it did anything."""
    global _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _mode is not None:
            return True
        torch.cuda.current_device = lambda: _stand_in
        torch.cuda.synchronize = lambda *a, **k: None
        _patch_rng()
        _patch_grad_norm()
        _patch_hot_paths()
        _patch_collectives()
        _mode = _CudaToStandIn()
        _mode.__enter__()
        return True
