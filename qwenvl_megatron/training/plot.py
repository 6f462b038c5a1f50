"""Training curves per stage from TensorBoard event files, drawn to one PNG (tools/plot_training.py).

A run directory holds one subdirectory per stage, each with the event files that `--tensorboard-dir`
wrote (the demo: WORK/tensorboard/{warmup,stage1,stage2,stage3}); a directory that holds event files
itself is one stage. Rows are stages, in the order they ran (first event's wall time); columns are
METRICS. Event files are read with tensorboard's EventAccumulator. The PNG comes from matplotlib when it
imports, else from the package's own renderer (runtime/png.py, numpy + zlib).
"""
from __future__ import annotations

import os

import numpy as np

from ..runtime import png

# (TensorBoard tag written by training/train.py, panel title)
METRICS = (("train/loss", "loss"), ("train/lr", "learning rate"), ("train/grad_norm", "grad norm"),
           ("train/samples_per_s", "samples/s"))
PANEL_W, PANEL_H = 300, 170
LINE, GREY, LIGHT = png.PALETTE[0], (150, 150, 150), (228, 228, 228)
EVENT_PREFIX = "events.out.tfevents."


class NoEventsError(ValueError):
    pass


def find_stage_dirs(run_dir: str) -> dict[str, str]:
    """{stage name: directory} for every directory under run_dir that holds event files. The name is the
    path below run_dir (a trailing `tensorboard` component dropped: checkpoints/<stage>/tensorboard)."""
    if not os.path.isdir(run_dir):
        raise NoEventsError(f"{run_dir}: not a directory")
    stages = {}
    for d, subdirs, files in os.walk(run_dir):
        subdirs.sort()
        if any(f.startswith(EVENT_PREFIX) for f in files):
            rel = os.path.relpath(d, run_dir)
            parts = [p for p in rel.split(os.sep) if p != "."]
            if len(parts) > 1 and parts[-1] == "tensorboard":
                parts = parts[:-1]
            stages["/".join(parts) or os.path.basename(os.path.abspath(run_dir))] = d
    if not stages:
        raise NoEventsError(f"{run_dir}: no TensorBoard event files ({EVENT_PREFIX}*) in it or below it; "
                            f"train with --tensorboard-dir DIR/<stage>")
    return stages


def read_scalars(directory: str) -> tuple[dict[str, tuple[list, list]], float]:
    """({tag: (steps, values)}, first wall time) of the event files in one directory; a step logged twice
    (a resumed run) keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory, size_guidance={"scalars": 0})
    acc.Reload()
    out, first = {}, float("inf")
    for tag in acc.Tags().get("scalars", []):
        by_step = {}
        for e in acc.Scalars(tag):
            by_step[e.step] = e.value
            first = min(first, e.wall_time)
        steps = sorted(by_step)
        out[tag] = (steps, [by_step[s] for s in steps])
    return out, first


def read_run(run_dir: str) -> list[tuple[str, dict]]:
    """[(stage, {tag: (steps, values)})] in the order the stages ran."""
    stages = []
    for name, d in find_stage_dirs(run_dir).items():
        scalars, first = read_scalars(d)
        stages.append((first, name, scalars))
    stages.sort(key=lambda s: (s[0], s[1]))
    return [(name, scalars) for _, name, scalars in stages]


def figure_size(num_stages: int) -> tuple[int, int]:
    """(width, height) in pixels of the plot of `num_stages` stages (the numpy renderer)."""
    return PANEL_W * len(METRICS), PANEL_H * num_stages


def render(stages: list[tuple[str, dict]], out_png: str, backend: str = "auto") -> str:
    """Draw the grid to `out_png`; returns the backend used ('matplotlib' or 'numpy')."""
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "numpy"
    if backend == "matplotlib":
        _render_matplotlib(stages, out_png)
    else:
        _render_numpy(stages, out_png)
    return backend


def _render_numpy(stages, out_png):
    canvas = png.Canvas(*figure_size(len(stages)))
    for row, (name, scalars) in enumerate(stages):
        for col, (tag, title) in enumerate(METRICS):
            steps, values = scalars.get(tag, ([], []))
            draw_panel(canvas, col * PANEL_W, row * PANEL_H, PANEL_W, PANEL_H, f"{name}: {title}", steps, values)
    canvas.save(out_png)


def format_value(v: float) -> str:
    """Short axis label: 3 significant digits, exponent form for very small or large magnitudes."""
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.3g}"
    return f"{v:.2e}"


def draw_panel(canvas, x0: int, y0: int, w: int, h: int, title: str, xs, ys) -> None:
    """One curve in the box (x0, y0, w, h): title, frame, the data's y range and first/last x as labels, light
    grid lines; a non-finite point breaks the line, a flat curve sits in the middle."""
    left, right, top, bottom = x0 + 56, x0 + w - 12, y0 + 18, y0 + h - 20
    canvas.text(left, y0 + 6, title)
    for y in np.linspace(top, bottom, 5)[1:-1].round():
        canvas.line(left + 1, y, right - 1, y, LIGHT)
    for a, b, c, d in ((left, top, right, top), (left, bottom, right, bottom), (left, top, left, bottom),
                       (right, top, right, bottom)):
        canvas.line(a, b, c, d, GREY)
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    finite = np.isfinite(xs) & np.isfinite(ys)
    if not finite.any():
        canvas.text((left + right) // 2 - 3 * png.CHAR_W, (top + bottom) // 2 - 3, "NO DATA", GREY)
        return
    ymin, ymax = float(ys[finite].min()), float(ys[finite].max())
    pad = (ymax - ymin) * 0.05 or abs(ymin) * 0.1 or 1.0
    lo, hi = ymin - pad, ymax + pad
    xlo, xhi = float(xs[finite].min()), float(xs[finite].max())
    to_x = lambda v: left + 2 + (v - xlo) / ((xhi - xlo) or 1.0) * (right - left - 4)  # noqa: E731
    to_y = lambda v: bottom - 2 - (v - lo) / (hi - lo) * (bottom - top - 4)  # noqa: E731
    px, py = np.where(finite, to_x(xs), np.nan), np.where(finite, to_y(ys), np.nan)
    for xa, ya, xb, yb in zip(px[:-1], py[:-1], px[1:], py[1:]):
        canvas.line(xa, ya, xb, yb, LINE, width=2)  # skips a segment with a NaN end
    if finite.sum() == 1:  # a single point still shows
        x, y = float(px[finite][0]), float(py[finite][0])
        canvas.rect(x - 1, y - 1, x + 1, y + 1, LINE)
    for v in (ymax, (ymin + ymax) / 2, ymin) if ymax > ymin else (ymin,):
        canvas.text(left - 4, int(round(to_y(v))) - 3, format_value(v), align="right")
    canvas.text(left, bottom + 5, format_value(xlo))
    canvas.text(right, bottom + 5, format_value(xhi), align="right")


def _render_matplotlib(stages, out_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = figure_size(len(stages))
    fig, axes = plt.subplots(len(stages), len(METRICS), figsize=(width / 100, height / 100), dpi=100,
                             squeeze=False)
    for row, (name, scalars) in enumerate(stages):
        for col, (tag, title) in enumerate(METRICS):
            ax = axes[row][col]
            steps, values = scalars.get(tag, ([], []))
            ax.plot(steps, values, linewidth=1.2)
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_training(run_dir: str, out_png: str | None = None, backend: str = "auto") -> tuple[str, list[str], str]:
    """Read run_dir's stages and write the PNG (default RUN_DIR/training.png). Returns (path, stages, backend)."""
    stages = read_run(run_dir)
    out_png = out_png or os.path.join(run_dir, "training.png")
    used = render(stages, out_png, backend)
    return out_png, [name for name, _ in stages], used
