"""The demo's glue (examples/demo/demo_tools.py) and the script's syntax; the full demo is `bash examples/demo.sh`.

Checked here: the warm-up records are exactly the corpus's caption and text sentences; the model config
takes the tokenizer's vocabulary size and <img> id; the summary reads the trainer's real log format and
fails below the accuracy bar.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "examples", "demo", "demo_tools.py")


def load_tools():
    spec = importlib.util.spec_from_file_location("demo_tools", TOOLS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "examples", "demo.sh")], check=True)
    script = open(os.path.join(ROOT, "examples", "demo.sh")).read()
    # the evaluation asks the held-out chat questions too and scores them with the corpus's rule
    assert '"$DATA/heldout_chat.jsonl"' in script and "--chat-metric synthetic" in script


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from qwenvl_megatron.data.synthetic import generate_corpus

    out = str(tmp_path_factory.mktemp("corpus"))
    generate_corpus(out, seed=3, num_train=60, num_heldout=4, image_size=112, workers=1, progress=None)
    return out


def test_warmup_records_are_the_corpus_sentences(corpus, tmp_path):
    tools = load_tools()
    out = tmp_path / "warmup.jsonl"
    tools.main(["warmup-records", "--data-dir", corpus, "--out", str(out)])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = []
    for name in ("stage1.jsonl", "stage2.jsonl"):
        for line in open(os.path.join(corpus, name)):
            r = json.loads(line)
            if r["task"] in ("caption", "text"):
                want.append({"task": "text", "text": r["caption"] if r["task"] == "caption" else r["text"]})
    assert got == want and len(got) > 60  # 60 captions plus the stage-2 text records


def test_model_config_follows_the_tokenizer(corpus, tmp_path):
    from qwenvl_megatron.data.tokenizer import build_tokenizer
    from qwenvl_megatron.models.config import QwenVLConfig, tiny

    prefix = str(tmp_path / "sp")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
                    os.path.join(corpus, "corpus.txt"), "--vocab-size", "400", "--output", prefix],
                   check=True, capture_output=True)
    tok = build_tokenizer("sentencepiece", prefix + ".model")
    out = tmp_path / "config.json"
    load_tools().main(["model-config", "--tokenizer", prefix + ".model", "--out", str(out)])
    cfg = QwenVLConfig.from_hf_config(json.loads(out.read_text()))
    assert cfg == tiny(vocab_size=tok.vocab_size, image_start_id=tok.img_start_id)
    assert (cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id) == (tok.img_start_id, tok.img_end_id,
                                                                         tok.img_pad_id)
    # The demo's input size keeps the preset's 8x8 patch grid: 40 px -> 5 px patches, all else the preset.
    load_tools().main(["model-config", "--tokenizer", prefix + ".model", "--image-size", "40", "--out", str(out)])
    small = QwenVLConfig.from_hf_config(json.loads(out.read_text()))
    assert (small.vit.image_size, small.vit.patch_size, small.vit.pos_grid) == (40, 5, 8)
    assert small == cfg.replace(vit={"image_size": 40, "patch_size": 5})
    with pytest.raises(ValueError, match="multiple of vit.patch_size"):
        load_tools().main(["model-config", "--tokenizer", prefix + ".model", "--image-size", "40",
                           "--patch-size", "6", "--out", str(out)])


def _log_line(it, total, loss, sps, elapsed):
    # The format of qwenvl_megatron/training/train.py's log line.
    return (f"iter {it}/{total} | loss {loss:.4f} | lr 1.000e-03 | grad norm 0.500 | {sps:.1f} samples/s | "
            f"1,000 tokens/s | 0.01 TFLOP/s/GPU | MFU 0.0% | skipped 0 | elapsed 0:00:{elapsed:02d} | ETA 0:00:01\n")


def _work_dir(tmp_path, accuracy):
    logs = tmp_path / "logs"
    logs.mkdir()
    for k, name in enumerate(("warmup", "stage1", "stage2", "stage3")):
        (logs / f"{name}.log").write_text("noise\n" + _log_line(1, 3, 5.0 - k, 50.0, 1) + "loaded x\n"
                                          + _log_line(2, 3, 2.0, 100.0, 2) + _log_line(3, 3, 1.5 - k / 10, 300.0, 3))
    (tmp_path / "times.txt").write_text("data 20\nwarmup 30\nstage1 40\nstage2 90\nstage3 30\nconvert 10\n"
                                        "evaluate 12\ntotal 232\n")
    (tmp_path / "eval.json").write_text(json.dumps(
        {"scores": {"caption": {"samples": 500, "correct": int(500 * accuracy), "accuracy": accuracy},
                    "chat": {"samples": 500, "correct": 371, "accuracy": 0.742}}}))
    return str(tmp_path)


def test_stage_log_parsing(tmp_path):
    tools = load_tools()
    work = _work_dir(tmp_path, 0.95)
    s = tools.parse_stage_log(os.path.join(work, "logs", "stage2.log"))
    # first/last loss of the run, steps, mean samples/s of the steady windows (first window left out)
    assert s == {"first_loss": 3.0, "last_loss": 1.3, "steps": 3, "samples_per_s": 200.0, "train_s": 3}
    assert tools.parse_stage_log(os.path.join(work, "logs", "missing.log")) is None


def test_summary_passes_and_fails_on_the_accuracy_bar(tmp_path, capsys):
    tools = load_tools()
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = _work_dir(tmp_path / "good", 0.95)
    assert tools.main(["summary", "--work-dir", good]) == 0
    out = capsys.readouterr().out
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")] for line in out.splitlines())}
    assert rows["stage 2: multi-task (all trainable)"] == ["3", "3.000", "1.300", "200", "90"]
    assert rows["LLM warm-up (text only; ViT+adapter frozen)"] == ["3", "5.000", "1.500", "200", "30"]
    assert rows["convert to HF"] == ["", "", "", "", "10"]
    lines = out.splitlines()
    cap = lines.index("held-out caption accuracy (colour AND shape right): 0.950 on 500 images (target >= 0.9)")
    assert lines[cap + 1] == ("held-out chat accuracy (ChatML 'what is in the picture?', colour AND shape right): "
                              "0.742 on 500 images")  # stage 3's answers, printed beside the caption score
    assert "total wall time: 232 s" in out
    bad = _work_dir(tmp_path / "bad", 0.85)
    capsys.readouterr()
    assert tools.main(["summary", "--work-dir", bad]) == 0  # reported, not a failure of the command
    assert "note: caption accuracy 0.850 is below the target 0.9" in capsys.readouterr().out
    assert tools.main(["summary", "--work-dir", bad, "--min-accuracy", "0.9"]) == 1
    assert tools.main(["summary", "--work-dir", bad, "--min-accuracy", "0.8"]) == 0
    scores = json.load(open(os.path.join(bad, "eval.json")))
    del scores["scores"]["chat"]  # an evaluation without chat records: reported as n/a, not a failure
    json.dump(scores, open(os.path.join(bad, "eval.json"), "w"))
    capsys.readouterr()
    assert tools.main(["summary", "--work-dir", bad, "--min-accuracy", "0.8"]) == 0
    assert "colour AND shape right): n/a" in capsys.readouterr().out
    os.remove(os.path.join(bad, "eval.json"))
    assert tools.main(["summary", "--work-dir", bad]) == 1


def test_vision_probe_trains_and_scores(corpus):
    """The probe behind the demo's image size (docs/demo.md, run 11) runs on a corpus and reports scores."""
    probe = os.path.join(ROOT, "examples", "demo", "vision_probe.py")
    out = subprocess.run([sys.executable, probe, "--data-dir", corpus, "--steps", "3", "--num-train", "20"],
                         check=True, capture_output=True, text=True).stdout
    assert "loaded 20 training and 4 held-out images" in out and "40 px in 5 px patches" in out
    last = [line for line in out.splitlines() if line.startswith("step 3 |")]
    assert len(last) == 1, out
    shape = float(last[0].split("held-out shape ")[1].split()[0])
    assert 0.0 <= shape <= 1.0
