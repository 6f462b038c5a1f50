"""Run a tool on TP x PP ranks: under torchrun as is, otherwise by launching itself with torchrun.

Tools check their inputs in the launching process first (clear errors before any worker starts), then
call `relaunch` when they need more than one rank. A single rank runs in-process (gloo, world size 1).
"""
from __future__ import annotations

import os
import subprocess
import sys


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, script: str, argv: list[str]) -> int:
    """`torchrun --standalone --nproc_per_node nproc script argv...`; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           script, *argv]
    print(f"[launch] {nproc} ranks: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def fail(tool: str, err: BaseException) -> None:
    """Print `tool: error: message` (no traceback: the message names the file / key / flag) and exit 1."""
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank is not None else ""
    print(f"{tool}: error{where}: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


def run_tool(tool: str, script: str, parse_args, run, argv=None) -> None:
    """The `main` of a tool with `--tp/--pp`: relaunch itself under torchrun when it needs more than one
    rank, then `run(args)`, turning the errors a user can fix into one line naming the cause."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not under_torchrun() and args.tp * args.pp > 1:
        sys.exit(relaunch(args.tp * args.pp, os.path.abspath(script), argv))
    try:
        run(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        fail(tool, e)
