"""The Qwen-VL visual encoder: ViT-bigG/14 without a class token, on megatron-core layers.

Patch embedding (conv, no bias) + learned positions (a fixed 16x16 table, bicubic-resized to the patch
grid of the input, so 224px and 448px share it) + `ln_pre` + a bidirectional pre-norm transformer.
Attention heads and MLP columns are split over tensor-parallel ranks by the layers themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock

from .config import ViTConfig


def resize_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """[n*n, d] position table -> [grid*grid, d] by bicubic interpolation (align_corners=False), in fp32,
    as the HF release does on every forward at 448px. Identity when the grid already matches."""
    src = math.isqrt(table.shape[0])
    if src == grid:
        return table
    t = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(grid, grid), mode="bicubic", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)


class VisionTransformer(MegatronModule):
    def __init__(self, vit: ViTConfig, config: TransformerConfig, layer_spec: ModuleSpec, norm_spec):
        super().__init__(config=config)
        self.vit = vit
        self.conv1 = torch.nn.Conv2d(3, vit.width, kernel_size=vit.patch_size, stride=vit.patch_size,
                                     bias=False, dtype=config.params_dtype)
        self.positional_embedding = torch.nn.Parameter(
            torch.randn(vit.pos_grid ** 2, vit.width, dtype=config.params_dtype) * vit.width ** -0.5)
        self.ln_pre = build_module(norm_spec, config=config, hidden_size=vit.width, eps=vit.norm_eps)
        self.decoder = TransformerBlock(config, layer_spec, post_layer_norm=False, pre_process=True,
                                       post_process=False)

    def set_input_tensor(self, tensor):  # never pipelined: the ViT is whole on the first stage
        pass

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [n, 3, H, W] (normalised) -> patch features [H/p * W/p, n, width] (sequence first)."""
        n, _, h, w = images.shape
        p = self.vit.patch_size
        if h != w or h % p:
            raise ValueError(f"image size {h}x{w} must be square and a multiple of the patch size {p} "
                             f"(--image-size)")
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [n, width, g, g]
        x = x.flatten(2).transpose(1, 2)  # [n, g*g, width]
        x = x + resize_positions(self.positional_embedding, h // p)
        x = self.ln_pre(x)
        x = x.transpose(0, 1).contiguous()  # [s, n, width]
        return self.decoder(x, attention_mask=None)
