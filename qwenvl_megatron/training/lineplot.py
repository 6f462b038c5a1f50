"""Line plots on a grid of panels, drawn into a numpy image and written as PNG (numpy + zlib only).

Enough for training curves without matplotlib: each panel has a title, a frame, min / middle / max labels
on y, the first and last x, light grid lines, and one polyline (non-finite points break it). Text is a
5x7 bitmap font, upper case.

    canvas = Canvas(width, height)
    canvas.panel(x0, y0, w, h, title, xs, ys)
    canvas.save_png(path)
"""
from __future__ import annotations

import math

import numpy as np

from ..runtime.png import read_png, write_png  # noqa: F401 (re-exported for callers)

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (40, 40, 40), (150, 150, 150), (228, 228, 228)
LINE = (31, 119, 180)

# 5x7 glyphs: seven rows of five bits (MSB on the left), as hex.
_GLYPHS = {
    "0": "0E 11 13 15 19 11 0E", "1": "04 0C 04 04 04 04 0E", "2": "0E 11 01 02 04 08 1F",
    "3": "1F 02 04 02 01 11 0E", "4": "02 06 0A 12 1F 02 02", "5": "1F 10 1E 01 01 11 0E",
    "6": "06 08 10 1E 11 11 0E", "7": "1F 01 02 04 08 08 08", "8": "0E 11 11 0E 11 11 0E",
    "9": "0E 11 11 0F 01 02 0C", "A": "0E 11 11 1F 11 11 11", "B": "1E 11 11 1E 11 11 1E",
    "C": "0E 11 10 10 10 11 0E", "D": "1C 12 11 11 11 12 1C", "E": "1F 10 10 1E 10 10 1F",
    "F": "1F 10 10 1E 10 10 10", "G": "0E 11 10 17 11 11 0F", "H": "11 11 11 1F 11 11 11",
    "I": "0E 04 04 04 04 04 0E", "J": "07 02 02 02 02 12 0C", "K": "11 12 14 18 14 12 11",
    "L": "10 10 10 10 10 10 1F", "M": "11 1B 15 15 11 11 11", "N": "11 11 19 15 13 11 11",
    "O": "0E 11 11 11 11 11 0E", "P": "1E 11 11 1E 10 10 10", "Q": "0E 11 11 11 15 12 0D",
    "R": "1E 11 11 1E 14 12 11", "S": "0F 10 10 0E 01 01 1E", "T": "1F 04 04 04 04 04 04",
    "U": "11 11 11 11 11 11 0E", "V": "11 11 11 11 11 0A 04", "W": "11 11 11 15 15 15 0A",
    "X": "11 11 0A 04 0A 11 11", "Y": "11 11 11 0A 04 04 04", "Z": "1F 01 02 04 08 10 1F",
    " ": "00 00 00 00 00 00 00", ".": "00 00 00 00 00 0C 0C", "-": "00 00 00 1F 00 00 00",
    "+": "00 04 04 1F 04 04 00", "/": "00 01 02 04 08 10 00", ":": "00 0C 0C 00 0C 0C 00",
    "_": "00 00 00 00 00 00 1F", "(": "02 04 08 08 08 04 02", ")": "08 04 02 02 02 04 08",
    "=": "00 00 1F 00 1F 00 00", ",": "00 00 00 00 0C 04 08", "?": "0E 11 01 02 04 00 04",
}
FONT = {c: np.array([[(int(row, 16) >> (4 - i)) & 1 for i in range(5)] for row in rows.split()], dtype=bool)
        for c, rows in _GLYPHS.items()}
CHAR_W, CHAR_H = 6, 7  # advance and height in pixels


def format_value(v: float) -> str:
    """Short axis label: 3 significant digits, exponent form for very small or large magnitudes."""
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.3g}"
    return f"{v:.2e}"


class Canvas:
    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), WHITE, dtype=np.uint8)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    def text(self, x: int, y: int, s: str, color=BLACK, align: str = "left") -> None:
        """Draw `s` with its top-left corner at (x, y) (`align="right"`: top-right corner)."""
        s = s.upper()
        if align == "right":
            x -= len(s) * CHAR_W
        for i, ch in enumerate(s):
            glyph = FONT.get(ch, FONT["?"])
            gx = x + i * CHAR_W
            h, w = self.pixels.shape[:2]
            if gx < 0 or y < 0 or gx + 5 > w or y + CHAR_H > h:
                continue
            self.pixels[y:y + CHAR_H, gx:gx + 5][glyph] = color

    def hline(self, x0: int, x1: int, y: int, color) -> None:
        self.pixels[y, x0:x1 + 1] = color

    def vline(self, x: int, y0: int, y1: int, color) -> None:
        self.pixels[y0:y1 + 1, x] = color

    def polyline(self, px: np.ndarray, py: np.ndarray, color=LINE) -> None:
        """Connect consecutive points (pixel coordinates, floats); a NaN point breaks the line; 2 px thick."""
        h, w = self.pixels.shape[:2]
        for (xa, ya), (xb, yb) in zip(zip(px[:-1], py[:-1]), zip(px[1:], py[1:])):
            if not all(map(math.isfinite, (xa, ya, xb, yb))):
                continue
            n = int(max(abs(xb - xa), abs(yb - ya))) + 1
            xs = np.rint(np.linspace(xa, xb, n + 1)).astype(int)
            ys = np.rint(np.linspace(ya, yb, n + 1)).astype(int)
            for dy in (0, 1):
                ok = (xs >= 0) & (xs < w) & (ys + dy >= 0) & (ys + dy < h)
                self.pixels[ys[ok] + dy, xs[ok]] = color
        lone = np.isfinite(px) & np.isfinite(py)  # a single point between gaps still shows
        if lone.sum() == 1:
            x, y = int(round(float(px[lone][0]))), int(round(float(py[lone][0])))
            self.pixels[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = color

    def panel(self, x0: int, y0: int, w: int, h: int, title: str, xs, ys) -> None:
        """One line plot in the box (x0, y0, w, h): title, frame, y labels, first/last x, the curve."""
        left, right, top, bottom = x0 + 56, x0 + w - 12, y0 + 18, y0 + h - 20
        self.text(left, y0 + 6, title)
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        finite = np.isfinite(xs) & np.isfinite(ys)
        for y in np.linspace(top, bottom, 5)[1:-1].round().astype(int):
            self.hline(left + 1, right - 1, int(y), LIGHT)
        self.hline(left, right, top, GREY), self.hline(left, right, bottom, GREY)
        self.vline(left, top, bottom, GREY), self.vline(right, top, bottom, GREY)
        if not finite.any():
            self.text((left + right) // 2 - 3 * CHAR_W, (top + bottom) // 2 - 3, "NO DATA", GREY)
            return
        ymin, ymax = float(ys[finite].min()), float(ys[finite].max())
        pad = (ymax - ymin) * 0.05 or abs(ymin) * 0.1 or 1.0  # a flat curve sits in the middle
        lo, hi = ymin - pad, ymax + pad
        xlo, xhi = float(xs[finite].min()), float(xs[finite].max())
        span = (xhi - xlo) or 1.0
        px = np.where(finite, left + 2 + (xs - xlo) / span * (right - left - 4), np.nan)
        py = np.where(finite, bottom - 2 - (ys - lo) / (hi - lo) * (bottom - top - 4), np.nan)
        self.polyline(px, py)
        to_y = lambda v: bottom - 2 - (v - lo) / (hi - lo) * (bottom - top - 4)  # noqa: E731
        labels = (ymax, (ymin + ymax) / 2, ymin) if ymax > ymin else (ymin,)  # the data's range, where it lies
        for v in labels:
            self.text(left - 4, int(round(to_y(v))) - 3, format_value(v), BLACK, align="right")
        self.text(left, bottom + 5, format_value(xlo))
        self.text(right, bottom + 5, format_value(xhi), align="right")

    def save_png(self, path: str) -> None:
        write_png(path, self.pixels)
