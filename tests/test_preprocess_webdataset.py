"""tools/preprocess_data.py on data Megatron users already have: energon-prepared datasets (prepared by
energon's own `energon prepare`, non-interactively) and plain WebDataset tar shards (img2dataset's layout).
Every good key must land byte-exact in the index (tokens, labels, the image file's bytes); every bad key
(corrupt image, member missing, invalid JSON, truncated shard) is a reject naming its shard, key and reason,
and the run goes on."""
import importlib.util
import io
import json
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from qwenvl_megatron.data.formats import encode_record
from qwenvl_megatron.data.indexed import IndexedDataset
from qwenvl_megatron.data.tokenizer import build_tokenizer, default_qwen_vocab_path

webdataset = pytest.importorskip("webdataset")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
VOCAB = default_qwen_vocab_path()
pytestmark = pytest.mark.skipif(not os.path.isfile(VOCAB), reason=f"Qwen vocabulary not found at {VOCAB}")
N_IMG = 4


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module
    spec.loader.exec_module(module)
    return module


def _image(color, fmt="PNG", size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write_shard(path, samples):
    with webdataset.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def _truncate_inside(path, member_name):
    """Cut the shard in the middle of a member's data (as an interrupted copy would)."""
    with tarfile.open(path) as tar:
        member = tar.getmember(member_name)
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def _energon_prepare(path, sample_type, field_map):
    """energon's own prepare step, non-interactively (its click command, as `energon prepare` runs it)."""
    from click.testing import CliRunner
    from megatron.energon.tools.prepare import command
    result = CliRunner().invoke(command, [str(path), "--non-interactive", "--split-ratio", "1,0,0",
                                          "--sample-type", sample_type, "--field-map", json.dumps(field_map),
                                          "--num-workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert os.path.isfile(path / ".nv-meta" / "dataset.yaml") and os.path.isfile(path / ".nv-meta" / "split.yaml")


def _check_index(prefix, expected):
    """expected: [(record as the project writes it, [image bytes])] in order: tokens, labels and image bytes."""
    tok = build_tokenizer("qwen", VOCAB)
    ds = IndexedDataset(str(prefix))
    ds.verify()
    assert len(ds) == len(expected)
    for i, (record, images) in enumerate(expected):
        sample = encode_record(record, tok, N_IMG, 64)
        tokens, labels, blobs = ds[i]
        np.testing.assert_array_equal(tokens, sample.tokens)
        np.testing.assert_array_equal(labels, sample.labels)
        assert blobs == images, f"sample {i}: image bytes differ"


def _rejects(prefix):
    return [json.loads(line) for line in open(str(prefix) + ".rejects.jsonl")]


@pytest.fixture(scope="module")
def energon_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("energon")
    img = {"c0": _image("red", "JPEG"), "c1": _image("blue"), "c4": _image("green"), "c5": _image("white", "JPEG"),
           "c6": _image("black"), "v0": _image("navy", "JPEG"), "v1": _image("yellow", "JPEG")}
    cap = root / "captions"
    cap.mkdir()
    _write_shard(cap / "shard-000.tar", [
        {"__key__": "c0", "jpg": img["c0"], "txt": "a red square"},
        {"__key__": "c1", "png": img["c1"], "txt": "a blue square"},
        {"__key__": "c2", "png": _image("red")[:40], "txt": "a corrupt image"},
        {"__key__": "c3", "txt": "no image at all"},
    ])
    _write_shard(cap / "shard-001.tar", [
        {"__key__": "c4", "png": img["c4"], "txt": "a green square"},
        {"__key__": "c5", "jpg": img["c5"], "txt": "  a white square  "},
        {"__key__": "c6", "png": img["c6"], "txt": "a black square"},
    ])
    _energon_prepare(cap, "CaptioningSample", {"image": "jpg,png", "caption": "txt"})
    _truncate_inside(cap / "shard-001.tar", "c6.png")  # after prepare: the index still lists c6

    vqa = root / "vqa"
    vqa.mkdir()
    _write_shard(vqa / "shard-000.tar", [
        {"__key__": "v0", "jpg": img["v0"], "json": {"question": "What colour is it?", "answers": ["blue", "navy",
                                                     "dark blue"], "weights": [0.2, 0.4, 0.4]}},
        {"__key__": "v1", "jpg": img["v1"], "json": {"question": "Is it bright?", "answers": ["no", "yes"],
                                                     "weights": [0.3, 0.7]}},
        {"__key__": "v2", "jpg": img["v1"], "json": b"{not json"},
        {"__key__": "v3", "jpg": img["v1"], "json": {"question": "Where are the answers?", "weights": [1]}},
    ])
    _energon_prepare(vqa, "VQASample", {"image": "jpg", "context": "json[question]", "answers": "json[answers]",
                                        "answer_weights": "json[weights]"})
    return root, img


def test_energon_datasets(tmp_path, energon_datasets):
    root, img = energon_datasets
    tool = _load_tool()
    out = tmp_path / "out"
    summary = tool.preprocess([str(root / "captions"), str(root / "vqa")], "qwen", VOCAB, str(out),
                              seq_length=64, num_image_tokens=N_IMG, log=io.StringIO())
    caption = lambda text: {"task": "caption", "image": "x", "caption": text}
    vqa = lambda q, a: {"task": "vqa", "image": "x", "question": q, "answer": a}
    _check_index(out, [
        (caption("a red square"), [img["c0"]]), (caption("a blue square"), [img["c1"]]),
        (caption("a green square"), [img["c4"]]), (caption("a white square"), [img["c5"]]),
        (vqa("What colour is it?", "navy"), [img["v0"]]),   # the highest weight, the first of a tie
        (vqa("Is it bright?", "yes"), [img["v1"]]),
    ])
    rejects = _rejects(out)
    assert [(os.path.relpath(r["source"], root), r["key"]) for r in rejects] == [
        ("captions/shard-000.tar", "c2"), ("captions/shard-000.tar", "c3"), ("captions/shard-001.tar", "c6"),
        ("vqa/shard-000.tar", "v2"), ("vqa/shard-000.tar", "v3")]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith(f"{root / 'captions' / 'shard-000.tar'}:c2: image ") and "cannot be decoded" in reasons[0]
    assert "FieldAccessError" in reasons[1] and "'png'" in reasons[1]             # the member missing
    assert "cannot be read from the shard" in reasons[2] and "end of" in reasons[2]  # truncated after prepare
    assert "part 'json' cannot be decoded" in reasons[3] and "JSONDecodeError" in reasons[3]
    assert "FieldAccessError" in reasons[4] and "answers" in reasons[4]
    assert summary["records"] == 11 and summary["written"] == 6 and summary["rejected"] == 5


def test_energon_same_output_for_any_worker_count(tmp_path, energon_datasets):
    root = energon_datasets[0]
    tool = _load_tool()
    for workers in (1, 2):
        tool.preprocess([str(root / "captions"), str(root / "vqa")], "qwen", VOCAB, str(tmp_path / f"w{workers}"),
                        workers=workers, seq_length=64, num_image_tokens=N_IMG, log=io.StringIO())
    for suffix in (".bin", ".idx", ".rejects.jsonl"):
        assert open(str(tmp_path / "w1") + suffix, "rb").read() == open(str(tmp_path / "w2") + suffix, "rb").read()


def test_energon_dataset_errors_stop_the_run(tmp_path, energon_datasets):
    root = energon_datasets[0]
    tool = _load_tool()
    with pytest.raises(SystemExit, match="split part 'nope'"):
        tool.preprocess([str(root / "vqa")], "qwen", VOCAB, str(tmp_path / "a"), log=io.StringIO(), split_part="nope")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(SystemExit, match=r"plain_dir: a directory must be an energon dataset \(with .nv-meta/"):
        tool.preprocess([str(tmp_path / "plain_dir")], "qwen", VOCAB, str(tmp_path / "b"), log=io.StringIO())
    crude = tmp_path / "crude"
    shutil.copytree(root / "vqa", crude)
    (crude / ".nv-meta" / "dataset.yaml").write_text("__module__: megatron.energon\n__class__: CrudeWebdataset\n")
    with pytest.raises(SystemExit, match=r"crude: energon sample type CrudeSample is not supported; expected one of "
                                         r"\['CaptioningSample', 'VQASample'\]"):
        tool.preprocess([str(crude)], "qwen", VOCAB, str(tmp_path / "c"), log=io.StringIO())
    assert sorted(os.listdir(tmp_path)) == ["crude", "plain_dir"]


def test_plain_webdataset_shards(tmp_path):
    """img2dataset's layout (key.jpg + key.txt + key.json with url/caption/status...), a VQA key, and every
    kind of bad key; the shard is cut inside k7's image, so k7 is the truncated key and k8 is never seen."""
    img = {k: _image(c, "JPEG" if k in ("k0", "k6") else "PNG") for k, c in
           [("k0", "red"), ("k1", "blue"), ("k2", "green"), ("k6", "white"), ("k7", "black"), ("k8", "gray")]}
    meta = lambda key, caption: {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key,
                                 "status": "success", "error_message": None, "width": 8, "height": 6}
    shard = tmp_path / "00000.tar"
    _write_shard(shard, [
        {"__key__": "k0", "jpg": img["k0"], "txt": "a red square", "json": meta("k0", "a red square")},
        {"__key__": "k1", "png": img["k1"], "json": {"caption": "a blue square"}},
        {"__key__": "k2", "png": img["k2"], "json": {"question": "Which colour?", "answers": ["lime", "green",
                                                                                              "green"]}},
        {"__key__": "k3", "jpg": _image("red", "JPEG")[:60], "txt": "a corrupt image"},
        {"__key__": "k4", "txt": "an image missing"},
        {"__key__": "k5", "png": img["k1"], "json": b'{"caption": '},
        {"__key__": "k6", "jpg": img["k6"], "txt": "a white square"},
        {"__key__": "k7", "png": img["k7"], "txt": "a black square"},
        {"__key__": "k8", "png": img["k8"], "txt": "a gray square"},
    ])
    _truncate_inside(shard, "k7.png")
    tool = _load_tool()
    out = tmp_path / "out"
    summary = tool.preprocess([str(shard)], "qwen", VOCAB, str(out), seq_length=64, num_image_tokens=N_IMG,
                              log=io.StringIO())
    caption = lambda text: {"task": "caption", "image": "x", "caption": text}
    _check_index(out, [(caption("a red square"), [img["k0"]]), (caption("a blue square"), [img["k1"]]),
                       ({"task": "vqa", "image": "x", "question": "Which colour?", "answer": "green"}, [img["k2"]]),  # most given
                       (caption("a white square"), [img["k6"]])])
    rejects = _rejects(out)
    assert [(r["source"], r["key"]) for r in rejects] == [(str(shard), k) for k in ("k3", "k4", "k5", "k7")]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith(f"{shard}:k3: image 'k3.jpg' cannot be decoded")
    assert "no image part (jpg/jpeg/png/webp)" in reasons[1]
    assert "part 'json' cannot be decoded" in reasons[2]
    assert "truncated or damaged tar shard" in reasons[3] and "'k7.png'" in reasons[3]
    assert summary["records"] == 8 and summary["written"] == 4 and summary["rejected"] == 4


def test_missing_packages_are_one_line_errors(tmp_path, monkeypatch, energon_datasets):
    root = energon_datasets[0]
    tool = _load_tool()
    shard = tmp_path / "s.tar"
    _write_shard(shard, [{"__key__": "a", "png": _image("red"), "txt": "red"}])
    monkeypatch.setitem(sys.modules, "webdataset.tariterators", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        tool.preprocess([str(shard)], "qwen", VOCAB, str(tmp_path / "o"), log=io.StringIO())
    assert "needs the 'webdataset' package: pip install webdataset" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delitem(sys.modules, "webdataset.tariterators")
    from qwenvl_megatron.data import webdataset_source
    monkeypatch.setattr(webdataset_source, "_FACTORIES", {})
    monkeypatch.setitem(sys.modules, "megatron.energon", None)
    with pytest.raises(SystemExit) as e:
        tool.preprocess([str(root / "vqa")], "qwen", VOCAB, str(tmp_path / "o"), log=io.StringIO())
    assert "needs the 'megatron-energon' package: pip install megatron-energon" in str(e.value)
    assert "\n" not in str(e.value)
