"""The timm-style SigLIP ViT of MiniCPM-V 2.0 (timm's `vit_so400m_patch14_siglip_384`), written on torch alone.

The published model builds timm's VisionTransformer with `dynamic_img_size=True, dynamic_img_pad=True` and no
class token, replaces its attention-pool head by Identity, drops the last of its 27 blocks, and runs
`forward_features` on each slice on its own. This module has the same parameters under the same names
(`patch_embed.proj`, `pos_embed` [1, 729, D], `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`,
`norm`) and computes what `forward_features` computes:

  pad H, W up to whole patches -> conv patch embedding -> + pos_embed resampled to the (ceil(H/p), ceil(W/p))
  grid (`resample_position_embedding`, timm's rule) -> blocks (pre-norm LayerNorm eps 1e-6, fused-qkv attention
  with biases, exact-erf GELU MLP, no layer scale) -> final LayerNorm.

Several views of different grids run in one call: each is padded to the call's largest grid, and a key mask
keeps every view's attention to its own patches. LayerNorm, MLP and the patch embedding act on each patch alone,
so a view's outputs on its own patches are the ones it gets when run alone (up to the order of float
reductions); the padding positions' outputs are garbage that the resampler never reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass(frozen=True)
class ViTSettings:
    """The tower's dimensions; `VIT_ENCODERS` names the published one."""

    hidden_size: int = 1152
    intermediate_size: int = 4304  # int(1152 * mlp_ratio 3.7362)
    num_attention_heads: int = 16
    num_hidden_layers: int = 27  # as built; MiniCPM-V 2.0 drops the last (drop_vision_last_layer)
    patch_size: int = 14
    image_size: int = 384  # learned positions: (image_size // patch_size) ** 2 = 27 x 27
    layer_norm_eps: float = 1e-6


# config.json's `vision_encoder` names the timm model: the ones this package can build.
VIT_ENCODERS = {"vit_so400m_patch14_siglip_384.webli": ViTSettings(), "vit_so400m_patch14_siglip_384": ViTSettings()}


def resample_position_embedding(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """timm's `resample_abs_pos_embed` without prefix tokens: [1, S*S, D] learned positions of a square S x S grid
    -> [1, h*w, D] for an (h, w) grid, row-major.

    The rule (timm/layers/pos_embed.py): when h * w == S * S and h == w the table is returned unchanged;
    otherwise it is laid out as an image [1, D, S, S] in float32, resized with
    `F.interpolate(size=(h, w), mode="bicubic", antialias=True)` (align_corners False), and cast back."""
    side = math.isqrt(pos_embed.shape[1])
    height, width = grid
    if height * width == pos_embed.shape[1] and height == width:
        return pos_embed
    dim = pos_embed.shape[-1]
    image = pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True)
    return image.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed with dynamic_img_pad: zero-pad H and W on the bottom/right to whole patches, then a
    stride-p convolution. [N, 3, H, W] -> [N, ceil(H/p) * ceil(W/p), D]."""

    def __init__(self, settings: ViTSettings):
        super().__init__()
        self.patch_size = settings.patch_size
        self.proj = nn.Conv2d(3, settings.hidden_size, kernel_size=settings.patch_size, stride=settings.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patch = self.patch_size
        pad_h, pad_w = (-pixels.shape[-2]) % patch, (-pixels.shape[-1]) % patch
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
        return self.proj(pixels).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention with biases (timm's Attention, no q/k norm), through sdpa."""

    def __init__(self, settings: ViTSettings):
        super().__init__()
        self.num_heads = settings.num_attention_heads
        self.qkv = nn.Linear(settings.hidden_size, 3 * settings.hidden_size)
        self.proj = nn.Linear(settings.hidden_size, settings.hidden_size)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, L, D], key_mask [N, L] (True = attend; None: all) -> [N, L, D]."""
        batch, length, dim = hidden.shape
        q, k, v = self.qkv(hidden).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).unbind(2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf, timm's default act_layer) -> fc2."""

    def __init__(self, settings: ViTSettings):
        super().__init__()
        self.fc1 = nn.Linear(settings.hidden_size, settings.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(settings.intermediate_size, settings.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class ViTBlock(GradientCheckpointingLayer):
    """x + attn(norm1(x)), then x + mlp(norm2(x)) (pre-norm, no layer scale); checkpointed when the model's
    gradient checkpointing is on."""

    def __init__(self, settings: ViTSettings):
        super().__init__()
        self.norm1 = nn.LayerNorm(settings.hidden_size, eps=settings.layer_norm_eps)
        self.attn = Attention(settings)
        self.norm2 = nn.LayerNorm(settings.hidden_size, eps=settings.layer_norm_eps)
        self.mlp = Mlp(settings)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden + self.attn(self.norm1(hidden), key_mask)
        return hidden + self.mlp(self.norm2(hidden))


class VisionTransformer(nn.Module):
    """The tower: `forward(pixels, grids)` for a batch of views padded to one size; `num_blocks` of the built
    blocks are kept (MiniCPM-V 2.0: 26 of 27)."""

    def __init__(self, settings: ViTSettings, num_blocks: int | None = None):
        super().__init__()
        self.settings = settings
        side = settings.image_size // settings.patch_size
        self.patch_embed = PatchEmbed(settings)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, settings.hidden_size))
        kept = settings.num_hidden_layers if num_blocks is None else num_blocks
        self.blocks = nn.ModuleList([ViTBlock(settings) for _ in range(kept)])
        self.norm = nn.LayerNorm(settings.hidden_size, eps=settings.layer_norm_eps)

    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        """The (rows, cols) patch grid of an H x W view: ceil(H / p), ceil(W / p) (dynamic padding)."""
        patch = self.settings.patch_size
        return -(-height // patch), -(-width // patch)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """pixels [N, 3, H, W]: view j's image in its top-left grids[j] patches (zeros elsewhere) -> [N, L, D],
        L = the patches of the [H, W] frame, row-major over it; view j's own patches are the rows r < h_j and
        columns c < w_j of that frame. Each view attends over its own patches only."""
        rows, cols = self.grid_of(*pixels.shape[-2:])
        hidden = self.patch_embed(pixels)
        frame = torch.zeros(len(grids), rows, cols, dtype=torch.bool, device=pixels.device)
        positions = hidden.new_zeros(len(grids), rows, cols, hidden.shape[-1])
        for j, (h, w) in enumerate(grids):
            frame[j, :h, :w] = True
            positions[j, :h, :w] = resample_position_embedding(self.pos_embed, (h, w)).reshape(h, w, -1)
        hidden = hidden + positions.reshape(len(grids), rows * cols, -1)
        key_mask = frame.reshape(len(grids), -1)
        key_mask = None if bool(key_mask.all()) else key_mask
        for block in self.blocks:
            hidden = block(hidden, key_mask)
        return self.norm(hidden)
