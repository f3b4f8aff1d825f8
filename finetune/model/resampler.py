"""The perceiver resampler: query_num learned queries (96 in MiniCPM-Llama3-V-2.5) attend over one view's vision
features (spec section 4). `QueryPositionResampler` is MiniCPM-V 2.0's older variant: its queries carry a 2-D
sin-cos position embedding too, and its views come laid out in a patch frame (`vit.VisionTransformer`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POS_TABLE_SIDE = 70  # the published table is 70 x 70; it grows when a view needs more


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """E(pos) = [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2)), in float32 like the published numpy."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    angles = np.einsum("hw,d->hwd", positions, omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def sincos_2d_table(dim: int, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols, dim]; entry (r, c) = concat(E(c), E(r)): first half encodes the column, second the row."""
    grid_cols, grid_rows = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    table = np.concatenate([sincos_1d(dim // 2, grid_cols), sincos_1d(dim // 2, grid_rows)], axis=-1)
    return torch.from_numpy(table)


class ResamplerAttention(nn.Module):
    """Multi-head attention with torch.nn.MultiheadAttention's parameter names (in_proj_weight, in_proj_bias,
    out_proj), batch first, through scaled_dot_product_attention. A module of its own, called through its
    forward, so that ZeRO-3's hooks gather its parameters (reading another module's parameters would not)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """query [N, Q, D], key/value [N, L, D], key_mask [N, L] (True = attend) -> [N, Q, D]."""
        batch, heads, head_dim = query.shape[0], self.num_heads, self.embed_dim // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, heads, head_dim).transpose(1, 2)

        q = split_heads(F.linear(query, w_q, b_q))
        k = split_heads(F.linear(key, w_k, b_k))
        v = split_heads(F.linear(value, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(batch, -1, self.embed_dim))


class Resampler(nn.Module):
    """Parameters are stored like the published one (attn.in_proj_weight, attn.out_proj, ...)."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_queries, self.embed_dim = num_queries, embed_dim
        self.num_heads = embed_dim // 128
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, self.num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))
        # Not a buffer on purpose: a non-persistent buffer is not in the checkpoint and transformers 5 leaves it
        # uninitialised on load. A plain cache, rebuilt on demand, cannot be corrupted that way.
        self._pos_table: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def position_table(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        side_r, side_c = max(rows, POS_TABLE_SIDE), max(cols, POS_TABLE_SIDE)
        key = (device, side_r, side_c)
        if key not in self._pos_table:
            self._pos_table[key] = sincos_2d_table(self.embed_dim, side_r, side_c).to(device)
        return self._pos_table[key]

    def key_positions(self, tgt_sizes: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
        """[N, length, D] float32: view j's top-left h_j x w_j block of the table, row-major, zero-padded."""
        sizes = tgt_sizes.tolist()
        table = self.position_table(max(h for h, _ in sizes), max(w for _, w in sizes), device)
        out = torch.zeros(len(sizes), length, self.embed_dim, device=device)
        for j, (h, w) in enumerate(sizes):
            out[j, : h * w] = table[:h, :w].reshape(h * w, -1)
        return out

    def forward(self, features: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """features [N, L, kv_dim] (vision output, padded), tgt_sizes [N, 2] -> [N, num_queries, embed_dim]."""
        num_views, length, _ = features.shape
        device = features.device
        patch_counts = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(device)
        keep = torch.arange(length, device=device)[None, :] < patch_counts[:, None]  # True = attend

        x = self.ln_kv(self.kv_proj(features))
        keys = x + self.key_positions(tgt_sizes, length, device).to(x.dtype)
        queries = self.ln_q(self.query).unsqueeze(0).expand(num_views, -1, -1)

        out = self.attn(queries, keys, x, keep)
        return self.ln_post(out) @ self.proj


class QueryPositionResampler(Resampler):
    """MiniCPM-V 2.0's resampler: the shared one plus `pos_embed` [Q, D], the 2-D sin-cos table of the
    sqrt(Q) x sqrt(Q) query grid, a frozen parameter stored in the checkpoint and added to the queries.

    Per view (published `Resampler.forward` with adaptive=True, one view per call there):
    attn(ln_q(query) + pos_embed, ln_kv(kv_proj(x)) + sincos(h, w), ln_kv(kv_proj(x))) -> ln_post -> @ proj,
    with sincos(h, w) the [h*w, D] table of the view's own patch grid built on the fly (`sincos_2d_table`, the
    same table as the shared resampler's). Here several views run in one call, laid out in a patch frame of
    `frame` = (rows, cols) (`vit.VisionTransformer`): view j's patches are the frame's r < h_j, c < w_j, and
    a key mask keeps each view's queries to them (what one view per call gives)."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, eps: float = 1e-6):
        super().__init__(num_queries, embed_dim, kv_dim, eps)
        side = math.isqrt(num_queries)
        # The table comes from numpy, which ignores a device context: place it where the model is being built.
        table = self.query_grid_table(embed_dim, side).to(self.query.device)
        self.pos_embed = nn.Parameter(table, requires_grad=False)

    @staticmethod
    def query_grid_table(embed_dim: int, side: int) -> torch.Tensor:
        """[side * side, D]: the published initial (and stored) value of `pos_embed`."""
        return sincos_2d_table(embed_dim, side, side).reshape(side * side, embed_dim)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int]], frame: tuple[int, int]) -> torch.Tensor:
        """features [N, rows * cols, kv_dim] (vision output in the frame), grids [(h, w)] per view, frame
        (rows, cols) -> [N, num_queries, embed_dim]."""
        rows, cols = frame
        device = features.device
        x = self.ln_kv(self.kv_proj(features))
        key_positions = torch.zeros(len(grids), rows, cols, self.embed_dim, device=device)
        keep = torch.zeros(len(grids), rows, cols, dtype=torch.bool, device=device)
        table = self.position_table(max(h for h, _ in grids), max(w for _, w in grids), device)
        for j, (h, w) in enumerate(grids):
            key_positions[j, :h, :w] = table[:h, :w]
            keep[j, :h, :w] = True
        keys = x + key_positions.reshape(len(grids), rows * cols, -1).to(x.dtype)
        queries = (self.ln_q(self.query) + self.pos_embed.to(x.dtype)).unsqueeze(0).expand(len(grids), -1, -1)
        out = self.attn(queries, keys, x, keep.reshape(len(grids), -1))
        return self.ln_post(out) @ self.proj
