"""Where the trainer's logged scalars go on rank 0 besides stdout: TensorBoard (`--tensorboard-dir`) and
Weights & Biases (`--wandb-*`, as in Megatron-LM; optional package). Each sink takes {tag: value} per log step.
"""
from __future__ import annotations

import os

import torch.distributed as dist


class TensorBoardSink:
    def __init__(self, writer):
        self.writer = writer

    def log(self, scalars: dict, step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Megatron-LM's W&B logging: one run per job on the logging rank, the same scalars and steps as
    TensorBoard."""

    def __init__(self, args, record: dict):
        import wandb

        save_dir = args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        self.wandb = wandb
        wandb.init(project=args.wandb_project, name=args.wandb_exp_name or None, dir=save_dir, config=record)

    def log(self, scalars: dict, step: int) -> None:
        self.wandb.log(dict(scalars), step=step)

    def close(self) -> None:
        self.wandb.finish()


def check_wandb(args) -> None:
    """--wandb-project without the optional package: a one-line error before anything is built."""
    if getattr(args, "wandb_project", None):
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise SystemExit("--wandb-project needs the `wandb` package, which is not installed: "
                             "pip install wandb (or drop --wandb-project)")


def scalar_sinks(args, record: dict, warn=print) -> list:
    """Where the log step's scalars go on rank 0: TensorBoard (--tensorboard-dir), W&B (--wandb-project)."""
    if dist.get_rank() != 0:
        return []
    sinks = []
    if args.tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
            sinks.append(TensorBoardSink(SummaryWriter(args.tensorboard_dir)))
        except Exception as e:  # noqa: BLE001 - logging must not stop training
            warn(f"warning: TensorBoard unavailable ({type(e).__name__}: {e}); logging to stdout only")
    if args.wandb_project:
        sinks.append(WandbSink(args, record))
    return sinks
