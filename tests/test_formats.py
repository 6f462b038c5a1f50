"""Sample formats: whole token and label arrays of every task, built independently here from encode pieces."""
import json
import os
import random

import numpy as np
import pytest

from qwenvl_megatron.data.formats import (
    IGNORE_INDEX, MalformedRecordError, Sample, SampleTooLongError, encode_record, iter_records, prompt_for,
    record_texts, resolve_image_path, to_grid)
from qwenvl_megatron.data.tokenizer import QwenTokenizer, SentencePieceTokenizer, train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_VOCAB = os.environ.get("QWEN_TIKTOKEN") or os.path.join(REPO, ".venv", "share", "qwen.tiktoken")
N = 4  # image tokens per image in most tests (the default 256 is tested once)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    rng = random.Random(1)
    words = "a the red blue circle square in top left what colour is it shape answer caption".split()
    corpus = [" ".join(rng.choice(words) for _ in range(8)) + f" ({rng.randint(0, 999)},7)." for _ in range(1000)]
    return SentencePieceTokenizer(train_sentencepiece(corpus, 400, str(tmp_path_factory.mktemp("sp") / "t")))


@pytest.fixture(scope="module")
def qwen():
    if not os.path.isfile(QWEN_VOCAB):
        pytest.skip(f"Qwen vocabulary not found at {QWEN_VOCAB} (set QWEN_TIKTOKEN)")
    return QwenTokenizer(QWEN_VOCAB)


def assemble(*pieces):
    """pieces: (ids, supervised) -> expected (tokens, labels)."""
    tokens = [i for ids, _ in pieces for i in ids]
    labels = [i if loss else -100 for ids, loss in pieces for i in ids]
    return np.array(tokens, dtype=np.int32), np.array(labels, dtype=np.int32)


def img(tok, n=N):
    return [tok.img_start_id] + [tok.img_pad_id] * n + [tok.img_end_id]


def check(sample, expected, images):
    tokens, labels = expected
    assert isinstance(sample, Sample)
    assert sample.tokens.dtype == np.int32 and sample.labels.dtype == np.int32
    np.testing.assert_array_equal(sample.tokens, tokens)
    np.testing.assert_array_equal(sample.labels, labels)
    assert sample.images == images


# ------------------------------------------------------------------------------ stage-1/2 tasks (SP)
def test_caption(sp):
    s = encode_record({"task": "caption", "image": "img/0001.png", "caption": " a red circle in the top left "},
                      sp, num_image_tokens=N)
    e = sp.encode
    check(s, assemble((img(sp), False), (e("Generate the caption in English:"), False),
                      (e(" a red circle in the top left"), True), ([sp.eod_id], True)), ["img/0001.png"])


def test_caption_default_256_image_tokens(sp):
    s = encode_record({"task": "caption", "image": "x.png", "caption": "red"}, sp)
    assert s.tokens[0] == sp.img_start_id and s.tokens[257] == sp.img_end_id
    np.testing.assert_array_equal(s.tokens[1:257], np.full(256, sp.img_pad_id))
    assert (s.labels[:258] == IGNORE_INDEX).all()


def test_vqa(sp):
    s = encode_record({"task": "vqa", "image": "/abs/a.png", "question": "What colour is the shape?",
                       "answer": "red"}, sp, num_image_tokens=N)
    e = sp.encode
    check(s, assemble((img(sp), False), (e("What colour is the shape? Answer:"), False), (e(" red"), True),
                      ([sp.eod_id], True)), ["/abs/a.png"])


def test_grounding(sp):
    # 640x480 image: x 64 -> 100, y 48 -> 100, x 639.9 -> 999 (clipped from 999.8), y 480 -> 1000 -> 999.
    s = encode_record({"task": "grounding", "image": "a.png", "width": 640, "height": 480,
                       "phrase": "the red circle", "box": [64, 48, 639.9, 480]}, sp, num_image_tokens=N)
    e = sp.encode
    check(s, assemble((img(sp), False), ([sp.ref_start_id], False), (e("the red circle"), False),
                      ([sp.ref_end_id], False), ([sp.box_start_id], True), (e("(100,100),(999,999)"), True),
                      ([sp.box_end_id], True), ([sp.eod_id], True)), ["a.png"])


def test_referring(sp):
    s = encode_record({"task": "referring", "image": "a.png", "width": 200, "height": 100,
                       "box": [10, 20, 100, 50], "phrase": "the blue square"}, sp, num_image_tokens=N)
    e = sp.encode
    check(s, assemble((img(sp), False), ([sp.box_start_id], False), (e("(50,200),(500,500)"), False),
                      ([sp.box_end_id, sp.ref_start_id], False), (e("the blue square"), True),
                      ([sp.ref_end_id, sp.eod_id], True)), ["a.png"])


def test_grounded_caption_refs_in_any_order_and_repeated_phrase(sp):
    record = {"task": "grounded_caption", "image": "a.png", "width": 100, "height": 100,
              "caption": "a red circle left of a blue square and a red circle",
              "refs": [{"phrase": "blue square", "box": [50, 50, 60, 60]},
                       {"phrase": "red circle", "box": [1, 2, 3, 4]},
                       {"phrase": "red circle", "box": [90, 90, 99, 99]}]}
    s = encode_record(record, sp, num_image_tokens=N)
    e = sp.encode

    def ref(phrase, box):
        return [([sp.ref_start_id], True), (e(phrase), True), ([sp.ref_end_id, sp.box_start_id], True),
                (e(box), True), ([sp.box_end_id], True)]
    check(s, assemble((img(sp), False), (e("Generate the caption in English with grounding:"), False),
                      (e(" a "), True), *ref("red circle", "(10,20),(30,40)"), (e(" left of a "), True),
                      *ref("blue square", "(500,500),(600,600)"), (e(" and a "), True),
                      *ref("red circle", "(900,900),(990,990)"), ([sp.eod_id], True)), ["a.png"])


def test_ocr(sp):
    record = {"task": "ocr", "image": "a.png", "width": 1000, "height": 500,
              "texts": [{"text": "HELLO", "quad": [10, 5, 200, 5, 200, 50, 10, 50]},
                        {"text": "World 2", "quad": [0, 0, 1, 0, 1, 1, 0, 1]}]}
    s = encode_record(record, sp, num_image_tokens=N)
    e = sp.encode
    check(s, assemble((img(sp), False), (e("OCR with grounding:"), False),
                      ([sp.ref_start_id], True), (e("HELLO"), True), ([sp.ref_end_id, sp.quad_start_id], True),
                      (e("(10,10),(200,10),(200,100),(10,100)"), True), ([sp.quad_end_id], True),
                      ([sp.ref_start_id], True), (e("World 2"), True), ([sp.ref_end_id, sp.quad_start_id], True),
                      (e("(0,0),(1,0),(1,2),(0,2)"), True), ([sp.quad_end_id, sp.eod_id], True)), ["a.png"])


def test_text_task_whole_text_supervised(sp):
    text = "  A red circle.\nA blue square. "
    s = encode_record({"task": "text", "text": text}, sp)
    check(s, assemble((sp.encode(text), True), ([sp.eod_id], True)), [])


def test_plain_text_that_looks_like_tags_stays_text(sp):
    s = encode_record({"task": "vqa", "image": "a.png", "question": "Is <img>b.png</img> here?",
                       "answer": "<ref>no</ref>"}, sp, num_image_tokens=N)
    assert s.images == ["a.png"]
    assert int((s.tokens == sp.img_start_id).sum()) == 1 and sp.ref_start_id not in s.tokens


def test_to_grid_clips():
    assert [to_grid(v, 200) for v in (-3, 0, 0.1, 50, 199.9, 200, 250)] == [0, 0, 0, 250, 999, 999, 999]


# ------------------------------------------------------------------------------------- ChatML (SP)
def test_chat_single_turn_sentencepiece_custom_system(sp):
    record = {"id": "c1", "system": "Be brief.", "conversations": [
        {"from": "human", "value": "<img>a.png</img>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}]}
    s = encode_record(record, sp, num_image_tokens=N)
    e = sp.encode
    check(s, assemble(([sp.im_start_id], True), (e("system"), False), (e("\n"), False), (e("Be brief."), False),
                      ([sp.im_end_id], True), (e("\n"), True),
                      ([sp.im_start_id], True), (e("user"), False), (e("\n"), False), (e("Picture 1: "), False),
                      (img(sp), False), (e("\nWhat is it?"), False), ([sp.im_end_id], True), (e("\n"), True),
                      ([sp.im_start_id], True), (e("assistant"), False), (e("\n"), False), (e("A circle."), True),
                      ([sp.im_end_id], True), (e("\n"), True)), ["a.png"])


# ------------------------------------------------------------------------------------ real Qwen vocab
def test_qwen_vqa(qwen):
    s = encode_record({"task": "vqa", "image": "img/1.png", "question": "What colour is the shape?",
                       "answer": "red"}, qwen, num_image_tokens=256)
    e = qwen.encode
    expected = assemble(([151857] + [151859] * 256 + [151858], False), (e("What colour is the shape? Answer:"), False),
                        (e(" red"), True), ([151643], True))
    check(s, expected, ["img/1.png"])
    assert qwen.decode(s.tokens) == ("<img>" + "<imgpad>" * 256 + "</img>What colour is the shape? Answer: red"
                                     "<|endoftext|>")


def test_qwen_grounding(qwen):
    s = encode_record({"task": "grounding", "image": "a.png", "width": 448, "height": 448,
                       "phrase": "the dog", "box": [112, 0, 448, 224]}, qwen, num_image_tokens=N)
    assert qwen.decode(s.tokens) == ("<img>" + "<imgpad>" * N + "</img><ref>the dog</ref>"
                                     "<box>(250,0),(999,500)</box><|endoftext|>")
    assert qwen.decode(s.labels[s.labels != -100]) == "<box>(250,0),(999,500)</box><|endoftext|>"


CHAT = {"id": "two-turn", "conversations": [
    {"from": "user", "value": "Picture 1: <img>img/1.png</img>\nWhat is it?"},
    {"from": "assistant", "value": "A red circle."},
    {"from": "user", "value": "<img>img/2.png</img>\nAnd this one?"},
    {"from": "assistant", "value": "A <ref>blue square</ref><box>(10,20),(30,40)</box>."}]}


def test_qwen_chat_two_turns_two_images(qwen):
    s = encode_record(CHAT, qwen, num_image_tokens=N)
    e = qwen.encode
    S, E = 151644, 151645  # <|im_start|>, <|im_end|>
    nl = e("\n")
    image = [151857] + [151859] * N + [151858]
    expected = assemble(
        ([S], True), (e("system"), False), (nl, False), (e("You are a helpful assistant."), False), ([E], True), (nl, True),
        ([S], True), (e("user"), False), (nl, False), (e("Picture 1: "), False), (image, False),
        (e("\nWhat is it?"), False), ([E], True), (nl, True),
        ([S], True), (e("assistant"), False), (nl, False), (e("A red circle."), True), ([E], True), (nl, True),
        ([S], True), (e("user"), False), (nl, False), (e("Picture 2: "), False), (image, False),
        (e("\nAnd this one?"), False), ([E], True), (nl, True),
        ([S], True), (e("assistant"), False), (nl, False), (e("A "), True), ([151851], True), (e("blue square"), True),
        ([151852, 151853], True), (e("(10,20),(30,40)"), True), ([151854], True), (e("."), True), ([E], True),
        (nl, True))
    check(s, expected, ["img/1.png", "img/2.png"])
    pads = "<imgpad>" * N
    assert qwen.decode(s.tokens) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\nPicture 1: <img>{pads}</img>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
        f"<|im_start|>user\nPicture 2: <img>{pads}</img>\nAnd this one?<|im_end|>\n"
        "<|im_start|>assistant\nA <ref>blue square</ref><box>(10,20),(30,40)</box>.<|im_end|>\n")


def test_qwen_chat_labels_match_release_finetune_rule(qwen):
    """The release's rule, per turn: system/user -> [im_start] + ignore + [im_end, nl]; assistant -> [im_start]
    + ignore(role, nl) + answer + [im_end, nl]. Rebuilt here turn by turn from the token ids alone."""
    s = encode_record(CHAT, qwen, num_image_tokens=N)
    tokens = s.tokens.tolist()
    starts = [i for i, t in enumerate(tokens) if t == 151644] + [len(tokens)]
    role_len = {"system": 2, "user": 2, "assistant": 2}  # <|im_start|> role-name (one id each here)
    expected = []
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        turn = tokens[a:b]
        role = qwen.decode(turn[1:2])
        assert role in role_len and turn[2] == qwen.encode("\n")[0]
        if role == "assistant":
            expected += [turn[0], -100, -100] + turn[3:]
        else:
            expected += [turn[0]] + [-100] * (len(turn) - 3) + turn[-2:]
    np.testing.assert_array_equal(s.labels, expected)


# ------------------------------------------------------------------------------------ too-long policy
def test_too_long_reject_names_sample(sp):
    record = {"id": "s7", "task": "caption", "image": "a.png", "caption": "a red circle in the top left"}
    full = encode_record(record, sp, num_image_tokens=N)
    assert len(encode_record(record, sp, num_image_tokens=N, max_length=len(full))) == len(full)
    with pytest.raises(SampleTooLongError, match=r"train.jsonl:3 id='s7': \d+ tokens > max_length"):
        encode_record(record, sp, num_image_tokens=N, max_length=len(full) - 1, where="train.jsonl:3")


def test_too_long_truncate_cuts_the_end(sp):
    record = {"task": "caption", "image": "a.png", "caption": "a red circle in the top left"}
    full = encode_record(record, sp, num_image_tokens=N)
    prefix_len = N + 2 + len(sp.encode("Generate the caption in English:"))
    cut = encode_record(record, sp, num_image_tokens=N, max_length=prefix_len + 2, too_long="truncate")
    np.testing.assert_array_equal(cut.tokens, full.tokens[:prefix_len + 2])
    np.testing.assert_array_equal(cut.labels, full.labels[:prefix_len + 2])
    assert cut.images == ["a.png"] and cut.num_loss_tokens == 2


def test_too_long_truncate_rejects_cut_in_image_or_no_loss(sp):
    record = {"id": 9, "task": "caption", "image": "a.png", "caption": "a red circle"}
    for max_length in (1, N + 1):  # inside the image span, just before its </img>
        with pytest.raises(SampleTooLongError, match="image span"):
            encode_record(record, sp, num_image_tokens=N, max_length=max_length, too_long="truncate")
    with pytest.raises(SampleTooLongError, match="no supervised token"):
        encode_record(record, sp, num_image_tokens=N, max_length=N + 2, too_long="truncate")
    two_images = encode_record(CHAT, sp, num_image_tokens=N).tokens.tolist()
    second_image_end = len(two_images) - two_images[::-1].index(sp.img_end_id)
    with pytest.raises(SampleTooLongError, match="image span"):  # every image must survive a cut
        encode_record(CHAT, sp, num_image_tokens=N, max_length=second_image_end - 1, too_long="truncate")
    cut = encode_record(CHAT, sp, num_image_tokens=N, max_length=second_image_end + 3, too_long="truncate")
    assert cut.images == ["img/1.png", "img/2.png"] and len(cut) == second_image_end + 3
    with pytest.raises(SampleTooLongError, match="image span"):
        encode_record(CHAT, sp, num_image_tokens=N, max_length=40, too_long="truncate")


# ---------------------------------------------------------------------------------- malformed records
@pytest.mark.parametrize("record, message", [
    ({"task": "caption", "image": "a.png"}, "missing field 'caption'"),
    ({"task": "vqa", "image": "a.png", "question": "q?"}, "missing field 'answer'"),
    ({"image": "a.png", "caption": "x"}, "missing field 'task'"),
    ({"task": "poem", "text": "x"}, "unknown task 'poem'"),
    ({"task": "grounding", "image": "a", "height": 5, "phrase": "p", "box": [1, 2, 3, 4]}, "missing field 'width'"),
    ({"task": "grounding", "image": "a", "width": 5, "height": 5, "phrase": "p", "box": [1, 2, 3]}, "'box'"),
    ({"task": "grounding", "image": "a", "width": 5, "height": 5, "phrase": "p", "box": [4, 1, 2, 3]},
     "'box' .* is inverted \\(x1 > x2\\)"),
    ({"task": "referring", "image": "a", "width": 5, "height": 5, "phrase": "p", "box": [1, 4, 2, 3]},
     "'box' .* is inverted \\(y1 > y2\\)"),
    ({"task": "grounded_caption", "image": "a", "width": 5, "height": 5, "caption": "a cat",
      "refs": [{"phrase": "cat", "box": [3, 3, 1, 4]}]}, "'refs\\[\\].box' .* is inverted \\(x1 > x2\\)"),
    ({"task": "grounded_caption", "image": "a", "width": 5, "height": 5, "caption": "a cat",
      "refs": [{"phrase": "dog", "box": [1, 2, 3, 4]}]}, "'dog' does not occur"),
    ({"task": "ocr", "image": "a", "width": 5, "height": 5, "texts": [{"text": "A"}]}, "missing field 'quad'"),
    ({"task": "text", "text": ""}, "'text'"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "conversations\\[0\\].from is 'robot'"),
    ({"conversations": [{"from": "user"}]}, "missing field 'value'"),
    ({"conversations": [{"from": "user", "value": "<img>a.png and more"}]}, "unmatched <img>"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_malformed_records_name_the_field_and_place(sp, record, message):
    with pytest.raises(MalformedRecordError, match=message) as info:
        encode_record(record, sp, where="data.jsonl:5")
    assert "data.jsonl:5" in str(info.value)


# -------------------------------------------------------------------------------------------- prompts
def test_prompts(qwen):
    e = qwen.encode
    image = [151857] + [151859] * N + [151858]
    assert prompt_for("caption", qwen, num_image_tokens=N, image="a.png") == image + e("Describe the image in English:")
    assert prompt_for("vqa", qwen, num_image_tokens=N, image="a.png", question="Why?") == image + e("Why? Answer:")
    assert prompt_for("grounding", qwen, num_image_tokens=N, image="a.png", phrase="the dog") == (
        image + [151851] + e("the dog") + [151852, 151853])
    chat = prompt_for("chat", qwen, num_image_tokens=N, image="a.png", question="What is it?")
    assert qwen.decode(chat) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                 f"Picture 1: <img>{'<imgpad>' * N}</img>\nWhat is it?<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    history = prompt_for("chat", qwen, num_image_tokens=N, conversations=CHAT["conversations"][:3])
    full = encode_record(CHAT, qwen, num_image_tokens=N).tokens.tolist()
    assert history == full[:len(history)] and qwen.decode(history).endswith("<|im_start|>assistant\n")
    with pytest.raises(MalformedRecordError, match="missing field 'question'"):
        prompt_for("vqa", qwen, image="a.png")


# ------------------------------------------------------------------------------------------ raw files
def test_iter_records_jsonl_and_json_list(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"task":"text","text":"a"}\n\n{"task":"text","text":"b"}\n')
    assert list(iter_records(str(jsonl))) == [(f"{jsonl}:1", {"task": "text", "text": "a"}),
                                              (f"{jsonl}:3", {"task": "text", "text": "b"})]
    js = tmp_path / "d.json"
    js.write_text(json.dumps([CHAT, CHAT]))
    assert [w for w, _ in iter_records(str(js))] == [f"{js}[0]", f"{js}[1]"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task":"text","text":"a"}\n{oops\n')
    with pytest.raises(MalformedRecordError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_records(str(bad)))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"task":"text","text":"a"}\n{"task":"text","text":"caf\xe9"}\n')
    with pytest.raises(MalformedRecordError, match=r"latin1.jsonl:2: invalid UTF-8 \(byte 0xe9 at column 27\)"):
        list(iter_records(str(latin1)))
    js_bad = tmp_path / "latin1.json"
    js_bad.write_bytes(b'[{"task":"text","text":"a"},\n {"task":"text",\n  "text":"caf\xe9"}]')
    with pytest.raises(MalformedRecordError, match=r"latin1.json:3: invalid UTF-8 \(byte 0xe9\) in record \[1\]"):
        list(iter_records(str(js_bad)))
    for text, message in (("[1, 2", "invalid JSON"), ('[{"a": 1}] x', "extra data"), ("3", "expected a JSON list"),
                          ("[1 2]", "expected ',' or ']'")):
        (tmp_path / "x.json").write_text(text)
        with pytest.raises(MalformedRecordError, match=message):
            list(iter_records(str(tmp_path / "x.json")))
    (tmp_path / "one.json").write_text(' {"task": "text", "text": "a"} \n')
    (tmp_path / "empty.json").write_text("[ ]")
    assert [r for _, r in iter_records(str(tmp_path / "one.json"))] == [{"task": "text", "text": "a"}]
    assert list(iter_records(str(tmp_path / "empty.json"))) == []


def test_resolve_image_path_and_record_texts(tmp_path):
    data = str(tmp_path / "sub" / "d.jsonl")
    assert resolve_image_path("img/1.png", data) == str(tmp_path / "sub" / "img" / "1.png")
    assert resolve_image_path("/abs/1.png", data) == "/abs/1.png"
    assert record_texts(CHAT) == ["Picture 1: \nWhat is it?", "A red circle.", "\nAnd this one?",
                                  "A <ref>blue square</ref><box>(10,20),(30,40)</box>."]
    assert record_texts({"task": "grounded_caption", "caption": "a cat", "refs": [{"phrase": "cat"}]}) == [
        "a cat", "cat"]
