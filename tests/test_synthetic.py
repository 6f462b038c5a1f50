"""The synthetic corpus: deterministic, every record true of its image, valid under the data contract."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qwenvl_megatron.data import formats
from qwenvl_megatron.data.synthetic import COLOURS, POSITIONS, SHAPES, WORDS, generate_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("stage1.jsonl", "stage2.jsonl", "stage3.json", "heldout.jsonl", "heldout_chat.jsonl", "corpus.txt",
         "info.json")
SIZE = 80


def tree_bytes(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic") / "a")
    generate_corpus(out, seed=7, num_train=160, num_heldout=20, image_size=SIZE, workers=2, progress=None)
    return out


def parse_caption(caption):
    m = re.fullmatch(r"an? (\w+) (\w+) in the (.+)", caption)
    assert m, caption
    colour, shape, position = m.groups()
    assert colour in COLOURS and shape in SHAPES and position in POSITIONS, caption
    return colour, shape, position


def shape_mask(path, colour):
    """Pixels of exactly the shape's colour (shapes are drawn flat, without antialiasing)."""
    a = np.asarray(Image.open(path).convert("RGB"))
    return np.all(a == np.array(COLOURS[colour]), axis=-1), a


def test_same_seed_same_bytes_any_worker_count(corpus, tmp_path):
    again = str(tmp_path / "b")
    generate_corpus(again, seed=7, num_train=160, num_heldout=20, image_size=SIZE, workers=1, progress=None)
    a, b = tree_bytes(corpus), tree_bytes(again)
    assert sorted(a) == sorted(b) and len(a) == 160 + 20 + len(FILES)
    assert all(a[k] == b[k] for k in a)
    other = str(tmp_path / "c")
    generate_corpus(other, seed=8, num_train=160, num_heldout=20, image_size=SIZE, workers=1, progress=None)
    c = tree_bytes(other)
    assert c["stage1.jsonl"] != a["stage1.jsonl"] and c["images/train/000000.png"] != a["images/train/000000.png"]


def test_captions_are_true_of_the_pixels(corpus):
    """Colour, position (box centre in the named 3x3 cell) and size of the drawn shape match the caption."""
    records = load_jsonl(os.path.join(corpus, "stage1.jsonl")) + load_jsonl(os.path.join(corpus, "heldout.jsonl"))
    assert len(records) == 180 and {r["task"] for r in records} == {"caption"}
    for r in records:
        colour, shape, position = parse_caption(r["caption"])
        mask, _ = shape_mask(os.path.join(corpus, r["image"]), colour)
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 0.01 * SIZE * SIZE, r  # big, visible shape
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2  # centre of the drawn box
        cell = (int(cy * 3 // SIZE), int(cx * 3 // SIZE))
        assert POSITIONS[cell[0] * 3 + cell[1]] == position, (r, cell)


def test_grounding_boxes_and_ocr_quads_match_the_pixels(corpus):
    records = load_jsonl(os.path.join(corpus, "stage2.jsonl"))
    boxed = [r for r in records if r["task"] in ("grounding", "referring", "grounded_caption")]
    ocr = [r for r in records if r["task"] == "ocr"]
    assert len(boxed) > 20 and len(ocr) > 3
    for r in boxed:
        assert r["width"] == r["height"] == SIZE
        phrase, box = (r["refs"][0]["phrase"], r["refs"][0]["box"]) if "refs" in r else (r["phrase"], r["box"])
        colour = phrase.split()[-2]
        if "caption" in r:
            assert phrase in r["caption"]
        mask, _ = shape_mask(os.path.join(corpus, r["image"]), colour)
        ys, xs = np.nonzero(mask)
        drawn = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert all(abs(int(d) - b) <= 1 for d, b in zip(drawn, box)), (r, drawn)
    for r in ocr:
        (item,) = r["texts"]
        assert item["text"] in WORDS
        x1, y1, x2, y2, x3, y3, x4, y4 = item["quad"]
        assert (x1, y1, y2, x3, y3, x4) == (x4, y2, y1, x2, y4, x1)  # axis-aligned TL, TR, BR, BL
        a = np.asarray(Image.open(os.path.join(corpus, r["image"])).convert("RGB")).astype(int)
        ink = (a.max(-1) < 140) & ~np.all(a == np.array(COLOURS["black"]), -1)  # dark text, not a black shape
        ys, xs = np.nonzero(ink)
        assert len(xs) > 10 and xs.min() >= x1 - 1 and xs.max() < x2 + 1 and ys.min() >= y1 - 1 and ys.max() < y3 + 1
        assert xs.min() <= x1 + 1 and ys.min() <= y1 + 1 and xs.max() >= x2 - 2 and ys.max() >= y3 - 2  # tight


def test_every_record_encodes_under_the_contract(corpus):
    """All files parse with the project's own record reader and template encoder (Qwen vocabulary)."""
    from qwenvl_megatron.data.tokenizer import build_tokenizer, default_qwen_vocab_path
    path = os.environ.get("QWEN_TIKTOKEN") or os.path.join(REPO, ".venv", "share", "qwen.tiktoken")
    if not os.path.isfile(path):
        path = default_qwen_vocab_path()
    tok = build_tokenizer("qwen", path)
    tasks, chats, images = {}, [], {"train": set(), "heldout": set()}
    for name in ("stage1.jsonl", "stage2.jsonl", "stage3.json", "heldout.jsonl", "heldout_chat.jsonl"):
        data_file = os.path.join(corpus, name)
        for where, record in formats.iter_records(data_file):
            sample = formats.encode_record(record, tok, num_image_tokens=4, where=where)
            assert sample.num_loss_tokens > 0
            for ref in sample.images:
                assert os.path.isfile(formats.resolve_image_path(ref, data_file)), (where, ref)
                images["heldout" if name.startswith("heldout") else "train"].add(ref)
            task = formats.record_task(record)
            tasks.setdefault(name, set()).add(task)
            if task == "chat":
                chats.append((len(record["conversations"]), len(sample.images)))
    assert tasks["stage2.jsonl"] == set(formats.TASKS)
    assert tasks["stage1.jsonl"] == tasks["heldout.jsonl"] == {"caption"}
    assert tasks["stage3.json"] == tasks["heldout_chat.jsonl"] == {"chat"}
    assert any(turns > 2 for turns, _ in chats) and any(n == 2 for _, n in chats)
    assert not images["train"] & images["heldout"] and len(images["heldout"]) == 20


def test_heldout_chat_asks_what_stage3_teaches(corpus):
    """Each held-out image is asked, in ChatML, the describe question that stage 3's chats ask about training
    images; the reference answer is that image's held-out caption."""
    captions = {r["image"]: r["caption"] for r in load_jsonl(os.path.join(corpus, "heldout.jsonl"))}
    chats = load_jsonl(os.path.join(corpus, "heldout_chat.jsonl"))
    asked = set()
    for rec in chats:
        (user, answer) = rec["conversations"]
        assert (user["from"], answer["from"]) == ("user", "assistant")
        (image,) = re.findall(r"<img>(.*?)</img>", user["value"])
        asked.add(image)
        assert answer["value"] == captions[image]
        question = user["value"].split("\n", 1)[1]
        assert user["value"] == f"Picture 1: <img>{image}</img>\n{question}"
    assert asked == set(captions)
    with open(os.path.join(corpus, "stage3.json"), encoding="utf-8") as f:
        pairs = [(u["value"], a["value"]) for r in json.load(f)
                 for u, a in zip(r["conversations"][::2], r["conversations"][1::2])]
    taught = [a for q, a in pairs if q.split("\n")[-1] == question]
    assert len(taught) >= 5 and all(parse_caption(a) for a in taught)  # the same question, caption answers


def test_small_vocabulary(corpus):
    with open(os.path.join(corpus, "corpus.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    words = {w.strip("?.:,").lower() for line in lines for w in line.split()} - {""}
    assert set(COLOURS) | set(SHAPES) <= words and {w.lower() for w in WORDS} & words
    assert len(words) <= 45, sorted(words)
    assert not any("<img>" in line or ".png" in line for line in lines)
    captions = [r["caption"] for r in load_jsonl(os.path.join(corpus, "stage1.jsonl"))]
    assert lines[:len(captions)] == captions  # stage-1 text first, then stage 2 and 3


def test_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_synthetic_dataset.py"), "--out", str(out),
                           "--seed", "3", "--num-train", "12", "--num-heldout", "2", "--image-size", "64", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[0])
    assert summary["num_stage1"] == 12 and summary["num_heldout"] == 2
    assert Image.open(out / "images" / "train" / "000011.png").size == (64, 64)
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_synthetic_dataset.py"), "--out",
                          str(tmp_path / "bad"), "--image-size", "8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--image-size" in bad.stderr
