"""tools/plot_training.py: real TensorBoard event files of two stages in, one PNG of curves out; the built-in
renderer (numpy + zlib) since matplotlib is optional."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from qwenvl_megatron.runtime import png
from qwenvl_megatron.training import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "plot_training.py")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def write_stage(path, start_wall, steps, loss, with_grad_norm=True):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(path))
    for i, step in enumerate(steps):
        wall = start_wall + i
        w.add_scalar("train/loss", loss[i], step, walltime=wall)
        w.add_scalar("train/lr", 1e-3 * (i + 1) / len(steps), step, walltime=wall)
        if with_grad_norm:
            w.add_scalar("train/grad_norm", float("nan") if i == 3 else 1.0 + 0.1 * i, step, walltime=wall)
        w.add_scalar("train/samples_per_s", 100.0 + (i % 3), step, walltime=wall)
    w.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`warmup` ran first, then `stage1` (alphabetically the other way round); stage1 sits in the
    checkpoint layout <stage>/tensorboard and logs no grad norm."""
    d = tmp_path_factory.mktemp("run")
    steps = list(range(1, 41))
    write_stage(d / "warmup", 1000.0, steps, [5.0 - 0.1 * i for i in range(40)])
    write_stage(d / "stage1" / "tensorboard", 5000.0, steps, [3.0 - 0.05 * i for i in range(40)], with_grad_norm=False)
    return d


def panel(pixels, row, col):
    return pixels[row * plot.PANEL_H:(row + 1) * plot.PANEL_H, col * plot.PANEL_W:(col + 1) * plot.PANEL_W]


def line_pixels(region):
    return np.argwhere(np.all(region == plot.LINE, axis=-1))  # (y, x) of the curve's colour


def test_reads_stages_in_the_order_they_ran(run_dir):
    stages = plot.read_run(str(run_dir))
    assert [name for name, _ in stages] == ["warmup", "stage1"]
    steps, values = stages[0][1]["train/loss"]
    assert steps == list(range(1, 41)) and values[0] == pytest.approx(5.0) and values[-1] == pytest.approx(1.1)
    assert "train/grad_norm" not in stages[1][1]


def test_tool_writes_a_png_with_the_curves(run_dir, tmp_path):
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, TOOL, str(run_dir), "--out", str(out), "--backend", "numpy"],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 stages (warmup, stage1)" in proc.stderr
    pixels = png.read_png(str(out))
    assert (pixels.shape[1], pixels.shape[0]) == plot.figure_size(2) == (4 * plot.PANEL_W, 2 * plot.PANEL_H)
    from PIL import Image  # an independent decoder agrees
    with Image.open(out) as im:
        assert im.size == plot.figure_size(2) and np.array_equal(np.asarray(im.convert("RGB")), pixels)

    for row in range(2):
        for col in range(4):
            drawn = line_pixels(panel(pixels, row, col))
            if (row, col) == (1, 2):  # stage1 has no grad norm: an empty frame saying so
                assert len(drawn) == 0
            else:
                assert len(drawn) > 100, (row, col)
                assert (panel(pixels, row, col) == png.BLACK).all(axis=-1).sum() > 50  # title and labels
    # The loss falls: the curve's left end sits high in the panel, its right end low; the lr rises.
    for col, falls in ((0, True), (1, False)):
        yx = line_pixels(panel(pixels, 0, col))
        left, right = yx[yx[:, 1] < yx[:, 1].min() + 10], yx[yx[:, 1] > yx[:, 1].max() - 10]
        assert (left[:, 0].mean() < right[:, 0].mean() - 50) == falls, col
    # The NaN grad norm at step 4 breaks that curve: a gap of columns without line colour.
    cols = np.unique(line_pixels(panel(pixels, 0, 2))[:, 1])
    assert np.diff(cols).max() > 5


def test_a_directory_without_event_files_is_a_one_line_error(tmp_path):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "notes.txt").write_text("no events here")
    proc = subprocess.run([sys.executable, TOOL, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"plot_training: error: {tmp_path}: no TensorBoard event files")
    assert not (tmp_path / "training.png").exists()


def test_png_writer_round_trips(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    png.write_png(str(tmp_path / "x.png"), rgb)
    assert np.array_equal(png.read_png(str(tmp_path / "x.png")), rgb)


def test_flat_and_empty_panels_draw():
    c = png.Canvas(300, 170)
    plot.draw_panel(c, 0, 0, 300, 170, "flat", [1, 2, 3], [2.0, 2.0, 2.0])
    assert len(line_pixels(c.pixels)) > 100
    c = png.Canvas(300, 170)
    plot.draw_panel(c, 0, 0, 300, 170, "empty", [], [])
    plot.draw_panel(c, 0, 0, 300, 170, "nan", [1, 2], [math.nan, math.nan])
    assert len(line_pixels(c.pixels)) == 0


def test_matplotlib_backend_when_installed(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    path, stages, backend = plot.plot_training(str(run_dir), str(tmp_path / "m.png"), "matplotlib")
    assert backend == "matplotlib" and os.path.getsize(path) > 1000
