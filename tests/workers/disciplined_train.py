"""The trainer's command line, run whole under `device_discipline("cpu")` (a process of its own: a
checkpoint save leaves helper threads and processes that a later fork in the test process would inherit).

    python disciplined_train.py TRAINER_FLAGS...   -> prints {"history": [...]} as the last line

FAULT_RAISE_AFTER_SAVE=1 in the environment: the first checkpoint save is followed by a RuntimeError (an
uncaught Python exception once a save has run; tests/test_preemption.py counts what outlives it).
"""
import json
import os
import sys

from qwenvl_megatron.runtime import device_discipline
from qwenvl_megatron.training import train


def _raise_after_save():
    real = train.ckpt.save_checkpoint

    def save_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("fault injected after a checkpoint save (FAULT_RAISE_AFTER_SAVE)")
    train.ckpt.save_checkpoint = save_then_fail


if __name__ == "__main__":
    if os.environ.get("FAULT_RAISE_AFTER_SAVE"):
        _raise_after_save()
    with device_discipline("cpu"):
        result = train.main(sys.argv[1:])
    # One write per line: under `python -u` print() writes the text and its newline separately, and ranks
    # sharing a stdout (a bare srun launch) could then interleave two lines into one.
    sys.stdout.write(json.dumps({"history": result["history"]}) + "\n")
    sys.stdout.flush()
