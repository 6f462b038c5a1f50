"""Tokenizers: the real Qwen vocabulary (ids checked against the rank file itself) and a tiny SentencePiece
model trained here."""
import base64
import os
import random
import subprocess
import sys

import pytest

from qwenvl_megatron.data.tokenizer import (
    SENTENCEPIECE_SPECIAL_TOKENS, QwenTokenizer, SentencePieceTokenizer, TokenizerFileError, build_tokenizer,
    default_qwen_vocab_path, train_sentencepiece)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_VOCAB = os.environ.get("QWEN_TIKTOKEN") or os.path.join(REPO, ".venv", "share", "qwen.tiktoken")

# Reference section 1.4.
REFERENCE_SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|extra_0|>": 151646,
    "<|extra_204|>": 151850, "<ref>": 151851, "</ref>": 151852, "<box>": 151853, "</box>": 151854,
    "<quad>": 151855, "</quad>": 151856, "<img>": 151857, "</img>": 151858, "<imgpad>": 151859,
}


def demo_corpus(n=1500, seed=0):
    rng = random.Random(seed)
    words = ("a the red green blue yellow circle square triangle shape in on of top left right bottom corner "
             "what colour is this picture image describe caption answer there small large near").split()
    lines = []
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        lines.append(f"{sentence.capitalize()} ({rng.randint(0, 999)},{rng.randint(0, 999)}).")
    return lines


@pytest.fixture(scope="module")
def qwen():
    if not os.path.isfile(QWEN_VOCAB):
        pytest.skip(f"Qwen vocabulary not found at {QWEN_VOCAB} (set QWEN_TIKTOKEN)")
    return QwenTokenizer(QWEN_VOCAB)


@pytest.fixture(scope="module")
def qwen_ranks():
    ranks = {}
    with open(QWEN_VOCAB, "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
    return SentencePieceTokenizer(train_sentencepiece(demo_corpus(), 400, prefix))


# ------------------------------------------------------------------------------------------ Qwen
def test_default_vocab_path_follows_env(monkeypatch):
    monkeypatch.setenv("QWEN_TIKTOKEN", "/some/where/qwen.tiktoken")
    assert default_qwen_vocab_path() == "/some/where/qwen.tiktoken"
    monkeypatch.delenv("QWEN_TIKTOKEN")
    assert default_qwen_vocab_path() == os.path.join(REPO, ".venv", "share", "qwen.tiktoken")


def test_qwen_special_ids_match_reference(qwen):
    assert qwen.vocab_size == 151860
    for token, token_id in REFERENCE_SPECIAL_IDS.items():
        assert qwen.token_id(token) == token_id
        assert qwen.encode(token, allow_special=True) == [token_id]
        assert qwen.decode([token_id]) == token
    attrs = dict(eod_id=151643, pad_id=151643, im_start_id=151644, im_end_id=151645, ref_start_id=151851,
                 ref_end_id=151852, box_start_id=151853, box_end_id=151854, quad_start_id=151855,
                 quad_end_id=151856, img_start_id=151857, img_end_id=151858, img_pad_id=151859)
    assert {a: getattr(qwen, a) for a in attrs} == attrs


def test_qwen_ids_agree_with_rank_file(qwen, qwen_ranks):
    assert qwen.encode("Hello world") == [qwen_ranks[b"Hello"], qwen_ranks[b" world"]]
    chinese = "你好".encode()
    assert qwen.encode("你好") == [qwen_ranks[chinese]]
    # \p{N} in the regex: every digit is its own pre-token, so coordinates are sequences of digit ids.
    assert qwen.encode("(123,45)") == [qwen_ranks[b"("], qwen_ranks[b"1"], qwen_ranks[b"2"], qwen_ranks[b"3"],
                                       qwen_ranks[b","], qwen_ranks[b"4"], qwen_ranks[b"5"], qwen_ranks[b")"]]


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.\n\n  Indented, with 'quotes' and tabs\t!",
    "图片里有一只红色的圆形，在左上角。",
    "Mixed 中文 and English: 12345 — ✓",
])
def test_qwen_round_trip_plain(qwen, text):
    ids = qwen.encode(text)
    assert qwen.decode(ids) == text
    assert not any(qwen.is_special(i) for i in ids)


def test_qwen_nfc_normalises_like_the_release(qwen):
    """The release's QWenTokenizer NFC-normalises before BPE: decomposed accents give the composed ids."""
    import unicodedata
    composed = "café naïve Ångström"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert qwen.encode(decomposed) == qwen.encode(composed)
    assert qwen.encode("<ref>" + decomposed, allow_special=True) == [151851] + qwen.encode(composed)
    assert len(qwen.encode(composed)) == 8
    assert qwen.decode(qwen.encode(decomposed)) == composed


def test_qwen_round_trip_tags_with_allow_special(qwen):
    text = "<ref>the dog</ref><box>(12,34),(560,780)</box> and <quad>(1,2),(3,4),(5,6),(7,8)</quad><|im_end|>"
    ids = qwen.encode(text, allow_special=True)
    expected = ([151851] + qwen.encode("the dog") + [151852, 151853] + qwen.encode("(12,34),(560,780)")
                + [151854] + qwen.encode(" and ") + [151855] + qwen.encode("(1,2),(3,4),(5,6),(7,8)")
                + [151856, 151645])
    assert ids == expected
    assert qwen.decode(ids) == text


def test_qwen_plain_text_never_yields_special_ids(qwen):
    text = "an HTML <img> tag, <imgpad>, <ref>x</ref> and <|endoftext|> as plain text"
    ids = qwen.encode(text)
    assert 151857 not in ids
    assert not any(qwen.is_special(i) for i in ids)
    assert qwen.decode(ids) == text
    assert 151857 in qwen.encode(text, allow_special=True)


def test_qwen_decode_rejects_padding_rows(qwen):
    with pytest.raises(ValueError, match="151900"):
        qwen.decode([9707, 151900])


def test_qwen_missing_or_malformed_file_named(tmp_path, qwen_ranks):
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(TokenizerFileError, match="nope.tiktoken"):
        QwenTokenizer(str(missing))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerFileError, match=r"bad.tiktoken:2"):
        QwenTokenizer(str(bad))
    short = tmp_path / "short.tiktoken"
    short.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerFileError, match=r"short.tiktoken: has 2 ranks"):
        QwenTokenizer(str(short))


def test_build_tokenizer(qwen, sp):
    assert build_tokenizer("qwen", QWEN_VOCAB).encode("Hello world") == qwen.encode("Hello world")
    assert build_tokenizer("sentencepiece", sp.model_file).encode("red circle") == sp.encode("red circle")
    with pytest.raises(ValueError, match="'gpt2'"):
        build_tokenizer("gpt2", QWEN_VOCAB)


# ---------------------------------------------------------------------------------- SentencePiece
def test_sentencepiece_specials_are_single_distinct_ids(sp):
    ids = [sp.encode(t, allow_special=True) for t in SENTENCEPIECE_SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    flat = [i[0] for i in ids]
    assert len(set(flat)) == len(flat)
    assert [sp.decode([i]) for i in flat] == list(SENTENCEPIECE_SPECIAL_TOKENS)
    assert (sp.eod_id, sp.pad_id, sp.im_start_id, sp.img_start_id, sp.img_pad_id, sp.box_end_id) == (
        sp.token_id("<|endoftext|>"), sp.token_id("<|endoftext|>"), sp.token_id("<|im_start|>"),
        sp.token_id("<img>"), sp.token_id("<imgpad>"), sp.token_id("</box>"))
    assert sp.vocab_size <= 400


def test_sentencepiece_round_trips(sp):
    plain = "Red circle  in the\ntop left: (12,345)!  中文 ok"
    ids = sp.encode(plain)
    assert sp.decode(ids) == plain
    assert not any(sp.is_special(i) for i in ids)
    tagged = "<|im_start|>user\nPicture 1: <img><imgpad></img>\nWhere?<|im_end|>\n<ref>red</ref><box>(1,2),(3,4)</box>"
    ids = sp.encode(tagged, allow_special=True)
    assert sp.decode(ids) == tagged
    assert ids[0] == sp.im_start_id and ids[-1] == sp.box_end_id
    # Pieces concatenate: encoding parts separately decodes to the joined text (no dummy-prefix spaces).
    assert sp.decode(sp.encode("Answer:") + sp.encode(" red")) == "Answer: red"


def test_sentencepiece_plain_text_never_yields_special_ids(sp):
    ids = sp.encode("<img>not an image</img><|endoftext|>")
    assert sp.img_start_id not in ids and sp.eod_id not in ids
    assert not any(sp.is_special(i) for i in ids)


def test_sentencepiece_splits_coordinates_into_characters(sp):
    text = "(123,45),(6,789)"
    assert [sp.decode([i]) for i in sp.encode(text)] == list(text)


def test_sentencepiece_bad_model_named(tmp_path):
    with pytest.raises(TokenizerFileError, match="missing.model"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerFileError, match="junk.model"):
        SentencePieceTokenizer(str(junk))
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(demo_corpus(10), 100, str(tmp_path / "small"))


def test_train_tokenizer_tool_reads_txt_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(demo_corpus(300)) + "\n")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"task":"caption","image":"img/0001.png","caption":"a purple hexagon"}\n'
                     '{"conversations":[{"from":"user","value":"Picture 1: <img>x.png</img>\\nWhat?"},'
                     '{"from":"assistant","value":"An octagon."}]}\n')
    out = tmp_path / "tok" / "demo"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"),
                             "--input", str(txt), str(jsonl), "--vocab-size", "350", "--output", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"read 3 sentences from {jsonl}" in result.stderr  # caption + two turns (image removed)
    tok = SentencePieceTokenizer(str(out) + ".model")
    assert tok.decode(tok.encode("a purple hexagon")) == "a purple hexagon"
    assert 290 <= tok.vocab_size <= 350
