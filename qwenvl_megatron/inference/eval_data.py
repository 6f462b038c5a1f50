"""Evaluation data in the layouts benchmarks ship in, as records of the data contract (docs/conversion.md,
"Metrics"). Every record comes back with `task` set and `image` an absolute path.

- records (JSONL / JSON list) with `task` caption / vqa / grounding; a caption record may carry several
  references (`captions`), a VQA record the annotators' `answers` (VQAv2) or one `answer`;
- the same without `task`, as the release's evaluation files are: `sent` + `bbox` (RefCOCO/+/g: pixel box
  x1,y1,x2,y2, with `width`/`height`) is grounding, `question` + `answer(s)` is VQA, `captions` a caption;
- a COCO caption annotation file (`{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`: COCO Karpathy test, Flickr30K, NoCaps): one caption record per image with all its captions;
- ChatML records (`conversations`, the fine-tuning format) whose last turn is the assistant's: the turns
  before it are the prompt, its value the reference answer (task `chat`); `<img>` paths inside the turns
  are resolved like `image`;
- VQAv2's pair: the questions file (`{"questions": [...], "data_subtype": "val2014"}`) as the data and its
  annotations file (`vqa_annotations`); images are `COCO_<data_subtype>_<image_id:012d>.jpg`.
Image paths are relative to `image_root` when given, else to the data file's directory.
"""
from __future__ import annotations

import json
import os
import re

from ..data.formats import CHAT_ROLES, iter_records

TASK_FIELDS = {"caption": ("image",), "vqa": ("image", "question"),
               "grounding": ("image", "phrase", "box", "width", "height")}


def _image(ref: str, data_path: str, image_root: str | None) -> str:
    if os.path.isabs(ref):
        return ref
    return os.path.abspath(os.path.join(image_root or os.path.dirname(os.path.abspath(data_path)), ref))


_IMAGE_TAG = re.compile(r"<img>(.*?)</img>", re.S)


def _chat(rec: dict, where: str, data_path: str, image_root: str | None) -> dict:
    """A ChatML record to score: `task` chat, image paths inside the turns made absolute."""
    turns = rec["conversations"]
    if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns)
            and CHAT_ROLES.get(turns[-1].get("from")) == "assistant"
            and CHAT_ROLES.get(turns[-2].get("from")) == "user"):
        raise ValueError(f"{where}: a chat record to score ends with a user turn and the assistant's reference")
    resolve = lambda m: f"<img>{_image(m.group(1).strip(), data_path, image_root)}</img>"  # noqa: E731
    return {**rec, "task": "chat",
            "conversations": [dict(t, value=_IMAGE_TAG.sub(resolve, str(t.get("value", "")))) for t in turns]}


def chat_prompt(record: dict) -> tuple[list[dict], str, list[str]]:
    """A scored chat record -> (the turns to prompt with, the reference answer, image paths in order)."""
    turns = record["conversations"]
    images = [m.strip() for t in turns[:-1] for m in _IMAGE_TAG.findall(t["value"])]
    return turns[:-1], turns[-1]["value"], images


def _infer_task(rec: dict) -> dict:
    """A release-layout record without `task` -> a record of the data contract."""
    if "task" in rec or "conversations" in rec:
        return rec
    if "sent" in rec and "bbox" in rec:
        return {**rec, "task": "grounding", "phrase": rec["sent"], "box": rec["bbox"]}
    if "question" in rec and ("answers" in rec or "answer" in rec):
        return {**rec, "task": "vqa"}
    if "captions" in rec or "caption" in rec:
        return {**rec, "task": "caption"}
    return rec


def _coco_captions(raw: dict, path: str, image_root: str | None):
    refs: dict = {}
    for a in raw["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    for im in raw["images"]:
        if im["id"] not in refs:
            continue
        yield (f"{os.path.basename(path)}:image {im['id']}",
               {"task": "caption", "image": _image(im["file_name"], path, image_root), "image_id": im["id"],
                "captions": refs[im["id"]]})


def _vqav2(raw: dict, path: str, annotations: str, image_root: str | None):
    with open(annotations, encoding="utf-8") as f:
        by_q = {a["question_id"]: a for a in json.load(f)["annotations"]}
    subtype = raw.get("data_subtype", "val2014")
    for q in raw["questions"]:
        if q["question_id"] not in by_q:
            raise ValueError(f"{annotations} has no answers for question {q['question_id']} of {path}")
        name = f"COCO_{subtype}_{q['image_id']:012d}.jpg"
        yield (f"{os.path.basename(path)}:question {q['question_id']}",
               {"task": "vqa", "image": _image(name, path, image_root), "question": q["question"],
                "question_id": q["question_id"],
                "answers": [a["answer"] for a in by_q[q["question_id"]]["answers"]]})


def load_eval_records(path: str, image_root: str | None = None, vqa_annotations: str | None = None):
    """Yields (where, record) pairs; records of unscored tasks pass through unchanged (task from `record_task`
    as in training data). A record of a scored task missing a field is an error naming `where` and the field."""
    raw = None
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    if vqa_annotations is not None:
        if not (isinstance(raw, dict) and "questions" in raw):
            raise ValueError(f"--vqa-annotations needs a VQAv2 questions file as --data; {path} has no 'questions'")
        yield from _vqav2(raw, path, vqa_annotations, image_root)
        return
    if isinstance(raw, dict) and "annotations" in raw and "images" in raw:
        yield from _coco_captions(raw, path, image_root)
        return
    for where, rec in iter_records(path):
        rec = _infer_task(rec) if isinstance(rec, dict) else rec
        task = rec.get("task") if isinstance(rec, dict) else None
        if isinstance(rec, dict) and "conversations" in rec:
            rec = _chat(rec, where, path, image_root)
        elif task in TASK_FIELDS:
            for fld in TASK_FIELDS[task]:
                if fld not in rec:
                    raise ValueError(f"{where}: a {task} record needs '{fld}'")
            if task == "caption" and "caption" not in rec and "captions" not in rec:
                raise ValueError(f"{where}: a caption record needs 'caption' or 'captions'")
            if task == "vqa" and "answer" not in rec and "answers" not in rec:
                raise ValueError(f"{where}: a vqa record needs 'answer' or 'answers'")
            rec = {**rec, "image": _image(rec["image"], path, image_root)}
        yield where, rec
