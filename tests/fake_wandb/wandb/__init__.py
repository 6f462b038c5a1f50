"""A test double for the `wandb` package: records init/log/finish calls as JSON lines in $FAKE_WANDB_LOG.
Only the calls the trainer makes exist, so an unexpected call fails loudly."""
import json
import os


def _record(call, **kw):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"call": call, **kw}) + "\n")


def init(project=None, name=None, dir=None, config=None):  # noqa: A002 - wandb's own keyword
    _record("init", project=project, name=name, dir=dir, config=config)
    return object()


def log(data, step=None):
    _record("log", data={k: float(v) for k, v in data.items()}, step=step)


def finish():
    _record("finish")
