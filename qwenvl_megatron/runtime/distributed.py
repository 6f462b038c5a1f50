"""Process group and megatron parallel state: NCCL on GPUs, gloo on CPU, same call either way."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from . import cpu_compat
from .layer_impl import note_fallbacks, skip_tp_group_warning


def device() -> torch.device:
    """Where the model, its batches and every tensor of a collective live: this rank's GPU, else the
    device standing in for it (the CPU; `meta` inside a placement check)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return cpu_compat.stand_in()


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
               timeout_minutes: int = 30) -> torch.device:
    """Start torch.distributed (from torchrun's env, or as a single process) and megatron's parallel state.

    World size must be a multiple of TP x PP; the rest is data parallel.
    """
    from megatron.core import parallel_state, tensor_parallel as mtp

    cpu_compat.enable_cpu_compat()
    launched = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    rank, world, local_rank = launch_env(launched)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Under torchrun (or srun) the env says where the store is; a plain process is a world of one on a
        # free port (not written into os.environ, so the tools it starts do not inherit a port in use).
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            init_method="env://" if launched else f"tcp://127.0.0.1:{_free_port()}",
            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size "
                         f"{tensor_parallel} x --pipeline-model-parallel-size {pipeline_parallel}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             pipeline_model_parallel_size=pipeline_parallel)
    skip_tp_group_warning()
    mtp.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    note_fallbacks(dist.get_rank())  # megatron's TE/apex warnings, said once (runtime/layer_impl.py)
    return device()


def launch_env(launched: bool) -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else, for one process per
    task started by a bare `srun` with MASTER_ADDR and MASTER_PORT exported, SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID."""
    env = os.environ
    if "RANK" in env or not launched or "SLURM_PROCID" not in env:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    return int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", "1")), int(env.get("SLURM_LOCALID", "0"))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
