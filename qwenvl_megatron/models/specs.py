"""ModuleSpecs: which megatron-core modules implement each layer, for Transformer Engine or local layers.

One builder per layer kind takes a megatron `BackendSpecProvider` (TE or local), so the same model code
builds with fused TE kernels on GPUs and plain megatron-core layers on CPU. Checkpoints from either are
interchangeable: the local spec maps its separate norm keys onto TE's fused `layer_norm_*` names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


def _mask_out_of_place(scores, mask):
    return scores.masked_fill(mask, -10000.0)  # megatron's value


class LocalDotProductAttention(DotProductAttention):
    """megatron's unfused attention (local layers), its mask applied out of place. megatron fills the scores
    in place through a view, which autograd's backward pays with extra copies of the [b, heads, s, s] scores
    (CopySlices: 56 passes of that size per microbatch of the small benchmark config instead of 16). Same
    numbers, same (no) parameters."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_mask_softmax.mask_func = _mask_out_of_place


def _core_attention(backend):
    core = backend.core_attention()
    return LocalDotProductAttention if core is DotProductAttention else core


def transformer_layer_spec(backend, *, rms_norm: bool, causal: bool) -> ModuleSpec:
    """A pre-norm transformer layer. LLM: RMSNorm + causal; ViT: LayerNorm + bidirectional.

    megatron's own local ViT spec is causal; a ViT must see every patch, hence `causal` here.
    """
    fused = backend.fuse_layernorm_and_linear()
    norm = IdentityOp if fused else backend.layer_norm(rms_norm=rms_norm, for_qk=False)
    qkv = backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=_core_attention(backend),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=qkv, linear_fc2=backend.row_parallel_linear())),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else {
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


@dataclass
class AdapterSubmodules:
    """The resampler's cross-attention: q, k and v have different inputs (positions go into q and k but
    not v), so they are three column-parallel projections rather than megatron's fused `linear_kv`."""

    linear_q: Union[ModuleSpec, type] = None
    linear_k: Union[ModuleSpec, type] = None
    linear_v: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    layer_norm: Union[ModuleSpec, type] = None


def adapter_spec(backend) -> AdapterSubmodules:
    col = backend.column_parallel_linear()
    return AdapterSubmodules(
        linear_q=col, linear_k=col, linear_v=col,
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
        layer_norm=backend.layer_norm(rms_norm=False, for_qk=False),
    )
