"""Dependency-free PNG figures (numpy + zlib): a Canvas with a 5x7 bitmap font (upper case, digits, a few
signs), the benchmarks' line chart (linear or log axes, a legend), and the PNG file writer and reader.

Enough for the benchmarks and the training plot on machines without matplotlib.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np

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
    "%": "18 19 02 04 08 13 03", "^": "04 0A 11 00 00 00 00", "*": "00 04 15 0E 15 04 00",
    "<": "02 04 08 10 08 04 02", ">": "08 04 02 01 02 04 08",
}
FONT = {c: np.array([[(int(row, 16) >> (4 - i)) & 1 for i in range(5)] for row in rows.split()], dtype=bool)
        for c, rows in _GLYPHS.items()}
CHAR_W, CHAR_H = 6, 7  # advance and height in pixels


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
WHITE, BLACK = (255, 255, 255), (40, 40, 40)


class Canvas:
    """An RGB image (numpy [H, W, 3] uint8) with the few primitives the charts need; off-canvas pixels are
    dropped, so callers need not clip."""

    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), WHITE, dtype=np.uint8)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    def _put(self, xs, ys, color) -> None:
        xs, ys = np.asarray(xs, dtype=int), np.asarray(ys, dtype=int)
        h, w = self.pixels.shape[:2]
        ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        self.pixels[ys[ok], xs[ok]] = color

    def rect(self, x0, y0, x1, y1, color) -> None:
        ys, xs = np.mgrid[int(y0):int(y1) + 1, int(x0):int(x1) + 1]
        self._put(xs.ravel(), ys.ravel(), color)

    def line(self, x0, y0, x1, y1, color, width: int = 1) -> None:
        """From (x0, y0) to (x1, y1), floats; `width` 2 thickens it by one pixel down and right."""
        if not all(map(math.isfinite, (x0, y0, x1, y1))):
            return
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs, ys = np.rint(np.linspace(x0, x1, n + 1)).astype(int), np.rint(np.linspace(y0, y1, n + 1)).astype(int)
        for d in range(width):
            self._put(xs + d // 2, ys + d % 2, color)

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 1, align: str = "left",
             vertical: bool = False) -> None:
        """`s` (upper-cased) with its top-left corner at (x, y); `align="right"`: top-right corner;
        `vertical`: rotated to read bottom-up, starting at (x, y)."""
        s = s.upper()
        if align == "right":
            x -= text_width(s, scale)
        for i, ch in enumerate(s):
            gy, gx = np.nonzero(FONT.get(ch, FONT["?"]))
            for dy in range(scale):
                for dx in range(scale):
                    along, across = i * CHAR_W * scale + gx * scale + dx, gy * scale + dy
                    if vertical:
                        self._put(x + across, y - along, color)
                    else:
                        self._put(x + along, y + across, color)

    def save(self, path: str) -> None:
        write_png(path, self.pixels)


def text_width(s: str, scale: int = 1) -> int:
    return len(s) * CHAR_W * scale


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        return f"{v:.0e}".replace("e+0", "E").replace("e-0", "E-").replace("e+", "E").replace("e-", "E-")
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10((hi - lo) or 1))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= 6:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step) + 1)]


def line_chart(path: str, series: dict, title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False,
               logy: bool = False, width: int = 900, height: int = 560, lines: bool = True) -> None:
    """series: {label: [(x, y), ...]} (a label starting with '~' is drawn dashed, no markers: a model or a roof)."""
    def ok(x, y):
        return (x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
                and (not logx or x > 0) and (not logy or y > 0))

    pts = [(x, y) for s in series.values() for x, y in s if ok(x, y)]
    c = Canvas(width, height)
    left, right, top, bottom = 100, width - 250, 50, height - 70
    if not pts:
        c.text(left, top, title + " (no data)")
        c.save(path)
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if not logy:
        y0 = min(0.0, y0)
    if x0 == x1:
        x0, x1 = (x0 / 2, x1 * 2) if logx else (x0 - 1, x1 + 1)
    if y0 == y1:
        y0, y1 = (y0 / 2, y1 * 2) if logy else (y0 - 1, y1 + 1)
    if logx:
        x0, x1 = 10 ** math.floor(math.log10(x0)), 10 ** math.ceil(math.log10(x1))
    if logy:
        y0, y1 = 10 ** math.floor(math.log10(y0)), 10 ** math.ceil(math.log10(y1))
    else:
        y1 *= 1.05
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    fy = (lambda v: math.log10(v)) if logy else (lambda v: v)

    def X(v):
        return left + (fx(v) - fx(x0)) / (fx(x1) - fx(x0)) * (right - left)

    def Y(v):
        return bottom - (fy(v) - fy(y0)) / (fy(y1) - fy(y0)) * (bottom - top)

    grey, black = (220, 220, 220), (0, 0, 0)
    for t in _ticks(x0, x1, logx):
        if x0 <= t <= x1:
            c.line(X(t), top, X(t), bottom, grey)
            c.text(int(X(t)) - text_width(_fmt(t)) // 2, bottom + 8, _fmt(t))
    for t in _ticks(y0, y1, logy):
        if y0 <= t <= y1:
            c.line(left, Y(t), right, Y(t), grey)
            c.text(left - 8 - text_width(_fmt(t)), int(Y(t)) - 3, _fmt(t))
    c.line(left, top, left, bottom, black)
    c.line(left, bottom, right, bottom, black)
    c.text(left, 15, title, scale=2)
    c.text((left + right) // 2 - text_width(xlabel) // 2, bottom + 35, xlabel)
    c.text(15, (top + bottom) // 2 + text_width(ylabel) // 2, ylabel, vertical=True)
    colored = 0
    for k, (label, data) in enumerate(series.items()):
        if label.startswith("~"):  # a model or a roof: black, dashed
            color = (0, 0, 0)
        else:
            color, colored = PALETTE[colored % len(PALETTE)], colored + 1
        good = [(x, y) for x, y in data if ok(x, y)]
        dashed = label.startswith("~")
        prev = None
        for x, y in good:
            px, py = X(x), Y(y)
            if prev is not None and (lines or dashed):
                if dashed:
                    n = int(max(abs(px - prev[0]), abs(py - prev[1])) // 8) + 1
                    for j in range(0, n, 2):
                        a, b = j / n, min(j + 1, n) / n
                        c.line(prev[0] + (px - prev[0]) * a, prev[1] + (py - prev[1]) * a,
                               prev[0] + (px - prev[0]) * b, prev[1] + (py - prev[1]) * b, color, 2)
                else:
                    c.line(prev[0], prev[1], px, py, color, 2)
            if not dashed:
                c.rect(px - 3, py - 3, px + 3, py + 3, color)
            prev = (px, py)
        ly = top + 10 + 22 * k
        c.rect(right + 20, ly, right + 32, ly + 10, color)
        c.text(right + 40, ly, label.lstrip("~")[:26])
    c.save(path)




# ---- the PNG file itself (8-bit RGB, unfiltered rows)
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str, rgb) -> None:
    """An 8-bit RGB PNG of an [H, W, 3] uint8 array (every row with filter type 0)."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(_chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(_chunk(b"IEND", b""))


def read_png(path: str):
    """The [H, W, 3] pixels of a PNG that `write_png` wrote (8-bit RGB, filter type 0 rows); for tests."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ValueError(f"{path}: bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            if (depth, color) != (8, 2):
                raise ValueError(f"{path}: only 8-bit RGB is read here")
            size = (h, w)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    h, w = size
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    if rows[:, 0].any():
        raise ValueError(f"{path}: filtered rows are not read here")
    return rows[:, 1:].reshape(h, w, 3)


__all__ = ["Canvas", "line_chart", "write_png", "read_png"]
