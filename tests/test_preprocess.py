"""tools/preprocess_data.py: JSONL / JSON list / tar shards in, one dataset + rejects out, same bytes for
any worker count."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from qwenvl_megatron.data.formats import encode_record
from qwenvl_megatron.data.indexed import IndexedDataset
from qwenvl_megatron.data.tokenizer import build_tokenizer, default_qwen_vocab_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
VOCAB = default_qwen_vocab_path()
pytestmark = pytest.mark.skipif(not os.path.isfile(VOCAB), reason=f"Qwen vocabulary not found at {VOCAB}")
N_IMG = 4  # small image spans keep the test fast; the layout is the same as with 256


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _png(color, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL with good and bad records, a stage-3 JSON list and a tar shard."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "img").mkdir()
    for i, color in enumerate(["red", "green", "blue"]):
        (root / "img" / f"{i}.png").write_bytes(_png(color))
    (root / "img" / "broken.png").write_bytes(_png("red")[:40])
    records = [
        {"task": "caption", "image": "img/0.png", "caption": "a red square"},
        {"task": "vqa", "image": "img/1.png", "question": "What colour?", "answer": "green"},
        {"task": "caption", "image": "img/missing.png", "caption": "gone"},
        {"task": "caption", "image": "img/broken.png", "caption": "corrupt"},
        "{not json",
        {"task": "dance", "image": "img/0.png"},
        {"task": "text", "text": "word " * 200},
        {"task": "grounding", "image": "img/2.png", "width": 8, "height": 6, "phrase": "the square",
         "box": [1, 1, 4, 5]},
        {"task": "text", "text": "Plain text sample."},
        {"task": "caption", "image": str(root / "img" / "2.png"), "caption": "absolute path"},
    ]
    jsonl = root / "train.jsonl"
    jsonl.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    chat = [{"id": "c0", "conversations": [
        {"from": "user", "value": "Picture 1: <img>img/0.png</img>\nWhat is it?"},
        {"from": "assistant", "value": "A red square."}]},
        {"id": "c1", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}]}]
    (root / "chat.json").write_text(json.dumps(chat))
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("k0.png", _png("blue"))
        add("k0.txt", b"a blue square")
        add("k1.jpg", _png("green"))   # a PNG under .jpg: Pillow reads the content, not the name
        add("k1.json", json.dumps({"caption": "a green square"}).encode())
        add("k2.png", _png("red"))     # no caption
    return root, records, chat


def _run(tool, corpus, out, workers, chunk_size=2):
    root = corpus[0]
    return tool.preprocess([str(root / "train.jsonl"), str(root / "chat.json"), str(root / "shard-000.tar")],
                           "qwen", VOCAB, str(out), workers=workers, seq_length=64, num_image_tokens=N_IMG,
                           too_long="reject", chunk_size=chunk_size, log_interval=3, log=io.StringIO())


def test_contents_and_rejects(tmp_path, corpus):
    root, records, chat = corpus
    tool = _load_tool()
    summary = _run(tool, corpus, tmp_path / "out", workers=1)
    tok = build_tokenizer("qwen", VOCAB)
    ds = IndexedDataset(str(tmp_path / "out"))
    ds.verify()
    good = [0, 1, 7, 8, 9]
    expected = [(encode_record(records[i], tok, N_IMG, 64), [os.path.join(root, "img", f)
                 for f in {0: ["0.png"], 1: ["1.png"], 7: ["2.png"], 8: [], 9: ["2.png"]}[i]]) for i in good]
    expected += [(encode_record(chat[0], tok, N_IMG, 64), [root / "img" / "0.png"]),
                 (encode_record(chat[1], tok, N_IMG, 64), [])]
    expected += [(encode_record({"task": "caption", "image": "x", "caption": c}, tok, N_IMG, 64), None)
                 for c in ("a blue square", "a green square")]
    assert len(ds) == len(expected) == summary["written"] == 9
    for i, (sample, image_files) in enumerate(expected):
        tokens, labels, images = ds[i]
        np.testing.assert_array_equal(tokens, sample.tokens)
        np.testing.assert_array_equal(labels, sample.labels)
        if image_files is not None:
            assert images == [open(p, "rb").read() for p in image_files]
    assert ds[7][2] == [_png("blue")] and ds[8][2] == [_png("green")]

    rejects = [json.loads(line) for line in open(str(tmp_path / "out") + ".rejects.jsonl")]
    assert [(os.path.basename(r["source"]), r.get("line", r.get("key"))) for r in rejects] == [
        ("train.jsonl", 3), ("train.jsonl", 4), ("train.jsonl", 5), ("train.jsonl", 6), ("train.jsonl", 7),
        ("shard-000.tar", "k2")]
    reasons = [r["reason"] for r in rejects]
    assert "cannot be read" in reasons[0] and "missing.png" in reasons[0]
    assert "cannot be decoded" in reasons[1] and "broken.png" in reasons[1]
    assert "invalid JSON" in reasons[2]
    assert "unknown task" in reasons[3]
    assert "max_length 64" in reasons[4]
    assert "no caption" in reasons[5]
    assert summary["records"] == 15 and summary["rejected"] == 6
    assert not os.path.exists(str(tmp_path / "out") + ".shards.tmp")


def test_worker_count_does_not_change_output(tmp_path, corpus):
    tool = _load_tool()
    _run(tool, corpus, tmp_path / "w1", workers=1)
    _run(tool, corpus, tmp_path / "w2", workers=2)
    for suffix in (".bin", ".idx", ".rejects.jsonl"):
        assert open(str(tmp_path / "w1") + suffix, "rb").read() == open(str(tmp_path / "w2") + suffix, "rb").read()
    # The chunking is fixed by --chunk-size, so one big chunk gives the same dataset as many small ones.
    _run(tool, corpus, tmp_path / "big", workers=2, chunk_size=1000)
    for suffix in (".bin", ".idx"):
        assert open(str(tmp_path / "w1") + suffix, "rb").read() == open(str(tmp_path / "big") + suffix, "rb").read()


def test_command_line_truncate_and_summary(tmp_path, corpus):
    root = corpus[0]
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, TOOL, "--input", str(root / "train.jsonl"), "--tokenizer-type", "qwen",
                           "--tokenizer-model", VOCAB, "--output-prefix", str(out), "--workers", "2",
                           "--seq-length", "64", "--num-image-tokens", str(N_IMG), "--too-long", "truncate",
                           "--chunk-size", "3", "--log-interval", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "records/s" in proc.stderr
    assert "done: 10 records -> 6 samples" in proc.stderr and "4 rejected" in proc.stderr
    ds = IndexedDataset(str(out))
    assert ds.lengths.tolist()[2] == 64  # the long text record, cut to --seq-length


def test_invalid_utf8_rejects_one_record_and_the_run_goes_on(tmp_path):
    """A line (.jsonl) or a record (.json list) with bytes that are not UTF-8 is a reject naming its file
    and line; every other record is written, and no temporary file stays behind."""
    tool = _load_tool()
    good = [{"task": "text", "text": f"record {i} café"} for i in range(4)]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b"\n".join(lines[:2] + [b'{"task": "text", "text": "bad \xff\xfe byte"}'] + lines[2:]) + b"\n")
    js = tmp_path / "list.json"
    body = [json.dumps(r, ensure_ascii=False).encode() for r in good[:2]]
    js.write_bytes(b"[\n" + body[0] + b",\n" + b'{"task": "text",\n "text": "caf\xe9 latin-1"},\n' + body[1] + b"\n]\n")
    out = tmp_path / "out"
    summary = tool.preprocess([str(jsonl), str(js)], "qwen", VOCAB, str(out), workers=1, seq_length=64,
                              num_image_tokens=N_IMG, chunk_size=2, log=io.StringIO())
    assert summary["records"] == 8 and summary["written"] == 6 and summary["rejected"] == 2
    tok = build_tokenizer("qwen", VOCAB)
    ds = IndexedDataset(str(out))
    expected = good + good[:2]
    assert len(ds) == len(expected)
    for i, record in enumerate(expected):
        np.testing.assert_array_equal(ds[i][0], encode_record(record, tok, N_IMG, 64).tokens)
    rejects = [json.loads(line) for line in open(str(out) + ".rejects.jsonl")]
    assert [(os.path.basename(r["source"]), r.get("line", r.get("index"))) for r in rejects] == [
        ("mixed.jsonl", 3), ("list.json", 1)]
    assert f"{jsonl}:3: invalid UTF-8 (byte 0xff" in rejects[0]["reason"]
    assert f"{js}:4: invalid UTF-8 (byte 0xe9) in record [1]" in rejects[1]["reason"]
    assert sorted(os.listdir(tmp_path)) == ["list.json", "mixed.jsonl", "out.bin", "out.idx", "out.rejects.jsonl"]


def test_a_failed_run_leaves_no_temporary_files(tmp_path):
    tool = _load_tool()
    (tmp_path / "ok.jsonl").write_text(json.dumps({"task": "text", "text": "fine"}) + "\n")
    with pytest.raises(SystemExit, match="input file not found"):
        tool.preprocess([str(tmp_path / "ok.jsonl"), str(tmp_path / "missing.jsonl")], "qwen", VOCAB,
                        str(tmp_path / "out"), log=io.StringIO())
    assert sorted(os.listdir(tmp_path)) == ["ok.jsonl"]


def test_image_urls_are_rejected_naming_the_field(tmp_path):
    """No downloading during preprocessing: an image given by URL (http, https, s3, gs) is a reject that names
    the field; the local record next to them is written."""
    tool = _load_tool()
    (tmp_path / "ok.png").write_bytes(_png("red"))
    urls = ["http://example.com/a.jpg", "https://example.com/b.png", "s3://bucket/c.jpg", "GS://bucket/d.jpg"]
    records = [{"task": "caption", "image": u, "caption": "remote"} for u in urls]
    records += [{"task": "vqa", "image": "ok.png", "question": "Colour?", "answer": "red"},
                {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"},
                                   {"from": "user", "value": "<img> https://example.com/e.jpg </img>\nWhat?"},
                                   {"from": "assistant", "value": "A cat."}]}]
    (tmp_path / "urls.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    summary = tool.preprocess([str(tmp_path / "urls.jsonl")], "qwen", VOCAB, str(tmp_path / "out"), seq_length=64,
                              num_image_tokens=N_IMG, log=io.StringIO())
    assert summary["records"] == 6 and summary["written"] == 1 and summary["rejected"] == 5
    tokens, _, images = IndexedDataset(str(tmp_path / "out"))[0]
    np.testing.assert_array_equal(tokens, encode_record(records[4], build_tokenizer("qwen", VOCAB), N_IMG).tokens)
    assert images == [_png("red")]
    rejects = [json.loads(line) for line in open(str(tmp_path / "out") + ".rejects.jsonl")]
    assert [r["line"] for r in rejects] == [1, 2, 3, 4, 6]
    for r, url in zip(rejects, urls):
        assert f"urls.jsonl:{r['line']}: field 'image' (task 'caption') names an image by URL ('{url}')" in r["reason"]
        assert "not downloaded" in r["reason"] and "img2dataset" in r["reason"]
    assert "field 'conversations[2].value' (task 'chat') names an image by URL ('https://example.com/e.jpg')" \
        in rejects[4]["reason"]


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale [h, w] or RGB [h, w, 3]) written by hand: Pillow cannot write 16-bit colour."""
    import struct
    import zlib
    h, w = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def test_images_the_two_decoders_would_read_differently_are_normalised(tmp_path):
    """Animated GIF, 16-bit PNG (grey and colour), CMYK JPEG, palette + transparency, RGBA, 1-bit, BMP:
    what reaches the index is an 8-bit RGB single-frame PNG holding exactly the official transform's pixels
    (Image.open(file).convert("RGB"), the first frame), which DALI and Pillow decode alike. Plain 8-bit
    RGB/grey JPEG/PNG/WebP are stored byte for byte; undecodable images are rejected with the reason."""
    rng = np.random.RandomState(0)
    noise = Image.fromarray(rng.randint(0, 256, (12, 16, 3), dtype=np.uint8))
    frames = [Image.new("RGB", (16, 12), c) for c in ("red", "blue", "green")]
    images = {
        "animated.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "grey16.png": _png16((np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)),
        "rgb16.png": _png16(rng.randint(0, 65536, (12, 16, 3))),
        "cmyk.jpg": _encoded(Image.new("CMYK", (16, 12), (0, 200, 255, 30)), "JPEG"),
        "palette.png": _encoded(noise.convert("P"), "PNG", transparency=3),
        "rgba.png": _encoded(noise.convert("RGBA"), "PNG"),
        "bilevel.png": _encoded(noise.convert("1"), "PNG"),
        "bitmap.bmp": _encoded(noise, "BMP"),
    }
    kept = {"rgb.jpg": _encoded(noise, "JPEG", quality=90), "grey.png": _encoded(noise.convert("L"), "PNG"),
            "rgb.webp": _encoded(noise, "WEBP", lossless=True)}
    broken = {"zero.png": b"", "truncated.png": _encoded(noise, "PNG")[:60], "text.jpg": b"not an image at all"}
    for name, data in {**images, **kept, **broken}.items():
        (tmp_path / name).write_bytes(data)
    names = [*images, *kept, *broken]
    jsonl = tmp_path / "images.jsonl"
    jsonl.write_text("".join(json.dumps({"task": "caption", "image": n, "caption": n}) + "\n" for n in names))
    summary = _load_tool().preprocess([str(jsonl)], "qwen", VOCAB, str(tmp_path / "out"), seq_length=64,
                                      num_image_tokens=N_IMG, log=io.StringIO())
    assert summary["records"] == len(names) == summary["written"] + summary["rejected"]
    assert summary["written"] == len(images) + len(kept) and summary["normalized_images"] == len(images)
    ds = IndexedDataset(str(tmp_path / "out"))
    for i, name in enumerate(images):
        (stored,) = ds[i][2]
        with Image.open(io.BytesIO(stored)) as im:
            assert (im.format, im.mode, getattr(im, "n_frames", 1), stored[24]) == ("PNG", "RGB", 1, 8), name
            pixels = np.asarray(im)
        with Image.open(tmp_path / name) as original:  # the official transform's decode
            np.testing.assert_array_equal(pixels, np.asarray(original.convert("RGB")), err_msg=name)
    assert np.asarray(Image.open(io.BytesIO(ds[0][2][0])))[0, 0].tolist() == [255, 0, 0]  # the first frame
    for i, name in enumerate(kept, len(images)):
        assert ds[i][2] == [kept[name]], name
    rejects = [json.loads(line) for line in open(str(tmp_path / "out") + ".rejects.jsonl")]
    assert [r["line"] for r in rejects] == [len(images) + len(kept) + k + 1 for k in range(len(broken))]
    for r, name in zip(rejects, broken):
        assert f"image {name!r} cannot be decoded: " in r["reason"], r
