"""Generation and evaluation pieces: boxes, prompts, metrics, and the generate/evaluate tools on one rank.

The tools run a tiny random Qwen-VL (an HF directory) with a small SentencePiece vocabulary whose image
ids the model's config names; teacher-forced logits from `generate.py --logits-out` must equal the
independent reference model's on the same directory.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import reference_qwenvl as R
from qwenvl_megatron.inference.boxes import Box, draw_boxes, iou, parse_boxes
from qwenvl_megatron.inference.evaluation import (TaskScore, caption_correct, format_table, grounding_iou,
                                                  vqa_correct)
from qwenvl_megatron.inference.prompts import encode_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_boxes_with_refs_and_an_opened_box():
    text = "a <ref>red circle</ref><box>(10,20),(300,400)</box> and <box>(1,2),(3,4)</box>"
    assert parse_boxes(text) == [Box("red circle", (10, 20, 300, 400)), Box(None, (1, 2, 3, 4))]
    assert parse_boxes("(5,6),(7,8)</box><|endoftext|>", prefix="<box>") == [Box(None, (5, 6, 7, 8))]
    assert parse_boxes("<box>(5,6),(7</box>") == []
    assert Box(None, (100, 500, 500, 1000)).to_pixels(200, 50) == [20.0, 25.0, 100.0, 50.0]


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([10, 10, 0, 0], [0, 0, 10, 10]) == 1.0  # corners in any order


def test_draw_boxes(tmp_path):
    src = tmp_path / "white.png"
    Image.new("RGB", (100, 100), "white").save(src)
    draw_boxes(str(src), [Box("x", (200, 300, 600, 700))], str(tmp_path / "out.png"))
    out = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    assert tuple(out[50, 20]) == (255, 0, 0) and tuple(out[50, 60]) == (255, 0, 0)  # left / right edges
    assert tuple(out[50, 40]) == (255, 255, 255) and tuple(out[10, 10]) == (255, 255, 255)


def test_metrics():
    ref = "a red circle in the top left"
    assert caption_correct("a red circle in the bottom", ref)  # colour and shape are what counts
    assert not caption_correct("a blue circle in the top left", ref)
    assert not caption_correct("a red square in the top left", ref)
    assert not caption_correct("a red circle and a blue star", ref)  # another colour / shape named
    assert caption_correct("A photo of a dog.", "a photo of a dog")  # generic: exact match, normalised
    assert not caption_correct("a photo of a cat", "a photo of a dog")
    assert vqa_correct(" Red.", "red") and not vqa_correct("dark red", "red")
    assert grounding_iou("(0,0),(500,500)</box>", [0, 0, 50, 100], 100, 200) == 1.0
    assert grounding_iou("no box here", [0, 0, 50, 100], 100, 200) == 0.0
    s = TaskScore(4, 3)
    table = format_table({"vqa": s}, {"ocr": 2})
    assert "75.00%" in table and "ocr" in table and "not scored" in table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A SentencePiece vocabulary, a tiny random HF model that uses its image ids, and two images."""
    from qwenvl_megatron.convert.hf_checkpoint import save_hf_dir
    from qwenvl_megatron.data.tokenizer import build_tokenizer, train_sentencepiece
    from qwenvl_megatron.models.config import QwenVLConfig

    d = tmp_path_factory.mktemp("generate")
    sentences = ["a red circle in the top left", "what colour is the shape? Answer: blue",
                 "Describe the image in English:", "the green star is in the center"] * 40
    model_file = train_sentencepiece(sentences, 320, str(d / "sp"))
    tok = build_tokenizer("sentencepiece", model_file)
    cfg = R.tiny_hf_config(vocab_size=tok.vocab_size, visual={"image_start_id": tok.img_start_id})
    hf = R.random_hf_state_dict(cfg, seed=9)
    save_hf_dir(str(d / "hf"), hf, QwenVLConfig.from_hf_config(cfg), max_shard_bytes=200_000)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((60, 80, 3)) * 255).astype("uint8")).save(d / name)
    return {"dir": d, "tok": tok, "model_file": model_file, "cfg": cfg, "hf": hf}


def test_encode_prompt_expands_images(tiny):
    tok = tiny["tok"]
    ids, paths = encode_prompt("Describe<ref>x</ref>", tok, 4, image="a.png")
    assert paths == ["a.png"]
    assert ids[:6] == [tok.img_start_id] + [tok.img_pad_id] * 4 + [tok.img_end_id]
    assert tok.ref_start_id in ids and tok.ref_end_id in ids
    ids2, paths2 = encode_prompt("Picture 1: <img>x.png</img>\nhi <img>y.png</img>", tok, 2)
    assert paths2 == ["x.png", "y.png"] and ids2.count(tok.img_start_id) == 2 and ids2.count(tok.img_pad_id) == 4


def _tool(*args):
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def test_generate_tool_logits_match_reference_and_batches_match_single(tiny):
    d, tok = tiny["dir"], tiny["tok"]
    common = ["--hf-dir", str(d / "hf"), "--tokenizer-type", "sentencepiece", "--tokenizer-model",
              tiny["model_file"], "--max-new-tokens", "5"]
    prompt = "Describe the image in English:"
    single = json.loads(_tool("tools/generate.py", *common, "--image", str(d / "a.png"), "--prompt", prompt,
                              "--logits-out", str(d / "logits.npy"), "--draw-boxes", str(d / "boxes.png")))
    assert len(single["tokens"]) == 5 or single["stopped"]
    assert single["text"] == tok.decode(single["tokens"])
    assert (d / "boxes.png").is_file()

    from qwenvl_megatron.inference.runner import load_images
    ids, _ = encode_prompt(prompt, tok, 16, image="a.png")
    ref = R.ReferenceQwenVL(tiny["cfg"])
    ref.load_state_dict(tiny["hf"])
    with torch.no_grad():
        want = ref(torch.tensor([ids]), load_images([str(d / "a.png")], 224))[0]
    got = torch.from_numpy(np.load(d / "logits.npy"))
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4
    # only the prompt's logits: no token generated
    none = json.loads(_tool("tools/generate.py", *common, "--max-new-tokens", "0", "--image", str(d / "a.png"),
                            "--prompt", prompt, "--logits-out", str(d / "logits0.npy")))
    assert none["tokens"] == [] and not none["stopped"]
    assert torch.equal(torch.from_numpy(np.load(d / "logits0.npy")), got)
    # greedy from the reference (no cache, banned image ids) gives the tool's tokens
    seq, images = torch.tensor([ids]), load_images([str(d / "a.png")], 224)
    for _ in range(len(single["tokens"])):
        with torch.no_grad():
            logits = ref(seq, images)[0, -1]
        logits[[tok.img_start_id, tok.img_end_id, tok.img_pad_id]] = float("-inf")
        seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    assert seq[0, len(ids):].tolist() == single["tokens"]

    lines = [{"prompt": prompt, "image": "a.png"}, {"prompt": prompt, "image": "b.png"},
             {"task": "vqa", "image": "a.png", "question": "what colour is the shape?"}]
    (d / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    _tool("tools/generate.py", *common, "--input", str(d / "prompts.jsonl"), "--output", str(d / "answers.jsonl"))
    answers = [json.loads(x) for x in (d / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and answers[0]["tokens"] == single["tokens"]
    assert answers[2]["task"] == "vqa" and "text" in answers[2]


def test_evaluate_tool_scores_its_own_predictions(tiny):
    d = tiny["dir"]
    records = [{"task": "caption", "image": "a.png", "caption": "a red circle in the top left"},
               {"task": "vqa", "image": "b.png", "question": "what colour is the shape?", "answer": "red"},
               {"task": "grounding", "image": "a.png", "width": 80, "height": 60, "phrase": "the red circle",
                "box": [1, 2, 30, 40]},
               {"task": "text", "text": "hello"}]
    (d / "held.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    out = _tool("tools/evaluate.py", "--hf-dir", str(d / "hf"), "--tokenizer-type", "sentencepiece",
                "--tokenizer-model", tiny["model_file"], "--max-new-tokens", "4", "--data", str(d / "held.jsonl"),
                "--output", str(d / "eval.json"))
    result = json.loads((d / "eval.json").read_text())
    assert result["not_scored"] == {"text": 1}
    assert [p["task"] for p in result["predictions"]] == ["caption", "vqa", "grounding"]
    for p, rec in zip(result["predictions"], records):
        right = {"caption": lambda: caption_correct(p["prediction"], rec["caption"]),
                 "vqa": lambda: vqa_correct(p["prediction"], rec["answer"]),
                 "grounding": lambda: grounding_iou(p["prediction"], rec["box"], 80, 60) >= 0.5}[p["task"]]()
        assert p["correct"] == right
        assert result["scores"][p["task"]]["correct"] == int(right)
    assert "caption" in out and "grounding" in out
