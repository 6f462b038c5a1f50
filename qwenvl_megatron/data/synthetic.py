"""A small synthetic vision-language corpus a tiny Qwen-VL can actually learn on a CPU.

Each image holds ONE big coloured shape at a position named by a 3x3 grid word, on a plain or lightly
noisy background; some also carry a rendered word (for OCR). Every fact in the text (colour, shape,
position, box, word, quad) is true of its image, and the vocabulary is ~30 words, so a small model's
captions, answers and boxes can be checked exactly. Everything is a function of the seed: the same
seed gives byte-identical files, whatever the number of worker processes.

Files written into ``out_dir`` (image paths in records are relative to it, per the data contract):
``images/{train,heldout}/NNNNNN.png``, ``stage1.jsonl`` (captions), ``stage2.jsonl`` (all 7 tasks),
``stage3.json`` (ChatML list, some multi-turn, some two-image), ``heldout.jsonl`` (captions of images
no training file uses), ``heldout_chat.jsonl`` (the same images asked stage 3's "what is in the picture?" in
ChatML, the caption as the reference answer), ``corpus.txt`` (the training text, for a tokenizer) and
``info.json``.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .formats import record_texts

COLOURS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215), "yellow": (230, 195, 20),
    "purple": (135, 55, 175), "orange": (240, 130, 20), "cyan": (30, 180, 195), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# Text ink: every channel >= 60, so neither the ink nor its antialiased blend with the (light) background can
# equal a shape colour (each has a channel < 60): a shape's pixels are exactly those of its colour.
TEXT_COLOUR = (60, 60, 60)
WORDS = ("HELLO", "QWEN", "STOP", "OPEN", "EXIT", "SALE")  # rendered for OCR
# The shape's radius as a fraction of the image side. A shape must lie wholly inside the image with its centre
# inside the named cell of the 3x3 grid, so an edge cell caps it at 1/3 - CELL_MARGIN (0.293): the upper end
# is only reached in the centre cell. Big shapes matter: a tiny ViT at 112 px did not learn shape from radii
# 0.12-0.25 in the demo's budget (docs/demo.md).
RADIUS_RANGE = (0.22, 0.40)
CELL_MARGIN = 0.04  # keep centres this far (fraction of side) inside their grid cell: no borderline positions
WORD_PROBABILITY = 0.35
NOISY_PROBABILITY = 0.5
VQA_QUESTIONS = {"colour": "what colour is the shape?", "shape": "what shape is it?", "position": "where is the shape?"}
DESCRIBE_QUESTION = "what is in the picture?"
IMAGE_TASK_WEIGHTS = {"caption": 2, "vqa": 3, "grounding": 2, "referring": 2, "grounded_caption": 2, "ocr": 2}
TEXT_RECORDS_PER_IMAGE = 1 / 8  # stage 2 keeps some pure-text autoregression
CHATS_PER_IMAGE = 1 / 3


@dataclass
class Scene:
    """Everything drawn in one image; records are derived from it, so text and pixels cannot disagree."""

    path: str  # relative to the output directory
    size: int
    shape: str
    colour: str
    position: str
    cx: float
    cy: float
    radius: float
    box: list[int]  # pixel box [x1, y1, x2, y2] of the shape
    background: list[int]
    noise_seed: Optional[int]  # None: plain background
    word: Optional[str] = None
    word_xy: Optional[list[int]] = None
    quad: Optional[list[int]] = None  # pixel quad of the word: TL, TR, BR, BL (x, y) pairs

    @property
    def caption(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape} in the {self.position}"

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------- geometry
def shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of 'radius' r (circle: its bounding square, drawn as an ellipse)."""
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "triangle":  # equilateral, pointing up, centred on its bounding box
        h = 1.5 * r
        top = cy - h / 2
        return [(cx, top), (cx + 0.866 * r, top + h), (cx - 0.866 * r, top + h)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.32 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def outline_box(points: Sequence[tuple[float, float]], size: int) -> list[int]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    clip = lambda v: int(min(max(v, 0), size))  # noqa: E731
    return [clip(math.floor(min(xs))), clip(math.floor(min(ys))), clip(math.ceil(max(xs))), clip(math.ceil(max(ys)))]


def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font, scaled to the image where FreeType is available (bitmap font otherwise)."""
    try:
        return ImageFont.load_default(size=max(8, round(size * 0.15)))
    except Exception:  # noqa: BLE001 - Pillow without FreeType
        return ImageFont.load_default()


# ----------------------------------------------------------------------------------------------- planning
def max_radius(cell: int) -> float:
    """Largest radius (fraction of the side) that keeps a shape centred in grid row/column `cell` inside the image."""
    return 1 / 3 - CELL_MARGIN if cell != 1 else 2 / 3 - CELL_MARGIN


def plan_scene(rng: random.Random, path: str, size: int, word_boxes: dict[str, tuple]) -> Scene:
    """Draw the random facts of one image; `word_boxes` maps each word to its ink box in the font used."""
    shape = rng.choice(SHAPES)
    colour = rng.choice(list(COLOURS))
    pos_index = rng.randrange(len(POSITIONS))
    row, col = divmod(pos_index, 3)
    r = rng.uniform(RADIUS_RANGE[0], min(RADIUS_RANGE[1], max_radius(row), max_radius(col)))

    def centre(cell: int) -> float:
        lo = max(cell / 3 + CELL_MARGIN, r)
        hi = min((cell + 1) / 3 - CELL_MARGIN, 1 - r)
        return rng.uniform(lo, hi) * size

    cx, cy, radius = round(centre(col), 3), round(centre(row), 3), round(r * size, 3)
    box = outline_box(shape_outline(shape, cx, cy, radius), size)
    background = [rng.randint(185, 245) for _ in range(3)]
    noise_seed = rng.getrandbits(31) if rng.random() < NOISY_PROBABILITY else None
    scene = Scene(path, size, shape, colour, POSITIONS[pos_index], cx, cy, radius, box, background, noise_seed)
    if rng.random() < WORD_PROBABILITY:
        word = rng.choice(WORDS)
        _place_word(scene, word, word_boxes[word], rng)
    return scene


def _place_word(scene: Scene, word: str, ink_box: tuple, rng: random.Random, tries: int = 8) -> None:
    """Put the word where it does not touch the shape; leave it out when there is no room."""
    size = scene.size
    l, t, r, b = ink_box
    w, h = r - l, b - t
    x1, y1, x2, y2 = scene.box
    for _ in range(tries):
        if w + 4 > size or h + 4 > size:
            return
        x = rng.randrange(2, size - w - 1)
        y = rng.randrange(2, size - h - 1)
        if x + w + 2 < x1 or x > x2 + 2 or y + h + 2 < y1 or y > y2 + 2:  # ink box clear of the shape
            scene.word, scene.word_xy = word, [x - l, y - t]
            scene.quad = [x, y, x + w, y, x + w, y + h, x, y + h]
            return


# ----------------------------------------------------------------------------------------------- rendering
def render_scene(scene: Scene, font=None) -> Image.Image:
    """The scene as an RGB image (deterministic: noise comes from the scene's own seed)."""
    size = scene.size
    if scene.noise_seed is None:
        img = Image.new("RGB", (size, size), tuple(scene.background))
    else:  # light noise in 4x4 blocks: visible texture, cheap to compress
        cells = -(-size // 4)
        noise = np.random.default_rng(scene.noise_seed).integers(-6, 7, (cells, cells, 1), dtype=np.int16)
        noise = noise.repeat(4, 0).repeat(4, 1)[:size, :size]
        img = Image.fromarray(np.clip(np.array(scene.background, np.int16) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    points = shape_outline(scene.shape, scene.cx, scene.cy, scene.radius)
    if scene.shape == "circle":
        draw.ellipse(points, fill=fill)
    else:
        draw.polygon(points, fill=fill)
    if scene.word:
        draw.text(tuple(scene.word_xy), scene.word, font=font or _font(size), fill=TEXT_COLOUR)
    return img


def _render_chunk(args: tuple[str, list[Scene]]) -> int:
    out_dir, scenes = args
    font = _font(scenes[0].size) if scenes else None
    for s in scenes:
        render_scene(s, font).save(os.path.join(out_dir, s.path), format="PNG", compress_level=3)  # 35% faster than 6, 8% larger
    return len(scenes)


# ------------------------------------------------------------------------------------ the demo's metric
def _named(text: str, words) -> set[str]:
    return {w for w in words if re.search(rf"\b{re.escape(w)}\b", text.lower())}


def caption_names_colour_and_shape(prediction: str, references) -> bool:
    """The demo's caption accuracy (tools/evaluate.py --caption-metric synthetic): a reference of this corpus
    names exactly one of its colours and one of its shapes; the caption is right when it names that colour AND
    that shape and no other colour or shape. A reference that is not such a caption falls back to exact match
    after normalising case, space and a final full stop. `references`: one caption or a list (any may match)."""
    refs = [references] if isinstance(references, str) else list(references)
    for reference in refs:
        colours, shapes = _named(reference, COLOURS), _named(reference, SHAPES)
        if len(colours) == 1 and len(shapes) == 1:
            if _named(prediction, COLOURS) == colours and _named(prediction, SHAPES) == shapes:
                return True
        elif _normalise(prediction) == _normalise(reference):
            return True
    return False


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


# ----------------------------------------------------------------------------------------------- records
def caption_record(s: Scene) -> dict:
    return {"task": "caption", "image": s.path, "caption": s.caption}


def image_task_record(task: str, s: Scene, rng: random.Random) -> dict:
    """One stage-2 record of `task` about scene `s` (keys in the data contract's order)."""
    sized = {"image": s.path, "width": s.size, "height": s.size}
    if task == "caption":
        return caption_record(s)
    if task == "vqa":
        kind = rng.choice(list(VQA_QUESTIONS))
        answer = {"colour": s.colour, "shape": s.shape, "position": s.position}[kind]
        return {"task": "vqa", "image": s.path, "question": VQA_QUESTIONS[kind], "answer": answer}
    if task == "grounding":
        return {"task": "grounding", **sized, "phrase": f"the {s.phrase}", "box": list(s.box)}
    if task == "referring":
        return {"task": "referring", **sized, "box": list(s.box), "phrase": f"the {s.phrase}"}
    if task == "grounded_caption":
        return {"task": "grounded_caption", **sized, "caption": s.caption,
                "refs": [{"phrase": s.phrase, "box": list(s.box)}]}
    if task == "ocr":
        if not s.word:
            raise ValueError(f"{s.path}: an OCR record needs an image with a word")
        return {"task": "ocr", **sized, "texts": [{"text": s.word, "quad": list(s.quad)}]}
    raise ValueError(f"unknown image task {task!r}")


def text_record(rng: random.Random) -> dict:
    """Pure text about shapes, from the same small vocabulary (stage-2 text-only autoregression)."""
    sentences = []
    for _ in range(rng.randrange(2, 4)):
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        if rng.random() < 0.5:
            sentences.append(f"there is {article(colour)} {colour} {shape} in the {rng.choice(POSITIONS)}.")
        else:
            sentences.append(f"the {shape} is {colour}.")
    return {"task": "text", "text": " ".join(sentences)}


def _qa(s: Scene, rng: random.Random, exclude: Sequence[str] = ()) -> tuple[str, str, str]:
    """(kind, question, answer) about scene `s`, of a kind not in `exclude`."""
    kind = rng.choice([k for k in ("describe", "colour", "shape", "position") if k not in exclude])
    if kind == "describe":
        return kind, DESCRIBE_QUESTION, s.caption
    return kind, VQA_QUESTIONS[kind], {"colour": s.colour, "shape": s.shape, "position": s.position}[kind]


def heldout_chat_record(index: int, s: Scene) -> dict:
    """A one-turn conversation to score: stage 3's describe question about `s`, its caption as the reference."""
    return {"id": f"heldout-chat-{index:06d}",
            "conversations": [{"from": "user", "value": f"Picture 1: <img>{s.path}</img>\n{DESCRIBE_QUESTION}"},
                              {"from": "assistant", "value": s.caption}]}


def chat_record(index: int, scenes: Sequence[Scene], rng: random.Random) -> dict:
    """A release-format conversation: one image (1-3 turns) or two images (which picture / describe both)."""
    turns = []
    if len(scenes) == 2:
        a, b = scenes
        head = f"Picture 1: <img>{a.path}</img>\nPicture 2: <img>{b.path}</img>\n"
        if a.phrase != b.phrase and rng.random() < 0.5:
            target = rng.choice((a, b))
            turns += [("user", f"{head}which picture has the {target.phrase}?"),
                      ("assistant", f"picture {1 if target is a else 2}")]
        else:
            turns += [("user", f"{head}what is in the pictures?"), ("assistant", f"{a.caption} and {b.caption}")]
    else:
        (s,) = scenes
        asked: list[str] = []
        for t in range(rng.randrange(1, 4)):
            kind, q, ans = _qa(s, rng, exclude=asked)
            asked.append(kind)
            prefix = f"Picture 1: <img>{s.path}</img>\n" if t == 0 else ""
            turns += [("user", prefix + q), ("assistant", ans)]
    return {"id": f"chat-{index:06d}", "conversations": [{"from": role, "value": text} for role, text in turns]}


# ----------------------------------------------------------------------------------------------- driver
@dataclass
class CorpusSummary:
    out_dir: str
    num_train_images: int
    num_heldout_images: int
    num_stage1: int
    num_stage2: int
    num_stage3: int
    num_heldout: int
    seconds: float


def _write_jsonl(path: str, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def print_progress(done: int, total: int, start: float) -> None:
    print(f"[synthetic] {done}/{total} images ({time.time() - start:.1f}s)", file=sys.stderr, flush=True)


def generate_corpus(out_dir: str, seed: int = 0, num_train: int = 30000, num_heldout: int = 1000,
                    image_size: int = 96, workers: Optional[int] = None,
                    progress: Optional[Callable[[int, int, float], None]] = print_progress) -> CorpusSummary:
    """Render the images and write every record file into `out_dir` (see the module docstring)."""
    if num_train < 2:
        raise ValueError(f"--num-train must be at least 2 (two-image chats), got {num_train}")
    if num_heldout < 0:
        raise ValueError(f"--num-heldout must be >= 0, got {num_heldout}")
    if image_size < 32:
        raise ValueError(f"--image-size must be at least 32 pixels, got {image_size}")
    start = time.time()
    for split in ("train", "heldout"):
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)

    font = _font(image_size)
    word_boxes = {w: font.getbbox(w) for w in WORDS}
    plan_rng = random.Random(f"qwenvl-synthetic:{seed}:plan")
    train = [plan_scene(plan_rng, f"images/train/{i:06d}.png", image_size, word_boxes) for i in range(num_train)]
    heldout = [plan_scene(plan_rng, f"images/heldout/{i:06d}.png", image_size, word_boxes) for i in range(num_heldout)]

    _render_all(out_dir, train + heldout, workers, progress, start)

    rng = random.Random(f"qwenvl-synthetic:{seed}:records")
    stage1 = [caption_record(s) for s in train]
    tasks, weights = list(IMAGE_TASK_WEIGHTS), list(IMAGE_TASK_WEIGHTS.values())
    stage2 = []
    for s in train:
        task = rng.choices(tasks, weights)[0]
        if task == "ocr" and not s.word:
            task = "grounded_caption" if rng.random() < 0.5 else "grounding"
        stage2.append(image_task_record(task, s, rng))
    texts = [text_record(rng) for _ in range(max(1, round(num_train * TEXT_RECORDS_PER_IMAGE)))]
    for t in texts:  # spread the text records through the file
        stage2.insert(rng.randrange(len(stage2) + 1), t)
    stage3 = []
    for i in range(max(1, round(num_train * CHATS_PER_IMAGE))):
        n = 2 if rng.random() < 0.2 else 1
        picks = rng.sample(range(num_train), n)
        stage3.append(chat_record(i, [train[j] for j in picks], rng))
    held = [caption_record(s) for s in heldout]

    _write_jsonl(os.path.join(out_dir, "stage1.jsonl"), stage1)
    _write_jsonl(os.path.join(out_dir, "stage2.jsonl"), stage2)
    _write_jsonl(os.path.join(out_dir, "heldout.jsonl"), held)
    _write_jsonl(os.path.join(out_dir, "heldout_chat.jsonl"),
                 [heldout_chat_record(i, s) for i, s in enumerate(heldout)])
    with open(os.path.join(out_dir, "stage3.json"), "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in stage3) + "\n]\n")
    with open(os.path.join(out_dir, "corpus.txt"), "w", encoding="utf-8") as f:  # training text only
        for r in stage1 + stage2 + stage3:
            for text in record_texts(r):
                for line in text.splitlines():
                    if line.strip():
                        f.write(line.strip() + "\n")
    summary = CorpusSummary(out_dir, num_train, num_heldout, len(stage1), len(stage2), len(stage3), len(held),
                            round(time.time() - start, 2))
    info = {"seed": seed, "image_size": image_size, "colours": list(COLOURS), "shapes": list(SHAPES),
            "positions": list(POSITIONS), "words": list(WORDS),
            "counts": {k: v for k, v in asdict(summary).items() if k.startswith("num_")}}
    with open(os.path.join(out_dir, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return summary


def _render_all(out_dir: str, scenes: list[Scene], workers: Optional[int], progress, start: float) -> None:
    """Render in `workers` processes; each PNG depends only on its scene, so the output is worker-independent."""
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    chunk = 256
    jobs = [(out_dir, scenes[i:i + chunk]) for i in range(0, len(scenes), chunk)]
    done, next_report = 0, 0
    if workers == 1 or len(jobs) == 1:
        results = map(_render_chunk, jobs)
        pool = None
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(workers)
        results = pool.imap_unordered(_render_chunk, jobs)
    try:
        for n in results:
            done += n
            if progress and (done >= next_report or done == len(scenes)):
                progress(done, len(scenes), start)
                next_report = done + max(1, len(scenes) // 10)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
