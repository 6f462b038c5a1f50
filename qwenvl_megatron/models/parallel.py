"""The parallel plan: how a QwenVLConfig is laid out over devices, as megatron TransformerConfigs.

Model code (vision.py, adapter.py, language.py) never looks at TP/PP sizes; it receives a
TransformerConfig built here. Every impossible layout is refused here with the flag that causes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from .config import QwenVLConfig

PARTS = ("vit", "adapter", "llm")
# megatron-core's fused-kernel switches (TransformerConfig fields). Megatron-LM turns them on by default;
# runtime.layer_impl.available_fusions() says which this machine has kernels for (none on a CPU).
FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
           "gradient_accumulation_fusion", "persist_layer_norm")


@dataclass
class ParallelPlan:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Decoder layers on the first pipeline stage (which also holds ViT + adapter + embedding); None = even.
    first_stage_layers: int | None = None
    sequence_parallel: bool = False
    recompute: tuple[str, ...] = ()  # any of PARTS: full activation recompute per part
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    impl: str = "local"  # "te" or "local" (see runtime.layer_impl.resolve_impl)
    init_std: float = 0.02
    fusions: frozenset = frozenset()  # names from FUSIONS to turn on
    # False: megatron allocates the weights without initialising them (a converter overwrites every one).
    init_weights: bool = True

    def validate(self, cfg: QwenVLConfig) -> "ParallelPlan":
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        for what, heads in (("llm.num_attention_heads", cfg.llm.num_attention_heads),
                            ("vit.num_heads", cfg.vit.num_heads),
                            ("adapter.num_heads", cfg.adapter.num_heads)):
            if heads % tp:
                raise ValueError(f"--tensor-model-parallel-size {tp} does not divide {what}={heads}")
        if cfg.llm.ffn_hidden_size % tp or cfg.vit.ffn_hidden_size % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide the MLP widths "
                             f"(llm {cfg.llm.ffn_hidden_size}, vit {cfg.vit.ffn_hidden_size})")
        n = cfg.llm.num_layers
        if self.first_stage_layers is None:
            if n % pp:
                raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide llm.num_layers={n}; "
                                 f"set --decoder-first-pipeline-num-layers for an uneven split")
        elif pp > 1:
            rest = n - self.first_stage_layers
            if not 0 <= self.first_stage_layers <= n or rest % (pp - 1):
                raise ValueError(f"--decoder-first-pipeline-num-layers {self.first_stage_layers} leaves {rest} "
                                 f"layers, not divisible by the other {pp - 1} pipeline stages")
        if self.sequence_parallel and self.impl != "te":
            raise ValueError("--sequence-parallel needs --transformer-impl te: megatron-core's torch norms "
                             "do not support sequence parallelism")
        if self.sequence_parallel and tp == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        unknown = set(self.recompute) - set(PARTS)
        if unknown:
            raise ValueError(f"--recompute parts must be among {PARTS}, got {sorted(unknown)}")
        unknown = set(self.fusions) - set(FUSIONS)
        if unknown:
            raise ValueError(f"unknown fusions {sorted(unknown)}; known: {FUSIONS}")
        return self

    # ---- megatron configs, one per part ----
    def _common(self, num_layers, hidden, heads, kv_channels, ffn, recompute, sequence_parallel=False) -> dict:
        """Settings every part shares. Sequence parallelism is the LLM's alone: the ViT and the adapter
        get whole (unscattered) inputs, so under SP they would repeat the work on every TP rank and
        all-reduce their norm gradients over TP once too often (Megatron-LM keeps SP off in its vision
        encoders too)."""
        common = dict(
            num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, kv_channels=kv_channels,
            ffn_hidden_size=ffn, hidden_dropout=0.0, attention_dropout=0.0,
            tensor_model_parallel_size=self.tensor_parallel, sequence_parallel=sequence_parallel,
            params_dtype=self.params_dtype, bf16=self.bf16, pipeline_dtype=self.params_dtype,
            use_cpu_initialization=True, init_method_std=self.init_std, perform_initialization=self.init_weights,
            **{name: name in self.fusions for name in FUSIONS},
        )
        if recompute:
            common.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        return common

    def llm_config(self, cfg: QwenVLConfig) -> TransformerConfig:
        l = cfg.llm
        extra = {}
        if self.pipeline_parallel > 1 and self.first_stage_layers is not None:
            extra["num_layers_in_first_pipeline_stage"] = self.first_stage_layers
        return TransformerConfig(
            **self._common(l.num_layers, l.hidden_size, l.num_attention_heads, l.kv_channels,
                           l.ffn_hidden_size, "llm" in self.recompute, self.sequence_parallel),
            pipeline_model_parallel_size=self.pipeline_parallel,
            normalization="RMSNorm", layernorm_epsilon=l.norm_eps,
            add_bias_linear=False, add_qkv_bias=True, gated_linear_unit=True, activation_func=F.silu,
            **extra,
        )

    def vit_config(self, cfg: QwenVLConfig) -> TransformerConfig:
        v = cfg.vit
        # The ViT lives whole on the first pipeline stage: it is never split across stages. Its GELU stays
        # exact: megatron's fused bias-GELU is the tanh approximation, not the erf GELU of the release.
        common = self._common(v.num_layers, v.width, v.num_heads, v.head_dim, v.ffn_hidden_size,
                              "vit" in self.recompute)
        common["bias_activation_fusion"] = False
        return TransformerConfig(
            **common,
            pipeline_model_parallel_size=1,
            normalization="LayerNorm", layernorm_epsilon=v.norm_eps,
            add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu,
        )

    def adapter_config(self, cfg: QwenVLConfig) -> TransformerConfig:
        h, a = cfg.llm.hidden_size, cfg.adapter
        return TransformerConfig(
            **self._common(1, h, a.num_heads, h // a.num_heads, h, "adapter" in self.recompute),
            pipeline_model_parallel_size=1,
            normalization="LayerNorm", layernorm_epsilon=a.norm_eps, add_bias_linear=True,
        )


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    """Megatron's rule (a multiple of `divisible_by x TP`, so each rank's slice is aligned), taken with
    TP of at least 8: the padded size is then the same for TP 1, 2, 4 and 8, so a checkpoint reshards
    between those layouts without touching the vocabulary. The padded rows never reach users: their
    logits are masked and converters strip them."""
    multiple = divisible_by * max(tensor_parallel, 8)
    return -(-vocab_size // multiple) * multiple
