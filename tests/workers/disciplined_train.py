"""The trainer's command line, run whole under `device_discipline("cpu")` (a process of its own: a
checkpoint save leaves helper threads and processes that a later fork in the test process would inherit).

    python disciplined_train.py TRAINER_FLAGS...   -> prints {"history": [...]} as the last line
"""
import json
import sys

from qwenvl_megatron.runtime import device_discipline
from qwenvl_megatron.training import train

if __name__ == "__main__":
    with device_discipline("cpu"):
        result = train.main(sys.argv[1:])
    print(json.dumps({"history": result["history"]}), flush=True)
