"""Grounding boxes in generated text: parse `<ref>..</ref><box>(x1,y1),(x2,y2)</box>`, IoU, drawing.

Coordinates in text are integers on the [0, 1000) grid of the image (reference section 3); pixel boxes
are `[x1, y1, x2, y2]`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.formats import COORDINATE_BINS

_BOX = re.compile(r"(?:<ref>(?P<ref>.*?)</ref>\s*)?<box>\s*\((?P<x1>-?\d+),(?P<y1>-?\d+)\)\s*,\s*"
                  r"\((?P<x2>-?\d+),(?P<y2>-?\d+)\)\s*</box>", re.S)


@dataclass
class Box:
    phrase: str | None
    grid: tuple[int, int, int, int]  # on the [0, 1000) grid

    def to_pixels(self, width: float, height: float) -> list[float]:
        x1, y1, x2, y2 = self.grid
        return [x1 / COORDINATE_BINS * width, y1 / COORDINATE_BINS * height,
                x2 / COORDINATE_BINS * width, y2 / COORDINATE_BINS * height]


def parse_boxes(text: str, prefix: str = "") -> list[Box]:
    """Every `<box>(x1,y1),(x2,y2)</box>` in `prefix + text`, with the `<ref>` phrase just before it.

    `prefix` lets a grounding answer be parsed together with its prompt, which already opened `<box>`.
    """
    return [Box(m.group("ref"), tuple(int(m.group(k)) for k in ("x1", "y1", "x2", "y2")))
            for m in _BOX.finditer(prefix + text)]


def iou(a, b) -> float:
    """Intersection over union of two `[x1, y1, x2, y2]` boxes (corners in any order)."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def draw_boxes(image_path: str, boxes: list[Box], out_png: str, colour=(255, 0, 0)) -> None:
    """The image with each box outlined and its phrase written above it, saved as PNG."""
    from PIL import Image, ImageDraw

    with Image.open(image_path) as im:
        im = im.convert("RGB")
    draw = ImageDraw.Draw(im)
    width = max(1, round(min(im.size) / 100))
    for box in boxes:
        x1, y1, x2, y2 = box.to_pixels(*im.size)
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=width)
        if box.phrase:
            draw.text((min(x1, x2) + 2, max(0, min(y1, y2) - 12)), box.phrase, fill=colour)
    im.save(out_png, format="PNG")
