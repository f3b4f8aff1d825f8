"""RuntimeOptions: how MiniCPMV schedules its training arithmetic, set through `MiniCPMV.configure_runtime`.

Each option trades memory or speed, never the result: the tests check each non-default value against the
default on the same batch (same loss and gradients, within floating-point tolerance), and the run report
records the values a run trained with. The defaults are what training uses; the other values exist so that
tests and benchmarks can compare the two paths, and for the fast paths that set them (`kernels.py`).

The attention implementations are not among them: transformers reads those from the model's config
(`attn_implementation` when loading, `attention.use_varlen_attention` after), for the native class and the
hub's code alike.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

LossKernel = Literal["chunked", "liger"]
LOSS_KERNELS: tuple[LossKernel, ...] = ("chunked", "liger")


@dataclass(frozen=True)
class RuntimeOptions:
    """The options of one model instance; `MiniCPMV.configure_runtime(**changes)` replaces them, validated."""

    # Label positions whose vocabulary logits exist at once in the loss (`loss.label_position_loss`):
    # 2048 x 128,256 fp32 logits = 1 GiB. Smaller chunks save memory for a little speed.
    loss_chunk_size: int = 2048
    # "chunked": the loss's own chunks; "liger": liger-kernel's fused linear cross-entropy (set by
    # `kernels.apply_liger_kernels`, which also swaps the LLM's kernels).
    loss_kernel: LossKernel = "chunked"
    # Under ZeRO-3, the loss computes each rank's logits on its own rows of a frozen lm_head (`sharded_loss`),
    # which is never gathered. False gathers it per loss chunk instead.
    vocab_sharded_loss: bool = True
    # In a single process, a training call without images gives the trained vision parameters the zero
    # gradients the published dummy image gives them, without running the vision tower (`ZeroGradients`).
    # False runs the dummy image through the tower as the published code does.
    dummy_image_stand_in: bool = True
    # Under autocast, the vision tower's residual stream starts in the autocast dtype, as in the bf16 model.
    # False keeps the fp32 stream that a trained fp32 tower would otherwise carry (twice the checkpointed bytes).
    vision_residual_in_autocast_dtype: bool = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.loss_chunk_size, bool)
            or not isinstance(self.loss_chunk_size, int)
            or self.loss_chunk_size < 1
        ):
            raise ValueError(f"loss_chunk_size must be a positive int, got {self.loss_chunk_size!r}")
        if self.loss_kernel not in LOSS_KERNELS:
            raise ValueError(f"loss_kernel must be one of {LOSS_KERNELS}, got {self.loss_kernel!r}")
        for field in fields(self):
            if field.type == "bool" and not isinstance(getattr(self, field.name), bool):
                raise ValueError(f"{field.name} must be True or False, got {getattr(self, field.name)!r}")
