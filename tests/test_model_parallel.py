"""Every parallel layout computes the same model: logits vs the independent reference, and loss and
gradients of one global batch vs the single-process run (workers/model_parallel.py under torchrun)."""
import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(nproc, layouts, tmp_path):
    out = tmp_path / f"mp{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), os.path.join(HERE, "workers", "model_parallel.py"),
           "--layouts", ",".join(layouts), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def check(name, res):
    for case, diff in res["logits"].items():
        assert diff <= 1e-4, f"{name} {case}: logits differ from the reference by {diff}"
    assert set(res["logits"]) == {f"{s}px_{n}img" for s in (224, 448) for n in (0, 1, 2)}
    assert res["loss_diff"] <= 1e-5, f"{name}: loss differs by {res['loss_diff']} from the 1-process run"
    assert not res["missing_grads"], f"{name}: no gradient for {res['missing_grads']}"
    # Gradients are ~1e-2; fp32 reduction order differs between layouts, so allow a tiny tolerance.
    assert res["grad_max_diff"] <= 1e-6 * max(1.0, res["grad_max_abs"]), f"{name}: grads differ by {res['grad_max_diff']}"
    assert res["vision_grad_norm"] > 0, f"{name}: the ViT got no gradient"


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    return run_worker(2, ["tp2", "pp2", "dp2", "pp2_uneven", "tp2_recompute"], tmp_path_factory.mktemp("mp2"))


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "pp2_uneven", "tp2_recompute"])
def test_two_process_layouts(two_proc, layout):
    check(layout, two_proc[layout])


def test_tp2_pp2(tmp_path):
    res = run_worker(4, ["tp2pp2"], tmp_path)
    check("tp2pp2", res["tp2pp2"])
