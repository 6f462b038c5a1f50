"""Raw records -> (tokens, labels, image references): the task templates and ChatML of Qwen-VL.

Every template is built from *pieces*: text pieces encoded separately with ``tokenizer.encode`` and
special ids taken from the tokenizer, each piece marked supervised or not. Building from pieces (rather
than tokenising one big string with special tokens allowed) keeps user text from ever producing special
ids and makes the layout exact and testable. docs/data_formats.md describes every layout.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .tokenizer import (BOX_END, BOX_START, QUAD_END, QUAD_START, REF_END, REF_START, Tokenizer)

IGNORE_INDEX = -100
DEFAULT_NUM_IMAGE_TOKENS = 256
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
COORDINATE_BINS = 1000  # coordinates are integers on the [0, 1000) grid

CAPTION_PROMPT = "Generate the caption in English:"
GROUNDED_CAPTION_PROMPT = "Generate the caption in English with grounding:"
OCR_PROMPT = "OCR with grounding:"
VQA_SUFFIX = " Answer:"
EVAL_CAPTION_PROMPT = "Describe the image in English:"  # the release's caption evaluation prompt

TASKS = ("caption", "vqa", "grounding", "referring", "grounded_caption", "ocr", "text")
CHAT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# Fixed template strings: the tokenizer trainer adds them so the demo vocabulary covers them.
TEMPLATE_TEXTS = (CAPTION_PROMPT, GROUNDED_CAPTION_PROMPT, OCR_PROMPT, VQA_SUFFIX, EVAL_CAPTION_PROMPT,
                  DEFAULT_SYSTEM_MESSAGE, "system\n", "user\n", "assistant\n", "Picture 1: ", "Picture 2: ")

_IMAGE_IN_TEXT = re.compile(r"<img>(.*?)</img>", re.S)
_IMAGE_URL = re.compile(r"^\s*(https?|s3|gs)://", re.I)  # remote images: fetched before preprocessing, never during
_PICTURE_ANNOUNCED = re.compile(r"Picture \d+:\s*$")
_GROUNDING_TAG = re.compile("|".join(re.escape(t) for t in
                                     (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)))


class RecordError(ValueError):
    """A raw record cannot become a sample; the message names the file/line or sample id."""


class MalformedRecordError(RecordError):
    """A field is missing or has the wrong type / value, or the task is unknown."""


class SampleTooLongError(RecordError):
    """The encoded sample exceeds ``max_length`` and the policy does not allow cutting it."""


@dataclass
class Sample:
    """One training sample. ``labels[i] == tokens[i]`` where token i carries loss, else -100 (the shift to
    next-token targets happens in the model/loss). ``images`` are the references of the <img> spans in order,
    as written in the record."""

    tokens: np.ndarray
    labels: np.ndarray
    images: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, dtype=np.int32)
        self.labels = np.asarray(self.labels, dtype=np.int32)
        if self.tokens.ndim != 1 or self.tokens.shape != self.labels.shape:
            raise ValueError(f"tokens {self.tokens.shape} and labels {self.labels.shape} must be equal 1-D")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _describe(record: Any, where: str | None) -> str:
    parts = [where] if where else []
    if isinstance(record, dict) and "id" in record:
        parts.append(f"id={record['id']!r}")
    return " ".join(parts) if parts else "record"


class _SampleBuilder:
    """Accumulates token pieces with their loss flag, image references and where image spans end."""

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.tok = tokenizer
        self.num_image_tokens = num_image_tokens
        self.tokens: list[int] = []
        self.loss: list[bool] = []
        self.images: list[str] = []
        self.image_spans_end = 0  # index just after the last </img>

    def ids(self, ids: list[int], loss: bool) -> None:
        self.tokens += ids
        self.loss += [loss] * len(ids)

    def text(self, text: str, loss: bool) -> None:
        self.ids(self.tok.encode(text), loss)

    def special(self, token: str, loss: bool) -> None:
        self.ids([self.tok.token_id(token)], loss)

    def tagged_text(self, text: str, loss: bool) -> None:
        """Text in which grounding tags (<ref>, <box>, <quad> and their ends) become special ids."""
        start = 0
        for match in _GROUNDING_TAG.finditer(text):
            if match.start() > start:
                self.text(text[start:match.start()], loss)
            self.special(match.group(), loss)
            start = match.end()
        if start < len(text):
            self.text(text[start:], loss)

    def image(self, reference: str) -> None:
        """<img> + N x <imgpad> + </img>; never supervised (the model cannot predict pixels)."""
        tok = self.tok
        self.ids([tok.img_start_id] + [tok.img_pad_id] * self.num_image_tokens + [tok.img_end_id], False)
        self.images.append(reference)
        self.image_spans_end = len(self.tokens)

    def eod(self, loss: bool = True) -> None:
        self.ids([self.tok.eod_id], loss)

    def build(self) -> Sample:
        tokens = np.asarray(self.tokens, dtype=np.int32)
        labels = np.where(np.asarray(self.loss, dtype=bool), tokens, IGNORE_INDEX).astype(np.int32)
        return Sample(tokens, labels, list(self.images))


# ----------------------------------------------------------------------------------------- fields
def _get(record: dict, name: str, task: str, where: str | None) -> Any:
    if name not in record:
        raise MalformedRecordError(f"{_describe(record, where)}: missing field '{name}' (task '{task}')")
    return record[name]


def _text_field(record: dict, name: str, task: str, where: str | None) -> str:
    value = _get(record, name, task, where)
    if not isinstance(value, str) or not value.strip():
        raise MalformedRecordError(f"{_describe(record, where)}: field '{name}' (task '{task}') must be a "
                                   f"non-empty string, got {value!r:.80}")
    return value.strip()


def _size_field(record: dict, name: str, task: str, where: str | None) -> float:
    value = _get(record, name, task, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MalformedRecordError(f"{_describe(record, where)}: field '{name}' (task '{task}') must be a "
                                   f"positive number, got {value!r}")
    return float(value)


def _coordinates(values: Any, count: int, name: str, record: dict, where: str | None) -> list[float]:
    if (not isinstance(values, (list, tuple)) or len(values) != count
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in values)):
        raise MalformedRecordError(f"{_describe(record, where)}: field '{name}' must be a list of {count} "
                                   f"numbers, got {values!r:.80}")
    return [float(v) for v in values]


def to_grid(value: float, size: float) -> int:
    """A pixel coordinate -> integer on the [0, 1000) grid: ``int(value / size * 1000)``, clipped."""
    return min(max(int(value / size * COORDINATE_BINS), 0), COORDINATE_BINS - 1)


def format_points(coords: list[float], width: float, height: float) -> str:
    """``[x1, y1, x2, y2, ...]`` in pixels -> ``"(x1,y1),(x2,y2),..."`` on the [0, 1000) grid."""
    return ",".join(f"({to_grid(x, width)},{to_grid(y, height)})" for x, y in zip(coords[::2], coords[1::2]))


# -------------------------------------------------------------------------------------- templates
def _image_and_size(b: _SampleBuilder, record: dict, task: str, where: str | None) -> tuple[float, float]:
    b.image(_text_field(record, "image", task, where))
    return _size_field(record, "width", task, where), _size_field(record, "height", task, where)


def _box_text(record: dict, box: Any, name: str, width: float, height: float, where: str | None) -> str:
    """A ``[x1, y1, x2, y2]`` pixel box (top-left, bottom-right) as grid text; an inverted box (x1 > x2 or
    y1 > y2) is refused rather than written as given."""
    x1, y1, x2, y2 = _coordinates(box, 4, name, record, where)
    if x1 > x2 or y1 > y2:
        axis = "x1 > x2" if x1 > x2 else "y1 > y2"
        raise MalformedRecordError(f"{_describe(record, where)}: field '{name}' {box!r:.80} is inverted ({axis}); "
                                   f"boxes are [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2")
    return format_points([x1, y1, x2, y2], width, height)


def _encode_caption(b: _SampleBuilder, r: dict, where: str | None) -> None:
    b.image(_text_field(r, "image", "caption", where))
    b.text(CAPTION_PROMPT, False)
    b.text(" " + _text_field(r, "caption", "caption", where), True)
    b.eod()


def _encode_vqa(b: _SampleBuilder, r: dict, where: str | None) -> None:
    b.image(_text_field(r, "image", "vqa", where))
    b.text(_text_field(r, "question", "vqa", where) + VQA_SUFFIX, False)
    b.text(" " + _text_field(r, "answer", "vqa", where), True)
    b.eod()


def _encode_grounding(b: _SampleBuilder, r: dict, where: str | None) -> None:
    width, height = _image_and_size(b, r, "grounding", where)
    phrase = _text_field(r, "phrase", "grounding", where)
    box = _box_text(r, _get(r, "box", "grounding", where), "box", width, height, where)
    b.special(REF_START, False), b.text(phrase, False), b.special(REF_END, False)
    b.special(BOX_START, True), b.text(box, True), b.special(BOX_END, True)
    b.eod()


def _encode_referring(b: _SampleBuilder, r: dict, where: str | None) -> None:
    """Box -> phrase: the mirror image of grounding. The box is given, ``<ref>`` is opened in the prefix,
    and the model writes the phrase and closes the ``</ref>``."""
    width, height = _image_and_size(b, r, "referring", where)
    box = _box_text(r, _get(r, "box", "referring", where), "box", width, height, where)
    phrase = _text_field(r, "phrase", "referring", where)
    b.special(BOX_START, False), b.text(box, False), b.special(BOX_END, False), b.special(REF_START, False)
    b.text(phrase, True), b.special(REF_END, True)
    b.eod()


def _locate_refs(caption: str, refs: Any, record: dict, where: str | None) -> list[tuple[int, int, Any]]:
    """(start, end, box) of each ref's phrase in the caption: the first occurrence not already taken."""
    if not isinstance(refs, list) or not refs:
        raise MalformedRecordError(f"{_describe(record, where)}: field 'refs' (task 'grounded_caption') must "
                                   f"be a non-empty list of {{'phrase', 'box'}} objects")
    taken: list[tuple[int, int, Any]] = []
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise MalformedRecordError(f"{_describe(record, where)}: refs[{k}] must be an object")
        phrase = _text_field(ref, "phrase", "grounded_caption", where)
        box = _get(ref, "box", "grounded_caption", where)
        start = caption.find(phrase)
        while start >= 0 and any(start < e and start + len(phrase) > s for s, e, _ in taken):
            start = caption.find(phrase, start + 1)
        if start < 0:
            raise MalformedRecordError(f"{_describe(record, where)}: refs[{k}].phrase {phrase!r} does not occur "
                                       f"(again) in the caption {caption!r:.120}")
        taken.append((start, start + len(phrase), box))
    return sorted(taken, key=lambda t: t[0])


def _encode_grounded_caption(b: _SampleBuilder, r: dict, where: str | None) -> None:
    width, height = _image_and_size(b, r, "grounded_caption", where)
    caption = " " + _text_field(r, "caption", "grounded_caption", where)
    spans = _locate_refs(caption, _get(r, "refs", "grounded_caption", where), r, where)
    b.text(GROUNDED_CAPTION_PROMPT, False)
    cursor = 0
    for start, end, box in spans:
        if start > cursor:
            b.text(caption[cursor:start], True)
        b.special(REF_START, True), b.text(caption[start:end], True), b.special(REF_END, True)
        b.special(BOX_START, True), b.text(_box_text(r, box, "refs[].box", width, height, where), True)
        b.special(BOX_END, True)
        cursor = end
    if cursor < len(caption):
        b.text(caption[cursor:], True)
    b.eod()


def _encode_ocr(b: _SampleBuilder, r: dict, where: str | None) -> None:
    width, height = _image_and_size(b, r, "ocr", where)
    texts = _get(r, "texts", "ocr", where)
    if not isinstance(texts, list) or not texts:
        raise MalformedRecordError(f"{_describe(r, where)}: field 'texts' (task 'ocr') must be a non-empty "
                                   f"list of {{'text', 'quad'}} objects")
    b.text(OCR_PROMPT, False)
    for k, item in enumerate(texts):
        if not isinstance(item, dict):
            raise MalformedRecordError(f"{_describe(r, where)}: texts[{k}] must be an object")
        text = _text_field(item, "text", "ocr", where)
        quad = format_points(_coordinates(_get(item, "quad", "ocr", where), 8, f"texts[{k}].quad", r, where),
                             width, height)
        b.special(REF_START, True), b.text(text, True), b.special(REF_END, True)
        b.special(QUAD_START, True), b.text(quad, True), b.special(QUAD_END, True)
    b.eod()


def _encode_text(b: _SampleBuilder, r: dict, where: str | None) -> None:
    text = _get(r, "text", "text", where)
    if not isinstance(text, str) or not text.strip():
        raise MalformedRecordError(f"{_describe(r, where)}: field 'text' (task 'text') must be a non-empty string")
    b.text(text, True)  # kept verbatim: whitespace is part of what the model learns here
    b.eod()


_TASK_ENCODERS = {
    "caption": _encode_caption,
    "vqa": _encode_vqa,
    "grounding": _encode_grounding,
    "referring": _encode_referring,
    "grounded_caption": _encode_grounded_caption,
    "ocr": _encode_ocr,
    "text": _encode_text,
}


# ----------------------------------------------------------------------------------------- ChatML
def _chat_content(b: _SampleBuilder, text: str, loss: bool, picture_count: list[int],
                  record: dict, where: str | None) -> None:
    """A turn's value: each ``<img>ref</img>`` becomes an image span announced as ``Picture n: ``
    (unless the text already announces it), grounding tags become special ids, the rest is plain text."""
    start = 0
    for match in _IMAGE_IN_TEXT.finditer(text):
        before = text[start:match.start()]
        picture_count[0] += 1
        if not _PICTURE_ANNOUNCED.search(text[:match.start()]):
            before += f"Picture {picture_count[0]}: "
        _check_no_stray_image_tag(before, record, where)
        b.tagged_text(before, loss)
        reference = match.group(1).strip()
        if not reference:
            raise MalformedRecordError(f"{_describe(record, where)}: empty <img></img> in a conversation turn")
        b.image(reference)
        start = match.end()
    _check_no_stray_image_tag(text[start:], record, where)
    b.tagged_text(text[start:], loss)


def _check_no_stray_image_tag(text: str, record: dict, where: str | None) -> None:
    if "<img>" in text or "</img>" in text:
        raise MalformedRecordError(f"{_describe(record, where)}: unmatched <img>/</img> in a conversation turn")


def _chat_turn(b: _SampleBuilder, role: str, content: str, content_loss: bool, picture_count: list[int],
               record: dict, where: str | None, close: bool = True) -> None:
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n``. As the release's finetune script: <|im_start|>,
    <|im_end|> and the newline after it are supervised in every turn; role name and its newline are not."""
    tok = b.tok
    b.ids([tok.im_start_id], True)
    b.text(role, False)
    b.text("\n", False)
    if role == "system":
        b.text(content, False)
    else:
        _chat_content(b, content, content_loss, picture_count, record, where)
    if close:
        b.ids([tok.im_end_id], True)
        b.text("\n", True)


def _conversation_turns(record: dict, where: str | None) -> list[tuple[str, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise MalformedRecordError(f"{_describe(record, where)}: field 'conversations' must be a non-empty list")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise MalformedRecordError(f"{_describe(record, where)}: conversations[{k}] is missing field "
                                       f"'{'from' if isinstance(turn, dict) and 'value' in turn else 'value'}'")
        role = CHAT_ROLES.get(turn["from"])
        if role is None:
            raise MalformedRecordError(f"{_describe(record, where)}: conversations[{k}].from is {turn['from']!r}; "
                                       f"expected one of {sorted(CHAT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise MalformedRecordError(f"{_describe(record, where)}: conversations[{k}].value must be a string")
        out.append((role, turn["value"]))
    return out


def _system_message(record: dict, where: str | None) -> str:
    system = record.get("system", DEFAULT_SYSTEM_MESSAGE)
    if not isinstance(system, str):
        raise MalformedRecordError(f"{_describe(record, where)}: field 'system' must be a string")
    return system


def _encode_chat(b: _SampleBuilder, r: dict, where: str | None) -> None:
    pictures = [0]
    _chat_turn(b, "system", _system_message(r, where), False, pictures, r, where)
    for role, value in _conversation_turns(r, where):
        _chat_turn(b, role, value, role == "assistant", pictures, r, where)


# --------------------------------------------------------------------------------------- public API
def record_task(record: Any, where: str | None = None) -> str:
    """The record's task name; ChatML records (with ``conversations``) are ``"chat"``."""
    if isinstance(record, BadRecord):
        raise MalformedRecordError(record.reason)
    if not isinstance(record, dict):
        raise MalformedRecordError(f"{_describe(record, where)}: a record must be a JSON object, "
                                   f"got {type(record).__name__}")
    if "conversations" in record:
        return "chat"
    task = _get(record, "task", "?", where)
    if not isinstance(task, str) or task not in _TASK_ENCODERS:  # e.g. "task": [] (unhashable)
        raise MalformedRecordError(f"{_describe(record, where)}: unknown task {task!r}; expected one of "
                                   f"{list(TASKS)} or a ChatML record with 'conversations'")
    return task


def encode_record(record: dict, tokenizer: Tokenizer, num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
                  max_length: int | None = None, too_long: str = "reject", where: str | None = None) -> Sample:
    """Encode one raw record (any task of the data contract, or ChatML) into a :class:`Sample`.

    ``too_long``: "reject" raises :class:`SampleTooLongError` when the sample exceeds ``max_length``;
    "truncate" cuts tokens at the end, but rejects instead when the cut would remove any part of an image
    span or leave no supervised token. ``where`` (e.g. ``"train.jsonl:17"``) goes into error messages.
    """
    if too_long not in ("reject", "truncate"):
        raise ValueError(f"too_long must be 'reject' or 'truncate', got {too_long!r}")
    task = record_task(record, where)
    builder = _SampleBuilder(tokenizer, num_image_tokens)
    (_encode_chat if task == "chat" else _TASK_ENCODERS[task])(builder, record, where)
    sample = builder.build()
    _refuse_image_urls(record, task, sample.images, where)
    if max_length is None or len(sample) <= max_length:
        return sample
    what = f"{_describe(record, where)}: {len(sample)} tokens > max_length {max_length}"
    if too_long == "reject":
        raise SampleTooLongError(f"{what} (too_long='reject')")
    if max_length < builder.image_spans_end:
        raise SampleTooLongError(f"{what}, and truncating would cut an image span (images end at token "
                                 f"{builder.image_spans_end})")
    cut = Sample(sample.tokens[:max_length], sample.labels[:max_length], sample.images)
    if cut.num_loss_tokens == 0:
        raise SampleTooLongError(f"{what}, and truncating would leave no supervised token")
    return cut


def _refuse_image_urls(record: dict, task: str, images: list[str], where: str | None) -> None:
    """An image given as a URL (http, https, s3, gs) is a malformed record naming the field: preprocessing
    reads local files only (docs/data_formats.md: fetch the images first with img2dataset)."""
    for reference in images:
        if not _IMAGE_URL.match(reference):
            continue
        name = "image"
        if task == "chat":
            k = next((k for k, turn in enumerate(record["conversations"])
                      if reference in (m.strip() for m in _IMAGE_IN_TEXT.findall(turn["value"]))), None)
            name = f"conversations[{k}].value" if k is not None else "conversations"
        raise MalformedRecordError(f"{_describe(record, where)}: field '{name}' (task '{task}') names an image by URL "
                                   f"({reference.strip()!r:.100}); images are not downloaded during preprocessing: "
                                   f"fetch them first (img2dataset, docs/data_formats.md) and give local paths "
                                   f"or the WebDataset shards")


def prompt_for(task: str, tokenizer: Tokenizer, num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
               **fields: Any) -> list[int]:
    """Token ids of an evaluation / generation prompt; the model continues from the last id.

    - ``caption`` (image): ``<img>..</img>Describe the image in English:`` (the release's eval prompt)
    - ``vqa`` (image, question): ``<img>..</img>{question} Answer:``
    - ``grounding`` (image, phrase): ``<img>..</img><ref>{phrase}</ref><box>``
    - ``referring`` (image, width, height, box): ``<img>..</img><box>(..),(..)</box><ref>``
    - ``grounded_caption`` / ``ocr`` (image): the training prefix of that task
    - ``chat`` (question, optional image, system, or ``conversations`` ending with a user turn):
      the ChatML history followed by ``<|im_start|>assistant\\n``
    """
    b = _SampleBuilder(tokenizer, num_image_tokens)
    r = dict(fields, task=task)
    where = f"prompt_for({task!r})"
    if task == "caption":
        b.image(_text_field(r, "image", task, where))
        b.text(EVAL_CAPTION_PROMPT, False)
    elif task == "vqa":
        b.image(_text_field(r, "image", task, where))
        b.text(_text_field(r, "question", task, where) + VQA_SUFFIX, False)
    elif task == "grounding":
        b.image(_text_field(r, "image", task, where))
        b.special(REF_START, False), b.text(_text_field(r, "phrase", task, where), False)
        b.special(REF_END, False), b.special(BOX_START, False)
    elif task == "referring":
        width, height = _image_and_size(b, r, task, where)
        b.special(BOX_START, False), b.text(_box_text(r, _get(r, "box", task, where), "box", width, height,
                                                      where), False)
        b.special(BOX_END, False), b.special(REF_START, False)
    elif task in ("grounded_caption", "ocr"):
        b.image(_text_field(r, "image", task, where))
        b.text(GROUNDED_CAPTION_PROMPT if task == "grounded_caption" else OCR_PROMPT, False)
    elif task == "chat":
        if "conversations" in r:
            turns = _conversation_turns(r, where)
            if turns[-1][0] != "user":
                raise MalformedRecordError(f"{where}: the last turn of 'conversations' must be the user's")
        else:
            question = _text_field(r, "question", task, where)
            image = r.get("image")
            turns = [("user", (f"<img>{image}</img>\n" if image else "") + question)]
        pictures = [0]
        _chat_turn(b, "system", _system_message(r, where), False, pictures, r, where)
        for role, value in turns:
            _chat_turn(b, role, value, False, pictures, r, where)
        _chat_turn(b, "assistant", "", False, pictures, r, where, close=False)
    else:
        raise ValueError(f"prompt_for: unknown task {task!r}; expected one of "
                         f"{['caption', 'vqa', 'grounding', 'referring', 'grounded_caption', 'ocr', 'chat']}")
    return list(b.tokens)


# ------------------------------------------------------------------------------------- raw files
@dataclass
class BadRecord:
    """Stands in for a record of a `.json` list that cannot be read (bytes that are not UTF-8): the reason
    names the file and line. `encode_record` raises it as a MalformedRecordError, so it becomes a reject."""

    reason: str


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def decode_utf8(raw: bytes, where: str) -> str:
    """One line of a raw file as text; bytes that are not UTF-8 are a MalformedRecordError naming `where`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedRecordError(f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                                   f"{e.reason}") from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def read_json_list(path: str) -> list:
    """The records of a `.json` file holding a list of objects (the release's fine-tune format); a single
    object counts as a list of one. A record containing bytes that are not UTF-8 becomes a `BadRecord`
    naming the file, line and index (the other records are still read); invalid JSON raises for the file."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()

    def value(pos):
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise MalformedRecordError(f"{path}: invalid JSON: {e}") from None

    def invalid(what, pos):
        raise MalformedRecordError(f"{path}: invalid JSON: {what} (line {_line_of(text, pos)})")

    pos = _JSON_SPACE.match(text, 0).end()
    spans: list[tuple[Any, int, int]] = []
    if text.startswith("[", pos):
        pos = _JSON_SPACE.match(text, pos + 1).end()
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                record, end = value(pos)
                spans.append((record, pos, end))
                pos = _JSON_SPACE.match(text, end).end()
                if text.startswith(",", pos):
                    pos = _JSON_SPACE.match(text, pos + 1).end()
                elif text.startswith("]", pos):
                    pos += 1
                    break
                else:
                    invalid("expected ',' or ']' after a record", pos)
    elif text.startswith("{", pos):
        record, end = value(pos)
        spans.append((record, pos, end))
        pos = end
    else:
        if pos < len(text):
            value(pos)  # valid JSON that is not a list: the error below; invalid JSON: its own error
        raise MalformedRecordError(f"{path}: expected a JSON list of records")
    if _JSON_SPACE.match(text, pos).end() != len(text):
        invalid("extra data after the list", pos)
    records = []
    for i, (record, start, end) in enumerate(spans):
        bad = _ESCAPED_BYTE.search(text, start, end)
        if bad:
            byte = ord(bad.group()) - 0xDC00
            record = BadRecord(f"{path}:{_line_of(text, bad.start())}: invalid UTF-8 (byte 0x{byte:02x}) in "
                               f"record [{i}]")
        records.append(record)
    return records


def iter_records(path: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` from a ``.jsonl`` file (one object per line) or a ``.json`` file holding a
    list of objects (the release's fine-tune format). ``where`` is ``"file:line"`` or ``"file[index]"``.
    Invalid JSON or bytes that are not UTF-8 raise MalformedRecordError naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith(".json"):
        for i, record in enumerate(read_json_list(path)):
            if isinstance(record, BadRecord):
                raise MalformedRecordError(record.reason)
            yield f"{path}[{i}]", record
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = decode_utf8(raw, f"{path}:{line_no}")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MalformedRecordError(f"{path}:{line_no}: invalid JSON: {e}") from None
            yield f"{path}:{line_no}", record


def resolve_image_path(reference: str, data_file: str) -> str:
    """Image references are relative to the directory of the data file that names them, unless absolute."""
    if os.path.isabs(reference):
        return reference
    return os.path.join(os.path.dirname(os.path.abspath(data_file)), reference)


def record_texts(record: dict) -> list[str]:
    """The natural-language text fields of a record (for tokenizer training): no paths, no coordinates."""
    texts: list[str] = []
    for key in ("caption", "question", "answer", "phrase", "text", "system"):
        if isinstance(record.get(key), str):
            texts.append(record[key])
    for key, sub in (("refs", "phrase"), ("texts", "text")):
        for item in record.get(key) or []:
            if isinstance(item, dict) and isinstance(item.get(sub), str):
                texts.append(item[sub])
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            texts.append(_IMAGE_IN_TEXT.sub("", turn["value"]))
    return [t for t in texts if t.strip()]
