"""What a Qwen-VL model is, independent of how it is parallelised or which kernels run it.

The three parts mirror the HF release (`transformer.*`, `transformer.visual.*`,
`transformer.visual.attn_pool.*`). A config round-trips through the HF `config.json`, so the converter
and the trainer build the same network from the same file, and the tiny test/demo models are the same
code path as the 7B one with smaller numbers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class LLMConfig:
    """Qwen-7B-style decoder (RMSNorm, rotate-half RoPE, SwiGLU, QKV bias only, untied head)."""

    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    kv_channels: int = 128
    ffn_hidden_size: int = 11008  # one SwiGLU branch; HF `intermediate_size` is twice this
    vocab_size: int = 151936  # HF rows of wte / lm_head; Megatron pads further for TP
    norm_eps: float = 1e-6
    rotary_base: int = 10000
    max_position_embeddings: int = 8192
    seq_length: int = 2048


@dataclass
class ViTConfig:
    """The Qwen-VL visual encoder (OpenCLIP ViT-bigG/14 without class token)."""

    width: int = 1664
    num_layers: int = 48
    num_heads: int = 16
    mlp_ratio: float = 4.9231
    patch_size: int = 14
    image_size: int = 448
    pos_grid: int = 16  # the learned table is pos_grid x pos_grid, bicubic-resized to the patch grid
    norm_eps: float = 1e-6

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass
class AdapterConfig:
    """Position-aware cross-attention resampler: learned queries attend to the ViT patch features."""

    num_queries: int = 256  # a square: the 2D sin-cos grid is sqrt(num_queries) on a side
    num_heads: int = 32  # HF derives output_dim // 128
    norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return math.isqrt(self.num_queries)


# The released config.json's fields that describe no size (reference 1.6). The network here has no dropout
# (0.0), scales attention scores by 1/sqrt(head dim) and uses plain RoPE; the HF remote code reads the rest:
# dynamic NTK and log-n scaling act only at inference past `seq_length` tokens, as in the release, and no
# precision flag is set (the remote code picks bf16 on CUDA, fp32 elsewhere). Written out explicitly because
# the remote code's defaults differ from the release for some of them.
HF_RELEASE_FIELDS = {
    "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0, "bf16": False, "fp16": False, "fp32": False,
    "initializer_range": 0.02, "onnx_safe": None, "scale_attn_weights": True, "tokenizer_type": "QWenTokenizer",
    "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": False, "use_logn_attn": True,
}

# What from_hf_config accepts only with the release's value (anything else would be silently ignored).
_BUILT_AS = {"rotary_pct": 1.0, "no_bias": True, "tie_word_embeddings": False, "scale_attn_weights": True,
             "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0}


@dataclass
class QwenVLConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # Image markers: the HF config stores only the start id; end and pad follow it in the Qwen vocabulary.
    image_start_id: int = 151857

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2

    def validate(self) -> "QwenVLConfig":
        """Fail fast on shapes the network cannot take (each message names the field)."""
        v, a, l = self.vit, self.adapter, self.llm
        if v.image_size % v.patch_size:
            raise ValueError(f"vit.image_size={v.image_size} is not a multiple of vit.patch_size={v.patch_size}")
        if v.width % v.num_heads:
            raise ValueError(f"vit.width={v.width} is not divisible by vit.num_heads={v.num_heads}")
        if a.grid * a.grid != a.num_queries:
            raise ValueError(f"adapter.num_queries={a.num_queries} must be a square (2D position grid)")
        if l.hidden_size % a.num_heads:
            raise ValueError(f"llm.hidden_size={l.hidden_size} is not divisible by adapter.num_heads={a.num_heads}")
        if l.num_attention_heads * l.kv_channels != l.hidden_size:
            raise ValueError("llm.num_attention_heads * llm.kv_channels must equal llm.hidden_size")
        return self

    # ---- HF config.json ----
    def to_hf_config(self) -> dict:
        l, v, a = self.llm, self.vit, self.adapter
        visual = {
            "heads": v.num_heads, "image_size": v.image_size, "image_start_id": self.image_start_id,
            "layers": v.num_layers, "mlp_ratio": v.mlp_ratio, "output_dim": l.hidden_size,
            "patch_size": v.patch_size, "width": v.width,
        }
        if a.num_heads != l.hidden_size // 128:
            visual["attn_pool_heads"] = a.num_heads
        if a.num_queries != 256:
            visual["n_queries"] = a.num_queries
        if v.pos_grid != 16:
            visual["pos_grid"] = v.pos_grid
        return {
            "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
            "hidden_size": l.hidden_size, "intermediate_size": 2 * l.ffn_hidden_size,
            "kv_channels": l.kv_channels, "layer_norm_epsilon": l.norm_eps,
            "num_attention_heads": l.num_attention_heads, "num_hidden_layers": l.num_layers,
            "max_position_embeddings": l.max_position_embeddings, "seq_length": l.seq_length,
            "no_bias": True, "rotary_emb_base": l.rotary_base, "rotary_pct": 1.0,
            "vocab_size": l.vocab_size, "tie_word_embeddings": False,
            **HF_RELEASE_FIELDS, "visual": visual,
        }

    @classmethod
    def from_hf_config(cls, hf: dict) -> "QwenVLConfig":
        vis = hf["visual"]
        for key, built in _BUILT_AS.items():  # fields that describe the network but are not free here
            if key in hf and hf[key] != built:
                raise ValueError(f"{key}={hf[key]!r} is not supported: this network is built with {key}={built!r}")
        if vis["output_dim"] != hf["hidden_size"]:
            raise ValueError(f"visual.output_dim={vis['output_dim']} must equal hidden_size={hf['hidden_size']}")
        return cls(
            llm=LLMConfig(
                num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                num_attention_heads=hf["num_attention_heads"], kv_channels=hf["kv_channels"],
                ffn_hidden_size=hf["intermediate_size"] // 2, vocab_size=hf["vocab_size"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-6), rotary_base=hf.get("rotary_emb_base", 10000),
                max_position_embeddings=hf.get("max_position_embeddings", 8192),
                seq_length=hf.get("seq_length", 2048),
            ),
            vit=ViTConfig(
                width=vis["width"], num_layers=vis["layers"], num_heads=vis["heads"],
                mlp_ratio=vis["mlp_ratio"], patch_size=vis["patch_size"], image_size=vis["image_size"],
                pos_grid=vis.get("pos_grid", 16),
            ),
            adapter=AdapterConfig(
                num_queries=vis.get("n_queries", 256),
                num_heads=vis.get("attn_pool_heads", vis["output_dim"] // 128),
            ),
            image_start_id=vis["image_start_id"],
        ).validate()

    def replace(self, **parts) -> "QwenVLConfig":
        """Copy with some fields changed, e.g. `cfg.replace(vit={"image_size": 224})`."""
        new = dataclasses.replace(self)
        for part, changes in parts.items():
            cur = getattr(self, part)
            setattr(new, part, dataclasses.replace(cur, **changes) if isinstance(changes, dict) else changes)
        return new.validate()


def qwen_vl_7b() -> QwenVLConfig:
    """The paper's sizes (HF Qwen/Qwen-VL)."""
    return QwenVLConfig().validate()


def tiny(vocab_size: int = 1024, image_start_id: int = 1000) -> QwenVLConfig:
    """A model that trains in seconds on 2 CPU cores: same code path, small numbers."""
    return QwenVLConfig(
        llm=LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16,
                      ffn_hidden_size=128, vocab_size=vocab_size, max_position_embeddings=512,
                      seq_length=128),
        vit=ViTConfig(width=64, num_layers=2, num_heads=4, mlp_ratio=2.0, patch_size=14,
                      image_size=112, pos_grid=8),
        adapter=AdapterConfig(num_queries=16, num_heads=4),
        image_start_id=image_start_id,
    ).validate()


PRESETS = {"tiny": tiny, "qwen-vl-7b": qwen_vl_7b}


def get_preset(name: str) -> QwenVLConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
