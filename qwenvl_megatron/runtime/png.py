"""A dependency-free PNG chart: axes (linear or log), points and lines per series, a legend, a title.

Enough for the benchmarks' figures on machines without matplotlib. Text uses a built-in 3x5 pixel font
(upper case, digits, a few signs), drawn at 2x.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np

_FONT = {  # 3 columns x 5 rows, row-major bits
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101111011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", "/": "001001010100100", "(": "010100100100010",
    ")": "010001001001010", "%": "101001010100101", ":": "000010000010000", "_": "000000000000111",
    "+": "000010111010000", "=": "000111000111000", ",": "000000000010100", " ": "000000000000000",
    "^": "010101000000000", "*": "000101010101000", "<": "001010100010001", ">": "100010001010100",
}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(color)

    def rect(self, x0, y0, x1, y1, color) -> None:
        for y in range(int(y0), int(y1) + 1):
            for x in range(int(x0), int(x1) + 1):
                self.set(x, y, color)

    def line(self, x0, y0, x1, y1, color, width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for k in range(n + 1):
            x, y = x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n
            for d in range(width):
                self.set(int(round(x)) + d // 2, int(round(y)) + d % 2, color)

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 2, vertical: bool = False) -> None:
        for k, ch in enumerate(s.upper()):
            glyph = _FONT.get(ch, _FONT[" "])
            for r in range(5):
                for c in range(3):
                    if glyph[3 * r + c] == "1":
                        for dy in range(scale):
                            for dx in range(scale):
                                if vertical:
                                    self.set(x + r * scale + dy, y - (k * 4 + c) * scale - dx, color)
                                else:
                                    self.set(x + (k * 4 + c) * scale + dx, y + r * scale + dy, color)

    def save(self, path: str) -> None:
        write_png(path, np.frombuffer(bytes(self.px), np.uint8).reshape(self.h, self.w, 3))


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * 4 * scale


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
            c.text(left - 8 - text_width(_fmt(t)), int(Y(t)) - 5, _fmt(t))
    c.line(left, top, left, bottom, black)
    c.line(left, bottom, right, bottom, black)
    c.text(left, 15, title)
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




# ---- the PNG file itself (8-bit RGB, unfiltered rows): shared with training/lineplot.py
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
