"""Conversions and generation on TP2 x PP2 (one 4-rank torchrun launch) checked tensor by tensor.

- HF -> Megatron (TP2 x PP2) -> HF reproduces every tensor bit for bit; so does an export on 1 rank
  (the dist-checkpoint reshards) through the command-line tool.
- import-init: LLM tensors are Qwen-7B's, ViT tensors are OpenCLIP's with the class row dropped and q/k/v
  permuted per head, OpenCLIP's ln_post/proj are not imported, the adapter is freshly initialised.
- The reference model loaded from the exported HF directory gives the Megatron checkpoint's logits.
- KV-cache greedy decoding equals decoding without the cache (tokens, and logits within 1e-5).
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import reference_qwenvl as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CFG = R.tiny_hf_config()
STEPS = 6


def read_hf_dir(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    out = {}
    for name in files:
        out.update(load_file(os.path.join(path, name)))
    return out


def save_bin_shards(sd, path, config, per_shard=20):
    """The older HF layout: pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    os.makedirs(path, exist_ok=True)
    keys = sorted(sd)
    chunks = [keys[i:i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for i, chunk in enumerate(chunks, 1):
        name = f"pytorch_model-{i:05d}-of-{len(chunks):05d}.bin"
        torch.save({k: sd[k] for k in chunk}, os.path.join(path, name))
        weight_map.update({k: name for k in chunk})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def fake_openclip(cfg, seed=5):
    """An OpenCLIP CLIP state dict with the tiny ViT's sizes: class token, 257-row table, blocked in_proj,
    ln_post/proj of its own, and text-tower keys that the import must ignore."""
    g = torch.Generator().manual_seed(seed)
    v = cfg["visual"]
    w, f, p = v["width"], int(v["width"] * v["mlp_ratio"]), v["patch_size"]
    r = lambda *s: torch.randn(*s, generator=g)
    sd = {"visual.class_embedding": r(w), "visual.positional_embedding": r(257, w),
          "visual.conv1.weight": r(w, 3, p, p), "visual.ln_pre.weight": r(w), "visual.ln_pre.bias": r(w),
          "visual.ln_post.weight": r(w), "visual.ln_post.bias": r(w), "visual.proj": r(w, 24),
          "token_embedding.weight": r(50, 24), "positional_embedding": r(77, 24), "logit_scale": r(()),
          "transformer.resblocks.0.attn.in_proj_weight": r(72, 24)}
    for j in range(v["layers"]):
        b = f"visual.transformer.resblocks.{j}."
        sd.update({b + "ln_1.weight": r(w), b + "ln_1.bias": r(w), b + "ln_2.weight": r(w), b + "ln_2.bias": r(w),
                   b + "attn.in_proj_weight": r(3 * w, w), b + "attn.in_proj_bias": r(3 * w),
                   b + "attn.out_proj.weight": r(w, w), b + "attn.out_proj.bias": r(w),
                   b + "mlp.c_fc.weight": r(f, w), b + "mlp.c_fc.bias": r(f),
                   b + "mlp.c_proj.weight": r(w, f), b + "mlp.c_proj.bias": r(w)})
    return sd


def per_head(blocked, heads):
    """[Wq; Wk; Wv] -> rows [q_0, k_0, v_0, q_1, ...], written out head by head."""
    q, k, v = blocked.chunk(3)
    d = q.shape[0] // heads
    return torch.cat([t[h * d:(h + 1) * d] for h in range(heads) for t in (q, k, v)])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("convert_tp2pp2"))
    hf = R.random_hf_state_dict(CFG, seed=1)
    save_bin_shards(hf, f"{w}/hf", CFG)
    llm = {k: t for k, t in R.random_hf_state_dict(CFG, seed=2).items() if not k.startswith("transformer.visual.")}
    llm_cfg = {k: v for k, v in CFG.items() if k != "visual"}
    save_bin_shards(llm, f"{w}/qwen7b", llm_cfg, per_shard=7)
    clip = fake_openclip(CFG)
    torch.save(clip, f"{w}/openclip.bin")
    with open(f"{w}/import_config.json", "w") as f:
        json.dump(CFG, f)
    s, e, pad = R.image_token_ids(CFG)
    g = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, 120, (n,), generator=g).tolist()
    ids = torch.tensor([text(3) + [s] + [pad] * 16 + [e] + text(5),
                        text(1) + [s] + [pad] * 16 + [e] + text(7)])
    images = torch.randn(2, 3, 224, 224, generator=g)
    torch.save({"ids": ids, "images": images, "steps": STEPS, "banned": [s, e, pad]}, f"{w}/gen_inputs.pt")
    run = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                          os.path.join(ROOT, "tests/workers/convert_parallel.py"), "--work", w],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return {"dir": w, "hf": hf, "llm": llm, "clip": clip, "ids": ids, "images": images}


def assert_bitwise_equal(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)), k


def test_round_trip_tp2pp2_is_bit_exact(work):
    assert_bitwise_equal(read_hf_dir(f"{work['dir']}/hf_back"), work["hf"])
    # every rank wrote its share of its stage's tensors: one file each (the shard limit is 5 GiB)
    assert len(glob.glob(f"{work['dir']}/hf_back/model-*.safetensors")) == 4
    with open(f"{work['dir']}/hf_back/config.json") as f:
        config = json.load(f)
    assert {k: config[k] for k in CFG} == CFG and config["torch_dtype"] == "float32"  # the rest: test_convert.py
    assert config["auto_map"]["AutoModelForCausalLM"] == "Qwen/Qwen-VL--modeling_qwen.QWenLMHeadModel"


def test_export_on_one_rank_reshards_bit_exact(work, tmp_path):
    vocab = tmp_path / "vocab.tiktoken"
    vocab.write_text("dummy\n")
    out = tmp_path / "hf_tp1"
    run = subprocess.run([PY, "tools/convert_checkpoint.py", "mcore-to-hf", "--load", f"{work['dir']}/m",
                          "--out", str(out), "--tokenizer-file", str(vocab), "--max-shard-size-gb", "0.0002",
                          "--code-repo", "Qwen/Qwen-VL-Chat"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_bitwise_equal(read_hf_dir(str(out)), work["hf"])
    assert (out / "qwen.tiktoken").read_text() == "dummy\n"
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "Qwen/Qwen-VL-Chat--configuration_qwen.QWenConfig",
                                  "AutoModelForCausalLM": "Qwen/Qwen-VL-Chat--modeling_qwen.QWenLMHeadModel"}
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["auto_map"]["AutoTokenizer"] == ["Qwen/Qwen-VL-Chat--tokenization_qwen.QWenTokenizer", None]
    assert json.loads((out / "generation_config.json").read_text())["chat_format"] == "chatml"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"


def test_checkpoint_uses_transformer_engine_names_on_disk(work):
    """The local spec saves its norms under TE's fused names, so TE- and local-spec checkpoints are one format."""
    from megatron.core import dist_checkpointing
    keys = set(dist_checkpointing.load_tensors_metadata(f"{work['dir']}/m/iter_0000000"))
    for part in ("language", "vision"):
        assert f"{part}.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
        assert f"{part}.decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert "vision.decoder.layers.self_attention.linear_qkv.layer_norm_bias" in keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)


def test_import_init_tensor_by_tensor(work):
    got = read_hf_dir(f"{work['dir']}/hf_init")
    assert sorted(got) == sorted(R.hf_key_shapes(CFG))
    for k, t in work["llm"].items():  # the whole LLM is Qwen-7B's
        assert torch.equal(got[k], t), k
    clip, V = work["clip"], "transformer.visual."
    heads = CFG["visual"]["heads"]
    assert torch.equal(got[V + "positional_embedding"], clip["visual.positional_embedding"][1:])
    assert torch.equal(got[V + "conv1.weight"], clip["visual.conv1.weight"])
    for wb in ("weight", "bias"):
        assert torch.equal(got[V + f"ln_pre.{wb}"], clip[f"visual.ln_pre.{wb}"])
    for j in range(CFG["visual"]["layers"]):
        h, c = f"{V}transformer.resblocks.{j}.", f"visual.transformer.resblocks.{j}."
        for wb in ("weight", "bias"):
            assert torch.equal(got[h + f"attn.in_proj.{wb}"], per_head(clip[c + f"attn.in_proj_{wb}"], heads))
            for name in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
                assert torch.equal(got[h + f"{name}.{wb}"], clip[c + f"{name}.{wb}"]), h + name
    # fresh adapter and Qwen-VL ln_post/proj (OpenCLIP's ln_post/proj are 32 / 32x24 wide: not imported)
    out = CFG["visual"]["output_dim"]
    A = V + "attn_pool."
    assert torch.allclose(got[A + "pos_embed"], R.sincos_2d(out, 4), atol=1e-6)
    assert 0.01 < got[A + "query"].std() < 0.03
    for name in (A + "ln_q", A + "ln_kv", V + "ln_post"):
        assert torch.equal(got[name + ".weight"], torch.ones(out)) and torch.equal(got[name + ".bias"], torch.zeros(out))
    assert torch.equal(got[A + "attn.in_proj_bias"], torch.zeros(3 * out))
    assert got[V + "proj"].shape == (out, out) and got[V + "proj"].std() > 0


def test_reference_on_exported_hf_matches_megatron_logits(work):
    ref = R.ReferenceQwenVL(CFG)
    ref.load_state_dict(read_hf_dir(f"{work['dir']}/hf_back"))
    with torch.no_grad():
        want = ref(work["ids"], work["images"])
    got = torch.load(f"{work['dir']}/gen.pt")["prompt_logits"]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4


def test_kv_cache_decoding_equals_recomputation(work):
    gen = torch.load(f"{work['dir']}/gen.pt")
    assert gen["cached_tokens"] == gen["plain_tokens"]
    assert [len(t) for t in gen["cached_tokens"]] == [STEPS, STEPS]
    assert gen["cached_logits"].shape == gen["plain_logits"].shape == (2, STEPS, CFG["vocab_size"])
    assert (gen["cached_logits"] - gen["plain_logits"]).abs().max() <= 1e-5
    with open(f"{work['dir']}/done.json") as f:
        assert json.load(f)["ranks_agree"]
    # the first new token's logits are the prompt's last-position logits
    assert torch.allclose(gen["cached_logits"][:, 0], gen["prompt_logits"][:, -1], atol=1e-5)
