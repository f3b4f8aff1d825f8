"""The vision side of MiniCPMV that every version shares: how tgt_sizes are matched to the views of a call,
the zero gradients a text-only training step gives the vision parameters, the vision residual's dtype, and the
position ids of a view's true (h, w) patch grid for the versions whose tower is given it (MiniCPM-V 2.6).

The vision tower itself is transformers' Idefics2 implementation of SigLIP so400m (the published weights'
names and shapes), called from `MiniCPMV.vision_features`; the resampler is `resampler.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch
from torch import nn
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings


def cast_residual_to_autocast_dtype(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
    """The vision embeddings' output in the autocast dtype, when autocast runs and it is not already.

    A trained vision tower keeps fp32 master weights without DeepSpeed, and autocast computes its matmuls in
    bf16; but its fp32 position embeddings, added to the bf16 patch embeddings, would make the residual stream
    fp32 through all 27 layers: every checkpointed layer input twice the bytes of the bf16 model's (1.8 GiB
    more at 39 views of 448 px), for precision that the bf16 model, the published one and DeepSpeed's, never
    has. A frozen tower loaded in bf16 is bf16 already, so this changes nothing there. The switch is read from
    the embeddings module itself (`MiniCPMV.configure_runtime` writes it there), since PEFT's copies of the
    tower carry this hook and reach no model."""
    device = output.device.type
    if module.residual_in_autocast_dtype and torch.is_autocast_enabled(device):
        return output.to(torch.get_autocast_dtype(device))  # (the same tensor when it is in that dtype already)
    return None


class ZeroGradients(torch.autograd.Function):
    """A zero scalar that depends on the given parameters: backward gives each an all-zero gradient, what
    `features.mean() * 0` of the published dummy image gives the vision parameters it ran through. The zeros
    come as views of one buffer per dtype and device (one fill kernel, not one per parameter)."""

    @staticmethod
    def forward(ctx, *parameters: torch.Tensor) -> torch.Tensor:
        ctx.kinds = [(p.shape, p.dtype, p.device) for p in parameters]
        return parameters[0].new_zeros(())

    @staticmethod
    def backward(ctx, _grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads: list[torch.Tensor | None] = [None] * len(ctx.kinds)
        groups: dict[tuple, list[int]] = {}
        for index, (_, dtype, device) in enumerate(ctx.kinds):
            groups.setdefault((dtype, device), []).append(index)
        for (dtype, device), indices in groups.items():
            sizes = [ctx.kinds[i][0].numel() for i in indices]
            for i, flat in zip(indices, torch.zeros(sum(sizes), dtype=dtype, device=device).split(sizes), strict=True):
                grads[i] = flat.view(ctx.kinds[i][0])
        return tuple(grads)


def view_sizes(
    tgt_sizes: Sequence[Any] | torch.Tensor, view_patches: Sequence[int], views_per_sample: Sequence[int]
) -> torch.Tensor:
    """The (h, w) of every view of a call, [n_views, 2], as the published `get_vllm_embedding` reads tgt_sizes.

    The published code stacks the entries of `data["tgt_sizes"]` that are tensors, in order, and gives row j to
    the j-th view over all samples' pixel_values lists; its collator leaves samples without images out, the
    suite's collator gives them a [0, 2]. Both are read here the same way; an empty entry (`[]`, None, [0, 2])
    adds no rows, and a single [n, 2] tensor is taken as it is. `view_patches[j]` is view j's patch count,
    `views_per_sample` the number of views of each sample (for the messages). Raises ValueError when the rows
    and the views differ in number, or when a row's h * w is not its view's patch count.
    """
    entries = [tgt_sizes] if torch.is_tensor(tgt_sizes) else [entry for entry in tgt_sizes if entry is not None]
    rows = [
        torch.as_tensor(entry, dtype=torch.int64).reshape(-1, 2) for entry in entries
    ]  # int, as published casts them
    rows = [row for row in rows if len(row)]  # (an empty `[]` is made on the host, beside rows on the device)
    # On the host: the checks below read every row, and so does the resampler (its position table). Training
    # moves tgt_sizes to the device; one copy back is the call's only device sync for them.
    sizes = torch.cat([row.to(rows[0].device) for row in rows]).cpu() if rows else torch.zeros(0, 2, dtype=torch.int64)
    if len(sizes) != len(view_patches):
        raise ValueError(
            f"data: {len(view_patches)} view(s) in pixel_values (per sample: {list(views_per_sample)}) but tgt_sizes "
            f"give {len(sizes)} sizes; the concatenated tgt_sizes are assigned to the views in order, so the counts must agree"
        )
    starts = [0, *accumulate(views_per_sample)]
    for index, ((h, w), patches) in enumerate(zip(sizes.tolist(), view_patches, strict=True)):
        if h * w != patches:
            sample = next(i for i in range(len(views_per_sample)) if index < starts[i + 1])
            raise ValueError(
                f"data: sample {sample}, view {index - starts[sample]}: its strip has {patches} patches but its "
                f"tgt_size ({h}, {w}) gives {h * w}: tgt_sizes must give the views' sizes in the views' order"
            )
    return sizes


def grid_position_ids(tgt_sizes: torch.Tensor, length: int, positions_per_side: int) -> torch.Tensor:
    """[N, length] int64: for view j of (h, w) patches, the learned-position index of each of its h * w patches in
    row-major order, 0 beyond them (padding). Each patch's fractional row and column, i / h and k / w in float32
    (as `arange(0, 1 - 1e-6, 1 / h)`), is bucketed (right-closed) into the table's `positions_per_side` equal
    parts, giving row_bucket * positions_per_side + col_bucket: a view of any grid spreads over the whole table."""
    boundaries = torch.arange(1 / positions_per_side, 1.0, 1 / positions_per_side)
    position_ids = torch.zeros(len(tgt_sizes), length, dtype=torch.int64)
    for j, (h, w) in enumerate(tgt_sizes.tolist()):
        rows = torch.bucketize(torch.arange(0, 1 - 1e-6, (1 / torch.tensor(h)).item()), boundaries, right=True)
        cols = torch.bucketize(torch.arange(0, 1 - 1e-6, (1 / torch.tensor(w)).item()), boundaries, right=True)
        position_ids[j, : h * w] = (rows[:, None] * positions_per_side + cols[None, :]).flatten()
    return position_ids


class GridVisionEmbeddings(Idefics2VisionEmbeddings):
    """Idefics2's patch + position embeddings, with the position ids of each view's true (h, w) grid when
    `tgt_sizes` is given (MiniCPM-V 2.6's tower) instead of the grid the patch mask's shape gives. The same
    parameters, so the published weights load unchanged; without tgt_sizes it is Idefics2's."""

    def forward(
        self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor, tgt_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixel_values [N, 3, p, L * p] strips, patch_attention_mask [N, 1, L], tgt_sizes [N, 2] -> [N, L, D]."""
        if tgt_sizes is None:
            return super().forward(pixel_values, patch_attention_mask)
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        position_ids = grid_position_ids(tgt_sizes, patches.shape[1], self.num_patches_per_side)
        return patches + self.position_embedding(position_ids.to(patches.device))
