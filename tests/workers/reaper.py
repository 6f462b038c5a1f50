"""Runs a command as a child subreaper and reports which of its processes outlived it.

    python reaper.py -- COMMAND...   -> COMMAND's output, then one line: REAPER {"rc": ..., "survivors": [...]}

PR_SET_CHILD_SUBREAPER makes every orphaned descendant of COMMAND (a helper process its parent left behind
when it exited or was killed) a child of this process instead of init, so after COMMAND ends, whatever
is still alive below this process is a survivor. Survivors are listed, then killed and reaped. The test
signals COMMAND's processes, never this one. A launch given as
`--group-of N -- COMMAND...` starts N copies of COMMAND with SLURM_PROCID=0..N-1 in one new process group (what
srun does with N tasks), waits for all, and reports the worst exit status.
"""
import ctypes
import json
import os
import subprocess
import sys
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    copies = 0
    if argv[0] == "--group-of":
        copies, argv = int(argv[1]), argv[2:]
    assert argv[0] == "--"
    command = argv[1:]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if copies:  # one process group for all tasks, as a job step's processes
        procs, group = [], None
        for rank in range(copies):
            env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(copies))
            procs.append(subprocess.Popen(command, env=env, process_group=0 if group is None else group,
                                          restore_signals=True))
            group = group or procs[0].pid
        codes = [p.wait() for p in procs]
        rc = max(codes, key=abs)
    else:
        rc = subprocess.Popen(command, restore_signals=True).wait()
    time.sleep(1.0)  # a helper that exits on its own once its parent is gone has had time to do so
    me = psutil.Process()
    survivors = []
    for child in me.children(recursive=True):
        try:
            survivors.append(" ".join(child.cmdline())[:200] or child.name())
            child.kill()
        except psutil.NoSuchProcess:
            pass
    while True:  # reap what was killed (and zombies reparented here)
        try:
            if os.waitpid(-1, 0)[0] == 0:
                break
        except ChildProcessError:
            break
    print("REAPER " + json.dumps({"rc": rc, "survivors": survivors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
