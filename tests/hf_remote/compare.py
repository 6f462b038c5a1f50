"""Issue #10's acceptance: the official Qwen-VL remote code, loading our export, gives our logits.

Two halves in two interpreters (tests/hf_remote/run.sh runs both):
  compare.py prepare WORK           project venv: a small random Qwen-VL -> Megatron checkpoint (hf-to-mcore)
                                    -> export (mcore-to-hf) -> our prompt logits and 8 greedy tokens (generate.py)
  compare.py check WORK CODE_DIR    a venv with transformers: the export with the official .py files,
                                    AutoModelForCausalLM(trust_remote_code, fp32) on the same prompt (the
                                    official tokenizer's ids), then greedy decoding through its KV cache
The model has the release's structure and every field the official code reads (vocabulary and image ids of
qwen.tiktoken, 256 queries, a 448 px image so the 16x16 ViT table is resized to 32x32, output_dim // 128
adapter heads, seq_length 2048 so dynamic NTK / log-n scaling stay off); only the widths and depths are small.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOLERANCE = 1e-4
PROMPT = "Describe the image in English: a picture of"
NEW_TOKENS = 8  # greedy tokens through the KV caches (ours: megatron's inference context; theirs: past_key_values)
SIZES = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, kv_channels=64, intermediate_size=2 * 384,
             visual={"width": 64, "layers": 2, "heads": 4, "output_dim": 256})  # the rest is the release's config.json


def prepare(work: str) -> None:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import reference_qwenvl as R
    from qwenvl_megatron.convert.hf_checkpoint import save_hf_dir
    from qwenvl_megatron.data.tokenizer import build_tokenizer, default_qwen_vocab_path
    from qwenvl_megatron.inference.prompts import encode_prompt
    from qwenvl_megatron.inference.runner import load_images
    from qwenvl_megatron.models.config import QwenVLConfig

    vocab = default_qwen_vocab_path()
    hf = R.hf_config(**SIZES)
    cfg = QwenVLConfig.from_hf_config(hf)
    save_hf_dir(f"{work}/source", R.random_hf_state_dict(hf, seed=0), cfg)
    rng = np.random.default_rng(0)
    image = f"{work}/image.png"  # already 448x448: both sides' bicubic resize is the identity
    Image.fromarray(rng.integers(0, 256, (cfg.vit.image_size, cfg.vit.image_size, 3), dtype=np.uint8)).save(image)
    photo = f"{work}/photo.jpg"  # only the preprocessing is compared on this one (a real resize)
    y, x = np.mgrid[0:480, 0:640]
    smooth = np.stack([x * 0.4, y * 0.5, (x + y) * 0.3], -1) % 256 + rng.normal(0, 20, (480, 640, 3))
    Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).save(photo, quality=90)
    def tool(name, *args):
        return subprocess.run([sys.executable, f"{ROOT}/tools/{name}.py", *args], check=True, text=True,
                              stdout=subprocess.PIPE).stdout

    tool("convert_checkpoint", "hf-to-mcore", "--hf-dir", f"{work}/source", "--out", f"{work}/mcore")
    tool("convert_checkpoint", "mcore-to-hf", "--load", f"{work}/mcore", "--out", f"{work}/export",
         "--tokenizer-file", vocab)
    generated = tool("generate", "--load", f"{work}/mcore", "--tokenizer-model", vocab, "--prompt", PROMPT,
                     "--image", image, "--max-new-tokens", str(NEW_TOKENS), "--logits-out", f"{work}/ours_logits.npy")
    tok = build_tokenizer("qwen", vocab)
    ids, _ = encode_prompt(PROMPT, tok, cfg.adapter.num_queries, image)
    np.save(f"{work}/ours_pixels.npy", load_images([image, photo], cfg.vit.image_size).numpy())
    with open(f"{work}/ours.json", "w") as f:
        json.dump({"prompt": PROMPT, "image": image, "photo": photo, "ids": ids, "image_start_id": cfg.image_start_id,
                   "tokens": json.loads(generated)["tokens"], "stop_ids": [tok.eod_id, tok.im_end_id]}, f)


def _local_code(export: str, code_dir: str) -> None:
    """Copy the official .py files next to the weights and point auto_map at them (no Hub)."""
    import shutil

    for name in ("configuration_qwen", "modeling_qwen", "visual", "qwen_generation_utils", "tokenization_qwen"):
        shutil.copy(os.path.join(code_dir, name + ".py"), export)
    local = lambda ref: ref.split("--", 1)[-1] if isinstance(ref, str) else ref  # "Qwen/Qwen-VL--m.C" -> "m.C"
    for name in ("config.json", "tokenizer_config.json"):
        path = os.path.join(export, name)
        with open(path) as f:
            conf = json.load(f)
        conf["auto_map"] = {k: [local(r) for r in v] if isinstance(v, list) else local(v)
                            for k, v in conf["auto_map"].items()}
        with open(path, "w") as f:
            json.dump(conf, f, indent=2)


def _torchvision_without_its_extension() -> None:
    """visual.py uses only torchvision.transforms (pure Python). PyPI's Linux torchvision is built against a
    CUDA torch, whose libraries a CPU torch lacks, so `import torchvision` fails registering its C ops: import
    the real package's submodules without running its __init__ (the transforms code is untouched)."""
    import importlib.util
    import types

    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001
        pass
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    stub = types.ModuleType("torchvision")
    stub.__spec__, stub.__path__, stub.__file__ = spec, spec.submodule_search_locations, spec.origin
    sys.modules["torchvision"] = stub


def check(work: str, code_dir: str) -> int:
    os.environ.update(HF_HOME=f"{work}/hf_home", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import numpy as np
    import torch
    _torchvision_without_its_extension()
    import transformers
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(f"{work}/ours.json") as f:
        ours = json.load(f)
    export = f"{work}/export"
    _local_code(export, code_dir)
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    ids = tok(f"<img>{ours['image']}</img>{ours['prompt']}")["input_ids"]
    # The official tokenizer stores the image path's bytes in the span (the model opens that file); ours puts
    # <imgpad> there. Both models overwrite the whole span with the adapter output; every other id must agree.
    start = ours["image_start_id"]
    span = slice(ids.index(start) + 1, ids.index(start + 1))
    assert bytes(ids[span][:ids[span].index(start + 2)]).decode() == ours["image"]
    assert ids[:span.start] + ids[span.stop:] == ours["ids"][:span.start] + ours["ids"][span.stop:], "token ids differ"
    assert len(ids) == len(ours["ids"]), "image span lengths differ"

    model, info = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, fp32=True,
                                                       output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"the official model and the export disagree on keys: {bad}"
    transform = model.transformer.visual.image_transform  # what its visual.encode applies to each image
    pixels = torch.stack([transform(Image.open(ours[k]).convert("RGB")) for k in ("image", "photo")])
    pixel_diff = (pixels - torch.from_numpy(np.load(f"{work}/ours_pixels.npy"))).abs().max().item()
    with torch.no_grad():
        theirs = model.eval()(torch.tensor([ids])).logits[0].float()
    mine = torch.from_numpy(np.load(f"{work}/ours_logits.npy"))
    assert theirs.shape == mine.shape, f"logits shapes differ: official {tuple(theirs.shape)}, ours {tuple(mine.shape)}"
    diff = (theirs - mine).abs().max().item()
    ok = diff <= TOLERANCE
    print(f"{'PASS' if ok else 'FAIL'} hf_remote_logits max_abs_diff={diff:.3g} (tolerance {TOLERANCE:g}) "
          f"max_abs_logit={mine.abs().max().item():.3g} tokens={len(ids)} pixels_max_diff={pixel_diff:.3g} "
          f"transformers={transformers.__version__} torch={torch.__version__}")
    _long_context(export, ids, mine)
    greedy = _greedy(model, ids, NEW_TOKENS, [start, start + 1, start + 2], ours["stop_ids"])
    same = greedy == ours["tokens"]
    print(f"{'PASS' if same else 'FAIL'} hf_remote_greedy official={greedy} ours={ours['tokens']}")
    return 0 if ok and same else 1


def _long_context(export, ids, mine, seq_length=128):
    """Information, not checked: the official code's inference-only dynamic NTK and log-n scaling, made to act
    on this prompt by a shorter seq_length (our model has neither)."""
    import torch
    from transformers import AutoModelForCausalLM

    parts = []
    for name, off in (("ntk+logn", {}), ("logn", {"use_dynamic_ntk": False}),
                      ("none", {"use_dynamic_ntk": False, "use_logn_attn": False})):
        model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, fp32=True, seq_length=seq_length,
                                                     **off)
        with torch.no_grad():
            d = (model.eval()(torch.tensor([ids])).logits[0] - mine).abs().amax(-1)
        parts.append(f"{name}={d[:seq_length].max():.2g}/{d[seq_length:].max():.2g}")
    print(f"INFO hf_remote_long_context seq_length={seq_length} max_abs_diff (first {seq_length} positions/beyond): "
          + " ".join(parts))


def _greedy(model, ids, n, banned, stop):
    """The official model's greedy continuation through its KV cache, under generate.py's rules (image
    markers are never generated; end-of-text and <|im_end|> stop)."""
    import torch

    out, past, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        while len(out) < n:  # a one-token step needs attention_mask: without one its _attn adds None
            mask = torch.ones(1, len(ids) + len(out), dtype=torch.long)
            res = model(step, past_key_values=past, attention_mask=mask, use_cache=True)
            logits, past = res.logits[0, -1].clone(), res.past_key_values
            logits[banned] = float("-inf")
            out.append(int(logits.argmax()))
            if out[-1] in stop:
                break
            step = torch.tensor([[out[-1]]])
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"] and len(sys.argv) == 3:
        prepare(sys.argv[2])
    elif sys.argv[1:2] == ["check"] and len(sys.argv) == 4:
        sys.exit(check(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
