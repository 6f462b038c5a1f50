"""The position-aware vision-language adapter: 256 learned queries cross-attend to the ViT features.

q = ln_q(queries) + pos, k = ln_kv(kv_proj(x)) + pos_img, v = ln_kv(kv_proj(x)) -- positions go into q
and k but not v -- then `ln_post` and `@ proj`. Attention heads are split over tensor-parallel ranks
(column-parallel q/k/v, row-parallel output); the small per-image projections are replicated.
"""
from __future__ import annotations

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from .config import AdapterConfig
from .specs import AdapterSubmodules
from .vision import resize_positions


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos table [grid*grid, dim] (cells row-major): the first half of the channels is the 1D
    sin/cos table of the column index, the second half that of the row index (the MAE / HF order). Only
    the initial value matters: the table is stored in checkpoints and loaded from HF weights."""

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float64)
    ww, hh = np.meshgrid(coords, coords)  # ww varies along columns
    table = np.concatenate([one_axis(dim // 2, ww), one_axis(dim // 2, hh)], axis=1)
    return torch.from_numpy(table).float()


class VisionLanguageAdapter(MegatronModule):
    def __init__(self, adapter: AdapterConfig, vit_width: int, config: TransformerConfig,
                 submodules: AdapterSubmodules, recompute: bool = False):
        super().__init__(config=config)
        h, dtype = config.hidden_size, config.params_dtype
        self.recompute = recompute
        self.query = torch.nn.Parameter(torch.nn.init.trunc_normal_(torch.empty(adapter.num_queries, h), std=0.02).to(dtype))
        self.register_buffer("pos_embed", sincos_2d(h, adapter.grid).to(self.query.device, dtype), persistent=True)
        self.kv_proj = torch.nn.Linear(vit_width, h, bias=False, dtype=dtype)
        norm = lambda: build_module(submodules.layer_norm, config=config, hidden_size=h, eps=adapter.norm_eps)
        self.ln_q, self.ln_kv, self.ln_post = norm(), norm(), norm()
        lin = dict(config=config, init_method=config.init_method, bias=True, skip_bias_add=False, is_expert=False)
        self.linear_q = build_module(submodules.linear_q, h, h, gather_output=False, **lin)
        self.linear_k = build_module(submodules.linear_k, h, h, gather_output=False, **lin)
        self.linear_v = build_module(submodules.linear_v, h, h, gather_output=False, **lin)
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=1,
                                           attn_mask_type=AttnMaskType.no_mask, attention_type="cross")
        self.linear_proj = build_module(submodules.linear_proj, h, h, input_is_parallel=True,
                                        **dict(lin, init_method=config.output_layer_init_method))
        self.proj = torch.nn.Parameter(torch.randn(h, h, dtype=dtype) * h ** -0.5)
        self.heads_per_rank = adapter.num_heads // config.tensor_model_parallel_size
        self.head_dim = h // adapter.num_heads

    def set_input_tensor(self, tensor):
        pass

    def _attend(self, x):
        s, n, _ = x.shape
        kv = self.ln_kv(self.kv_proj(x))  # [s, n, h]
        pos_kv = resize_positions(self.pos_embed, int(round(s ** 0.5))).unsqueeze(1)
        # The queries are the same for every image: project them once ([Q, 1, h]; a dense input, as
        # Transformer Engine's linear layers require) and broadcast the result over the images.
        q, _ = self.linear_q((self.ln_q(self.query) + self.pos_embed).unsqueeze(1))
        k, _ = self.linear_k(kv + pos_kv)
        v, _ = self.linear_v(kv)
        shape = lambda t: t.expand(-1, n, -1).reshape(t.shape[0], n, self.heads_per_rank, self.head_dim)
        ctx = self.core_attention(shape(q), shape(k), shape(v), attention_mask=None,
                                  attn_mask_type=AttnMaskType.no_mask)
        out, _ = self.linear_proj(ctx)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ViT features [s, n, vit_width] -> image embeddings [n, num_queries, hidden]."""
        if self.recompute and self.training:
            # megatron's checkpoint is reentrant: only an input that needs grad makes the output need it.
            # With the ViT frozen (stage 3) the features do not, and the adapter would get no gradient.
            out = tensor_parallel.checkpoint(self._attend, False, x if x.requires_grad else x.detach().requires_grad_())
        else:
            out = self._attend(x)
        out = self.ln_post(out) @ self.proj
        return out.transpose(0, 1)
