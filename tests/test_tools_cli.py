"""The tools start fast and speak once about missing GPU packages (issue 10, "Logs people look at").

- `--help` of every tool in tools/ imports neither torch nor megatron and returns in under 2 s (median of 3
  runs in a fresh interpreter). The bound is generous for a tool that imports only argparse and the
  package's light modules (~0.1-0.3 s on an idle core), but this test machine is shared and its timings are
  noisy: a failure of the timing alone on a busy machine is worth a re-run; the import check is exact.
- A tool that runs megatron prints the one-line note about Transformer Engine / apex once, and none of
  megatron-core's own import-time warnings; without the package's filter those warnings do appear.
"""
import glob
import os
import statistics
import subprocess
import sys
import time

import pytest

from qwenvl_megatron.runtime import layer_impl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))
MEGATRON_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed. Falling back to Torch Norm")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the warnings must be able to show
    env.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **extra)
    return env


def test_every_tool_is_covered():
    names = {os.path.basename(t) for t in TOOLS}
    assert {"generate.py", "evaluate.py", "convert_checkpoint.py", "plot_training.py", "count_parameters.py"} <= names


# What `--help` loaded: run the tool as __main__ in this interpreter and list the heavy modules it imported.
_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
print(" ".join(m for m in ("torch", "megatron", "tensorboard", "PIL") if m in sys.modules))
"""


@pytest.mark.parametrize("tool", TOOLS, ids=os.path.basename)
def test_help_imports_nothing_heavy(tool):
    proc = subprocess.run([sys.executable, "-c", _PROBE, tool], capture_output=True, text=True, timeout=120,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = proc.stdout.strip().splitlines()[-1].split() if proc.stdout.strip() else []
    assert "usage:" in proc.stdout
    assert not {"torch", "megatron", "tensorboard"} & set(loaded), f"--help imported {loaded}"


@pytest.mark.parametrize("tool", TOOLS, ids=os.path.basename)
def test_help_returns_in_under_2_seconds(tool):
    times = []
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, timeout=120,
                              env=_env(), cwd=ROOT)
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert statistics.median(times) < 2.0, f"--help took {sorted(times)} s (median of 3; busy machine?)"


def test_a_tool_run_prints_the_note_once_and_no_megatron_warning():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "count_parameters.py"), "--model", "tiny"],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total" in proc.stdout
    assert proc.stderr.count(layer_impl.FALLBACK_NOTE) == 1, proc.stderr
    for w in MEGATRON_WARNINGS:
        assert w not in proc.stderr, proc.stderr


def test_without_the_filter_megatron_warns():
    """The control of the test above: the same imports, without importing the package first, do warn."""
    code = ("import megatron.core.optimizer, megatron.core.models.backends, "
            "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(MEGATRON_WARNINGS[0]) >= 3 and MEGATRON_WARNINGS[1] in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import qwenvl_megatron; " + code], capture_output=True,
                          text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0 and not any(w in proc.stderr for w in MEGATRON_WARNINGS), proc.stderr[-3000:]


@pytest.fixture
def fresh_note(monkeypatch):
    monkeypatch.setattr(layer_impl, "_noted", False)
    monkeypatch.setitem(sys.modules, "megatron.core", sys.modules.get("megatron.core") or object())
    monkeypatch.setattr(layer_impl, "have_apex", lambda: False)
    monkeypatch.setattr(layer_impl, "have_transformer_engine_package", lambda: False)


def test_note_only_on_rank_0_and_once(fresh_note, capsys):
    assert not layer_impl.note_fallbacks(rank=1)
    assert layer_impl.note_fallbacks(rank=0)
    assert not layer_impl.note_fallbacks(rank=0)
    assert capsys.readouterr().err == layer_impl.FALLBACK_NOTE + "\n"


def test_no_note_without_megatron_or_with_the_packages(fresh_note, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "megatron.core")
    assert not layer_impl.note_fallbacks(rank=0)
    monkeypatch.setitem(sys.modules, "megatron.core", object())
    monkeypatch.setattr(layer_impl, "have_apex", lambda: True)
    assert not layer_impl.note_fallbacks(rank=0)
    assert capsys.readouterr().err == ""
