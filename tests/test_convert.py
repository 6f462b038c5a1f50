"""HF checkpoint reading/writing and the key layouts, in one process (no torch.distributed)."""
import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import reference_qwenvl as R
from qwenvl_megatron.convert.hf_checkpoint import (HFCheckpointError, HFCheckpointReader, save_hf_dir,
                                                   validate_hf_dir)
from qwenvl_megatron.convert.hf_layout import UnknownKeyError, hf_key_shapes, hf_sources, hf_to_model
from qwenvl_megatron.convert.openclip import check_openclip, openclip_to_model
from qwenvl_megatron.models.config import QwenVLConfig
from test_convert_parallel import fake_openclip, per_head, save_bin_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = R.tiny_hf_config()


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hf_state():
    return R.random_hf_state_dict(CFG, seed=4)


@pytest.mark.parametrize("cfg", [CFG, R.hf_config()], ids=["tiny", "7b"])
def test_key_shapes_follow_the_config(cfg):
    mine = {k: shape for k, (shape, _) in hf_key_shapes(QwenVLConfig.from_hf_config(cfg)).items()}
    assert mine == {k: tuple(v) for k, v in R.hf_key_shapes(cfg).items()}


def test_sources_cover_every_hf_key_once_per_use():
    cfg = QwenVLConfig.from_hf_config(CFG)
    used = sorted({hk for src in hf_sources(cfg).values() for hk in src})
    assert used == sorted(hf_key_shapes(cfg))


@pytest.mark.parametrize("layout", ["safetensors_index", "bin_index", "single_bin", "single_safetensors"])
def test_reader_reads_every_layout(hf_state, tmp_path, layout):
    cfg = QwenVLConfig.from_hf_config(CFG)
    d = tmp_path / "hf"
    if layout == "safetensors_index":
        save_hf_dir(str(d), hf_state, cfg, max_shard_bytes=100_000)
        assert len(list(d.glob("model-*.safetensors"))) > 2
    elif layout == "bin_index":
        save_bin_shards(hf_state, str(d), CFG, per_shard=9)
    else:
        d.mkdir()
        (d / "config.json").write_text(json.dumps(CFG))
        if layout == "single_bin":
            torch.save(hf_state, d / "pytorch_model.bin")
        else:
            save_file(hf_state, str(d / "model.safetensors"))
    cfg2, reader = validate_hf_dir(str(d))
    assert cfg2 == cfg
    got = reader.load(reader.keys())
    assert sorted(got) == sorted(hf_state)
    assert all(torch.equal(got[k], hf_state[k]) for k in hf_state)
    few = reader.load(["lm_head.weight", "transformer.visual.proj"])  # a rank reads only its share
    assert sorted(few) == ["lm_head.weight", "transformer.visual.proj"]


def test_missing_shard_is_named(hf_state, tmp_path):
    d = tmp_path / "hf"
    save_bin_shards(hf_state, str(d), CFG, per_shard=20)
    (d / "pytorch_model-00002-of-00004.bin").unlink()
    with pytest.raises(HFCheckpointError, match="pytorch_model-00002-of-00004.bin"):
        HFCheckpointReader(str(d))


def test_shape_that_contradicts_the_config_is_named(hf_state, tmp_path):
    d = tmp_path / "hf"
    save_bin_shards(hf_state, str(d), dict(CFG, intermediate_size=2 * 48))
    with pytest.raises(HFCheckpointError, match=r"transformer\.h\.0\.mlp\.(w1|w2|c_proj)\.weight.*intermediate_size"):
        validate_hf_dir(str(d))


def test_unknown_key_is_an_error_not_skipped(hf_state, tmp_path, capsys):
    d = tmp_path / "hf"
    save_bin_shards(dict(hf_state, **{"transformer.h.0.attn.rotary.inv_freq": torch.ones(8)}), str(d), CFG)
    with pytest.raises(UnknownKeyError, match="transformer.h.0.attn.rotary.inv_freq"):
        validate_hf_dir(str(d))
    # the tool reports it before starting any rank
    tool = load_tool("convert_checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["hf-to-mcore", "--hf-dir", str(d), "--out", str(tmp_path / "m"), "--tp", "2", "--pp", "2"])
    assert exit_info.value.code == 1
    assert "inv_freq" in capsys.readouterr().err


def test_partial_conversion_equals_the_full_one(hf_state):
    cfg = QwenVLConfig.from_hf_config(CFG)
    full = hf_to_model(hf_state, cfg)
    sources = hf_sources(cfg)
    share = [k for k in full if k.startswith(("adapter.", "language.decoder.layers.1."))]
    part = hf_to_model({hk: hf_state[hk] for mk in share for hk in sources[mk]}, cfg, partial=True)
    assert set(share) <= set(part)
    assert all(torch.equal(part[k], full[k]) for k in share)


def test_openclip_import_mapping():
    cfg = QwenVLConfig.from_hf_config(CFG)
    clip = fake_openclip(CFG)
    visual = {k: t for k, t in clip.items() if k.startswith("visual.")}
    check_openclip({k: tuple(t.shape) for k, t in visual.items()}, cfg, "clip.bin")
    out = openclip_to_model(visual, cfg)
    assert torch.equal(out["vision.positional_embedding"], clip["visual.positional_embedding"][1:])
    heads = CFG["visual"]["heads"]
    for j in range(CFG["visual"]["layers"]):
        c, g = f"visual.transformer.resblocks.{j}.", f"vision.decoder.layers.{j}."
        assert torch.equal(out[g + "self_attention.linear_qkv.weight"], per_head(clip[c + "attn.in_proj_weight"], heads))
        assert torch.equal(out[g + "input_layernorm.bias"], clip[c + "ln_1.bias"])
        assert torch.equal(out[g + "mlp.linear_fc2.weight"], clip[c + "mlp.c_proj.weight"])
    assert not any("class" in k or "ln_post" in k or k.endswith("proj") and "adapter" in k for k in out)
    assert all(k.startswith("vision.") for k in out)
    bad = dict({k: tuple(t.shape) for k, t in visual.items()}, **{"visual.transformer.resblocks.0.ls_1.gamma": (32,)})
    with pytest.raises(UnknownKeyError, match="ls_1"):
        check_openclip(bad, cfg, "clip.bin")
    wrong = dict({k: tuple(t.shape) for k, t in visual.items()}, **{"visual.positional_embedding": (256, 32)})
    with pytest.raises(HFCheckpointError, match="positional_embedding"):
        check_openclip(wrong, cfg, "clip.bin")


# ------------------------------------------------------------------ the export loads with the release's code
# The released config.json, rule by rule (/work/shared/reference/qwen-vl.md, 1.6): sizes from the model,
# every other field with the release's value, auto_map into the official remote code on the Hub.
RELEASE_FIXED = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0,
    "bf16": False, "fp16": False, "fp32": False, "initializer_range": 0.02, "onnx_safe": None,
    "scale_attn_weights": True, "tokenizer_type": "QWenTokenizer", "use_cache": True, "use_dynamic_ntk": True,
    "use_flash_attn": False, "use_logn_attn": True, "no_bias": True, "rotary_pct": 1.0, "tie_word_embeddings": False,
}
RELEASE_7B_SIZES = {
    "hidden_size": 4096, "intermediate_size": 22016, "kv_channels": 128, "layer_norm_epsilon": 1e-6,
    "num_attention_heads": 32, "num_hidden_layers": 32, "max_position_embeddings": 8192, "seq_length": 2048,
    "rotary_emb_base": 10000, "vocab_size": 151936,
    "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
               "output_dim": 4096, "patch_size": 14, "width": 1664},
}


def release_auto_map(repo):
    return {"AutoConfig": f"{repo}--configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": f"{repo}--modeling_qwen.QWenLMHeadModel"}


def test_7b_export_config_is_the_released_config(tmp_path):
    from qwenvl_megatron.convert.hf_checkpoint import write_export_metadata
    from qwenvl_megatron.models.config import qwen_vl_7b

    write_export_metadata(str(tmp_path), qwen_vl_7b(), torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    want = {**RELEASE_FIXED, **RELEASE_7B_SIZES, "torch_dtype": "bfloat16", "auto_map": release_auto_map("Qwen/Qwen-VL")}
    assert sorted(config) == sorted(want)  # the field set: nothing missing, nothing extra
    for field, value in want.items():  # rule by rule, so a failure names the field
        assert config[field] == value, field
        assert type(config[field]) is type(value), field  # 0.0 stays a float, 10000 an int, null stays null
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen == {"chat_format": "raw", "do_sample": True, "eos_token_id": 151643, "pad_token_id": 151643,
                   "max_new_tokens": 512, "max_window_size": 6144, "top_k": 0, "top_p": 0.5}
    assert not (tmp_path / "tokenizer_config.json").exists()  # no tokenizer given
    assert QwenVLConfig.from_hf_config(config) == qwen_vl_7b()


def test_export_of_a_small_model_with_chat_code_and_tokenizer(hf_state, tmp_path):
    cfg = QwenVLConfig.from_hf_config(CFG)
    vocab = tmp_path / "my_vocab.tiktoken"
    vocab.write_text("IQ== 0\n")
    out = tmp_path / "hf"
    save_hf_dir(str(out), hf_state, cfg, tokenizer_file=str(vocab), code_repo="Qwen/Qwen-VL-Chat")
    config = json.loads((out / "config.json").read_text())
    assert sorted(config) == sorted([*RELEASE_FIXED, *RELEASE_7B_SIZES, "torch_dtype", "auto_map"])
    for field, value in RELEASE_FIXED.items():
        assert config[field] == value, field
    for field in RELEASE_7B_SIZES:  # sizes are the model's
        assert config[field] == CFG[field], field
    assert config["torch_dtype"] == "float32"
    assert config["auto_map"] == release_auto_map("Qwen/Qwen-VL-Chat")
    assert (out / "qwen.tiktoken").read_text() == "IQ== 0\n"  # the name the remote tokenizer opens
    assert json.loads((out / "tokenizer_config.json").read_text()) == {
        "model_max_length": 512, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["Qwen/Qwen-VL-Chat--tokenization_qwen.QWenTokenizer", None]}}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["chat_format"] == "chatml" and gen["top_p"] == 0.3 and gen["eos_token_id"] == 151643
    # the converter reads its own export back
    read_cfg, _ = validate_hf_dir(str(out))
    assert read_cfg == cfg


@pytest.mark.parametrize("field,value", [("rotary_pct", 0.5), ("tie_word_embeddings", True),
                                         ("attn_dropout_prob", 0.1), ("no_bias", False)])
def test_config_fields_the_network_cannot_honour_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r} is not supported"):
        QwenVLConfig.from_hf_config(dict(CFG, **{field: value}))


def test_bad_code_repo_is_refused(tmp_path):
    from qwenvl_megatron.convert.hf_checkpoint import write_export_metadata
    with pytest.raises(HFCheckpointError, match="not a Hub repository"):
        write_export_metadata(str(tmp_path), QwenVLConfig.from_hf_config(CFG), code_repo="Qwen-VL")


def test_export_names_what_the_official_remote_code_would_build_differently(tmp_path, capsys):
    from qwenvl_megatron.convert.hf_checkpoint import official_code_differences, write_export_metadata
    from qwenvl_megatron.models.config import qwen_vl_7b, tiny

    assert official_code_differences(qwen_vl_7b()) == []
    # tests/hf_remote's model: small, but everything the official code reads has the release's meaning
    small = qwen_vl_7b().replace(llm={"hidden_size": 256, "num_attention_heads": 4, "kv_channels": 64},
                                 vit={"width": 64, "num_heads": 4}, adapter={"num_heads": 2})
    assert official_code_differences(small) == []
    assert official_code_differences(small.replace(vit={"width": 256})) == [
        "ViT width = output_dim = 256 (it then has no kv_proj)"]
    assert official_code_differences(tiny()) == [
        "adapter heads 4 (it builds output_dim // 128 = 0)", "ViT position grid 8x8 (it has 16x16)",
        "ViT width = output_dim = 64 (it then has no kv_proj)",
        "16 image queries (its tokenizer writes 256 image positions)"]
    write_export_metadata(str(tmp_path), tiny())
    assert "the remote code of Qwen/Qwen-VL cannot run this model as it is: adapter heads 4" in capsys.readouterr().err
    write_export_metadata(str(tmp_path), small)
    assert capsys.readouterr().err == ""


def test_exported_weights_are_readable_like_the_other_files(hf_state, tmp_path):
    out = tmp_path / "hf"
    save_hf_dir(str(out), hf_state, QwenVLConfig.from_hf_config(CFG), max_shard_bytes=2 ** 16)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    mode = (out / "config.json").stat().st_mode & 0o777
    assert {oct(s.stat().st_mode & 0o777) for s in shards} == {oct(mode)}  # not safetensors' owner-only 0600
