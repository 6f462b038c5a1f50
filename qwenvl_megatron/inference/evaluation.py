"""Scoring generated answers: captions, VQA and grounding (the metrics of tools/evaluate.py).

- caption: on the synthetic corpus (the reference caption names exactly one of its colours and one of
  its shapes) a caption is right when it names that colour AND that shape and no other colour or shape;
  otherwise, exact match after normalisation.
- vqa: exact match after normalisation (case, surrounding space, a final full stop).
- grounding: the first `<box>` of the answer (the prompt opened it) against the record's pixel box,
  right at IoU >= 0.5.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..data.synthetic import COLOURS, SHAPES
from .boxes import iou, parse_boxes

IOU_THRESHOLD = 0.5
SCORED_TASKS = ("caption", "vqa", "grounding")


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def _named(text: str, words) -> set[str]:
    return {w for w in words if re.search(rf"\b{re.escape(w)}\b", text.lower())}


def caption_correct(prediction: str, reference: str) -> bool:
    colours, shapes = _named(reference, COLOURS), _named(reference, SHAPES)
    if len(colours) == 1 and len(shapes) == 1:  # a synthetic-corpus caption
        return _named(prediction, COLOURS) == colours and _named(prediction, SHAPES) == shapes
    return normalise(prediction) == normalise(reference)


def vqa_correct(prediction: str, answer: str) -> bool:
    return normalise(prediction) == normalise(answer)


def grounding_iou(prediction: str, box: list[float], width: float, height: float) -> float:
    """IoU of the answer's first box (the prompt ended with `<box>`) with the reference pixel box; 0 when
    the answer holds no well-formed box."""
    boxes = parse_boxes(prediction, prefix="<box>")
    if not boxes:
        return 0.0
    return iou(boxes[0].to_pixels(width, height), box)


@dataclass
class TaskScore:
    count: int = 0
    correct: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0


def score_record(record: dict, prediction: str) -> tuple[bool, dict]:
    """(right?, details) for one record of a scored task."""
    task = record["task"]
    if task == "caption":
        return caption_correct(prediction, record["caption"]), {}
    if task == "vqa":
        return vqa_correct(prediction, record["answer"]), {}
    if task == "grounding":
        value = grounding_iou(prediction, record["box"], record["width"], record["height"])
        return value >= IOU_THRESHOLD, {"iou": round(value, 4)}
    raise ValueError(f"task {task!r} is not scored; scored tasks: {SCORED_TASKS}")


METRIC_NAMES = {"caption": "colour+shape / exact match", "vqa": "exact match",
                "grounding": f"accuracy @ IoU>={IOU_THRESHOLD}"}


def format_table(scores: dict[str, TaskScore], skipped: dict[str, int]) -> str:
    rows = [("task", "samples", "metric", "score")]
    for task, s in scores.items():
        rows.append((task, str(s.count), METRIC_NAMES[task], f"{100 * s.accuracy:.2f}%"))
    for task, n in skipped.items():
        rows.append((task, str(n), "not scored", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(rows[0]), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows[1:]])
