"""Generation and evaluation pieces: boxes, prompts, metrics, and the generate/evaluate tools on one rank.

The tools run a tiny random Qwen-VL (an HF directory) with a small SentencePiece vocabulary whose image
ids the model's config names; teacher-forced logits from `generate.py --logits-out` must equal the
independent reference model's on the same directory.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import reference_qwenvl as R
from qwenvl_megatron.inference.boxes import Box, draw_boxes, iou, parse_boxes
from qwenvl_megatron.inference.eval_data import chat_prompt, load_eval_records
from qwenvl_megatron.inference.evaluation import (TaskScore, cider, format_table, grounding_iou, ptb_tokenize,
                                                  ptb_tokenize_java, score_predictions, vqa_accuracy, vqa_answers,
                                                  vqa_normalise)
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


def test_format_table():
    s = TaskScore("exact", count=4, total=3.0, correct=3)
    table = format_table({"vqa": s, "caption": TaskScore("cider", count=2, corpus=1.2345)}, {"ocr": 2})
    assert "75.00%" in table and "123.45" in table and "CIDEr" in table and "ocr" in table and "not scored" in table


def test_generic_scorer_is_free_of_the_demo_corpus():
    """The colour-and-shape rule belongs to the synthetic corpus; the generic scorer does not import it."""
    code = ("import sys, qwenvl_megatron.inference.evaluation as e; "
            "assert 'qwenvl_megatron.data.synthetic' not in sys.modules; "
            "assert not hasattr(e, 'COLOURS') and not hasattr(e, 'caption_correct')")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=ROOT))


def test_synthetic_caption_rule_supplied_by_the_demo_path():
    from qwenvl_megatron.data.synthetic import caption_names_colour_and_shape as right
    spec = importlib.util.spec_from_file_location("evaluate_tool", os.path.join(ROOT, "tools", "evaluate.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.caption_rule("synthetic") is right and tool.caption_rule("cider") is None
    ref = "a red circle in the top left"
    assert right("a red circle in the bottom", ref)  # colour and shape are what counts
    assert not right("a blue circle in the top left", ref)
    assert not right("a red square in the top left", ref)
    assert not right("a red circle and a blue star", ref)  # another colour / shape named
    assert right("A photo of a dog.", "a photo of a dog")  # not a corpus caption: exact match, normalised
    assert not right("a photo of a cat", ["a photo of a dog", "a dog"])
    assert right("a dog", ["a photo of a dog", "a dog"])  # any reference
    assert "--caption-metric synthetic" in open(os.path.join(ROOT, "examples", "demo.sh")).read()


def test_vqa_normalisation_hand_cases():
    assert vqa_normalise("Two dogs!") == "2 dogs"  # punctuation, number word
    assert vqa_normalise("The cat.") == "cat"  # article, final period
    assert vqa_normalise("isnt") == "isn't" and vqa_normalise("dont know") == "don't know"  # contractions
    assert vqa_normalise("1.5") == "1.5" and vqa_normalise("3,000") == "3000"  # decimal kept, 3,000 joined
    assert vqa_normalise("black/white") == "black white"  # a mark inside a word becomes a space
    assert vqa_normalise("yes ,no") == "yes no"  # a mark touching a space is removed
    assert vqa_normalise(" A\tpizza\n") == "pizza"


@pytest.mark.parametrize("answers,prediction,want", [
    (["red"] * 10, "red", 1.0),
    (["red"] * 3 + ["dark red"] * 7, "red", 0.9),  # red left out: 2 others -> 2/3 (x3); else 3 -> 1 (x7)
    (["red"] * 2 + ["blue"] * 8, "red", 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
    (["red"] + ["blue"] * 9, "red", 0.3),  # (1 x 0 + 9 x 1/3) / 10
    (["red"] * 4 + ["blue"] * 6, "Red.", 1.0),  # 3 of the others always agree; normalised
    (["2"] * 5 + ["3"] * 5, "Two", 1.0),  # number word
    (["dog"] * 10, "cat", 0.0),
    ([{"answer": "yes", "answer_id": i} for i in range(1, 11)], "Yes", 1.0),  # VQAv2's answer dicts
])
def test_vqa_accuracy_hand_counts(answers, prediction, want):
    rec = {"task": "vqa", "answers": answers}
    assert vqa_accuracy(prediction, vqa_answers(rec)) == pytest.approx(want)
    scores, details = score_predictions([(rec, prediction)])
    assert scores["vqa"].metric == "vqav2" and scores["vqa"].score == pytest.approx(want)


def test_vqa_single_answer_is_exact_match_and_kinds_do_not_mix():
    recs = [({"task": "vqa", "answer": "red"}, " Red."), ({"task": "vqa", "answer": "red"}, "dark red")]
    scores, details = score_predictions(recs)
    assert scores["vqa"].metric == "exact" and scores["vqa"].accuracy == 0.5
    assert [d["correct"] for d in details] == [True, False]
    with pytest.raises(ValueError, match="mix metrics"):
        score_predictions(recs + [({"task": "vqa", "answers": ["red"] * 10}, "red")])


# CIDEr: a small COCO-style fixture (several references per image), raw text and its PTB tokens.
CIDER_REFS = {
    1: ["A man riding a horse on a beach.", "A person rides a brown horse along the shore.",
        "Man on horseback by the ocean."],
    2: ["Two dogs playing in the snow!", "A couple of dogs run through snow.", "Dogs, playing outside in winter."],
    3: ["A plate of food with broccoli.", "Broccoli and rice on a white plate.", "A healthy meal (rice, broccoli)."],
    4: ["A red bus driving down the street.", "The bus isn't empty; it's red.", "A double-decker bus on a street."],
}
CIDER_PREDS = {1: "A man riding a horse on the beach.", 2: "Two dogs in the snow.", 3: "A plate of broccoli.",
               4: "A cat sitting on a couch."}
CIDER_TOKENS = {  # by hand, as pycocoevalcap's PTBTokenizer writes them (lower case, punctuation dropped)
    1: ["a man riding a horse on a beach", "a person rides a brown horse along the shore",
        "man on horseback by the ocean"],
    2: ["two dogs playing in the snow", "a couple of dogs run through snow", "dogs playing outside in winter"],
    3: ["a plate of food with broccoli", "broccoli and rice on a white plate",
        "a healthy meal -lrb- rice broccoli -rrb-"],
    4: ["a red bus driving down the street", "the bus is n't empty it 's red", "a double-decker bus on a street"],
}
CIDER_PRED_TOKENS = {1: ["a man riding a horse on the beach"], 2: ["two dogs in the snow"],
                     3: ["a plate of broccoli"], 4: ["a cat sitting on a couch"]}


def test_cider_equals_pycocoevalcap_on_a_small_fixture():
    from pycocoevalcap.cider.cider import Cider
    want, want_per = Cider().compute_score(CIDER_TOKENS, CIDER_PRED_TOKENS)
    got, per, used = cider(CIDER_PREDS, CIDER_REFS, tokenizer="python")
    assert used == "python" and got == pytest.approx(float(want), abs=1e-12)
    assert [per[i] for i in sorted(per)] == pytest.approx([float(x) for x in want_per], abs=1e-12)
    assert per[1] > per[2] > per[3] > per[4] and per[4] < 0.1 and got > 0.5  # the fixture discriminates
    items = [({"task": "caption", "captions": CIDER_REFS[i]}, CIDER_PREDS[i]) for i in sorted(CIDER_REFS)]
    scores, details = score_predictions(items, caption_tokenizer="python")
    assert scores["caption"].score == pytest.approx(float(want), abs=1e-12)
    assert [d["cider"] for d in details] == pytest.approx([round(float(x), 4) for x in want_per])


@pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH")
def test_python_tokenisation_equals_pycocoevalcaps_java_tokenizer():
    sentences = [c for refs in CIDER_REFS.values() for c in refs] + list(CIDER_PREDS.values()) + [
        "Mr. Smith went to the U.S.A. yesterday.", "A 3,000 dollar bike at 3:30 pm, 50% off...",
        "I'm sure they'll go, won't they?", "kids' bikes -- can't fly", "Some 'quoted' words"]
    assert [ptb_tokenize(t) for t in sentences] == ptb_tokenize_java(sentences)
    assert cider(CIDER_PREDS, CIDER_REFS, "java")[0] == cider(CIDER_PREDS, CIDER_REFS, "python")[0]
    assert [ptb_tokenize(c) for c in CIDER_REFS[4]] == CIDER_TOKENS[4]


def test_grounding_accuracy_refcoco_style(tmp_path):
    """The release's RefCOCO layout (sent, bbox x1,y1,x2,y2 in pixels, width, height) and its box answer
    (0..1000 grid); right at IoU >= 0.5."""
    lines = [{"image": "x.jpg", "sent": "the man", "bbox": [0, 0, 50, 100], "width": 100, "height": 200}] * 4
    (tmp_path / "refcoco_val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = [r for _, r in load_eval_records(str(tmp_path / "refcoco_val.jsonl"))]
    assert recs[0]["task"] == "grounding" and recs[0]["phrase"] == "the man" and recs[0]["box"] == [0, 0, 50, 100]
    assert recs[0]["image"] == str(tmp_path / "x.jpg")
    answers = ["(0,0),(500,500)</box>",  # exactly the box: IoU 1
               "(0,0),(500,250)</box>",  # half the box: IoU 0.5, right
               "(250,0),(750,500)</box>",  # shifted by half a width: IoU 1/3
               "no box"]
    scores, details = score_predictions(list(zip(recs, answers)))
    assert [d["iou"] for d in details] == [1.0, 0.5, pytest.approx(0.3333, abs=1e-4), 0.0]
    assert [d["correct"] for d in details] == [True, True, False, False]
    assert scores["grounding"].accuracy == 0.5
    assert grounding_iou("(0,0),(500,500)</box>", [0, 0, 50, 100], 100, 200) == 1.0


def test_standard_layouts_load_as_records(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "id": 1, "caption": "one"}, {"image_id": 9, "id": 2, "caption": "x"},
                            {"image_id": 7, "id": 3, "caption": "two"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    recs = [r for _, r in load_eval_records(str(tmp_path / "captions.json"), image_root="/imgs")]
    assert recs == [{"task": "caption", "image": "/imgs/a.jpg", "image_id": 7, "captions": ["one", "two"]},
                    {"task": "caption", "image": "/imgs/b.jpg", "image_id": 9, "captions": ["x"]}]
    questions = {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "what?", "question_id": 420}]}
    annotations = {"annotations": [{"question_id": 420, "image_id": 42, "multiple_choice_answer": "yes",
                                    "answers": [{"answer": "yes", "answer_id": i} for i in range(1, 11)]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    (rec,) = [r for _, r in load_eval_records(str(tmp_path / "q.json"), "/coco", str(tmp_path / "a.json"))]
    assert rec["image"] == "/coco/COCO_val2014_000000000042.jpg" and rec["answers"] == ["yes"] * 10
    assert rec["task"] == "vqa" and rec["question"] == "what?"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task": "vqa", "image": "a.jpg", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: a vqa record needs 'answer' or 'answers'"):
        list(load_eval_records(str(tmp_path / "bad.jsonl")))
    chat = {"id": "c1", "conversations": [{"from": "human", "value": "Picture 1: <img>x/a.png</img>\nwhat?"},
                                          {"from": "gpt", "value": "a red circle"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    (rec,) = [r for _, r in load_eval_records(str(tmp_path / "chat.jsonl"), image_root="/imgs")]
    assert rec["task"] == "chat" and rec["conversations"][1] == chat["conversations"][1]
    turns, reference, images = chat_prompt(rec)
    assert turns == [{"from": "human", "value": "Picture 1: <img>/imgs/x/a.png</img>\nwhat?"}]
    assert reference == "a red circle" and images == ["/imgs/x/a.png"]
    chat["conversations"] = chat["conversations"][:1]  # nothing to score against
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl:1: a chat record to score ends with"):
        list(load_eval_records(str(tmp_path / "chat.jsonl")))


def test_chat_answers_scored_by_exact_match_or_the_callers_rule():
    rec = {"task": "chat", "conversations": [{"from": "user", "value": "q"},
                                             {"from": "assistant", "value": "a red circle in the top"}]}
    scores, details = score_predictions([(rec, "A red circle in the top."), (rec, "a red circle")])
    assert scores["chat"].metric == "exact" and details == [{"correct": True}, {"correct": False}]
    names_red = lambda pred, refs: "red" in pred and all("red" in r for r in refs)  # noqa: E731
    scores, details = score_predictions([(rec, "a red circle"), (rec, "a blue circle")], chat_rule=names_red)
    assert scores["chat"].as_dict()["metric"] == "answer rule" and scores["chat"].accuracy == 0.5


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
    records = [{"task": "caption", "image": "a.png", "captions": ["a red circle in the top left", "a red circle"]},
               {"task": "caption", "image": "b.png", "captions": ["a green star", "the green star in the center"]},
               {"task": "vqa", "image": "b.png", "question": "what colour is the shape?",
                "answers": ["red"] * 6 + ["blue"] * 4},
               {"task": "grounding", "image": "a.png", "width": 80, "height": 60, "phrase": "the red circle",
                "box": [1, 2, 30, 40]},
               {"task": "text", "text": "hello"}]
    (d / "held.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    chat = {"conversations": [{"from": "user", "value": "Picture 1: <img>a.png</img>\nwhat colour is the shape?"},
                              {"from": "assistant", "value": "red"}]}
    (d / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    out = _tool("tools/evaluate.py", "--hf-dir", str(d / "hf"), "--tokenizer-type", "sentencepiece",
                "--tokenizer-model", tiny["model_file"], "--max-new-tokens", "4", "--data", str(d / "held.jsonl"),
                str(d / "chat.jsonl"), "--output", str(d / "eval.json"), "--caption-tokenizer", "python")
    result = json.loads((d / "eval.json").read_text())
    assert result["not_scored"] == {"text": 1}
    preds = result["predictions"]
    assert [p["task"] for p in preds] == ["caption", "caption", "vqa", "grounding", "chat"]
    # The chat answer is the greedy continuation of the ChatML prompt with the assistant turn opened, as the
    # independent reference model decodes it.
    from qwenvl_megatron.data.formats import prompt_for
    from qwenvl_megatron.inference.runner import load_images
    tok = tiny["tok"]
    ids = prompt_for("chat", tok, 16, image="a.png", question="what colour is the shape?")
    ref = R.ReferenceQwenVL(tiny["cfg"])
    ref.load_state_dict(tiny["hf"])
    pixels, new = load_images([str(d / "a.png")], 224), []
    while len(new) < 4 and (not new or new[-1] not in (tok.eod_id, tok.im_end_id)):
        with torch.no_grad():
            logits = ref(torch.tensor([ids + new]), pixels)[0, -1]
        logits[[tok.img_start_id, tok.img_end_id, tok.img_pad_id]] = float("-inf")
        new.append(int(logits.argmax()))
    new = [t for t in new if t not in (tok.eod_id, tok.im_end_id)]
    assert preds[4]["prediction"] == tok.decode(new)
    assert preds[4]["correct"] == (preds[4]["prediction"].strip().lower() == "red")
    assert result["scores"]["chat"]["metric"] == "exact match"
    recs = [dict(r, image=str(d / r["image"])) for r in records[:4]]
    want, details = score_predictions([(r, p["prediction"]) for r, p in zip(recs, preds)], caption_tokenizer="python")
    for p, det in zip(preds, details):
        assert {k: p[k] for k in det} == det
    assert result["scores"]["caption"]["metric"] == "CIDEr (x100)"
    assert result["scores"]["caption"]["score"] == pytest.approx(want["caption"].score)
    assert result["scores"]["vqa"]["metric"] == "VQAv2 accuracy"
    assert result["scores"]["vqa"]["score"] == vqa_accuracy(preds[2]["prediction"], records[2]["answers"])
    right = grounding_iou(preds[3]["prediction"], records[3]["box"], 80, 60) >= 0.5
    assert preds[3]["correct"] == right and result["scores"]["grounding"]["correct"] == int(right)
    assert "CIDEr" in out and "grounding" in out
