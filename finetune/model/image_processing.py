"""How an image becomes views, pixel tensors and placeholder text (spec section 3).

This module is the single source of truth for adaptive slicing: training (`finetune.dataset`) and inference
(`MiniCPMV.chat`) both call it, so what the model sees in training can never drift from what it sees in use.
Everything here is a pure function of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SliceSettings:
    """The slicing parameters of one model (config.slice_config + query_num)."""

    scale_resolution: int = 448
    patch_size: int = 14
    max_slice_nums: int = 9
    query_num: int = 96
    slicing: bool = True  # False: every image is one view (best_resize with upscaling), never sliced


@dataclass(frozen=True)
class SliceGrid:
    """The views of one image: the global view size, and (cols, rows) + cell size when sliced."""

    global_size: tuple[int, int]  # (w, h)
    grid: tuple[int, int] | None = None  # (cols, rows)
    cell_size: tuple[int, int] | None = None  # (w, h) of each crop

    @property
    def num_views(self) -> int:
        return 1 + (self.grid[0] * self.grid[1] if self.grid else 0)

    def view_sizes(self) -> list[tuple[int, int]]:
        sizes = [self.global_size]
        if self.grid:
            sizes += [self.cell_size] * (self.grid[0] * self.grid[1])
        return sizes


# --- geometry ---------------------------------------------------------------------------------------------


def ensure_divide(length: float, multiple: int) -> int:
    """Round to the nearest multiple (Python's round: half to even), at least one multiple."""
    return max(round(length / multiple) * multiple, multiple)


def best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool) -> tuple[int, int]:
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def choose_grid(image_size: tuple[int, int], multiple: int, max_slice_nums: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to the image's (first strict minimum wins)."""
    width, height = image_size
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if 1 < n <= max_slice_nums]
    candidates = [(cols, count // cols) for count in counts for cols in range(1, count + 1) if count % cols == 0]
    log_ratio = math.log(width / height)
    best, best_error = None, float("inf")
    for cols, rows in candidates:
        error = abs(log_ratio - math.log(cols / rows))
        if error < best_error:
            best, best_error = (cols, rows), error
    return best


def plan_slices(image_size: tuple[int, int], settings: SliceSettings) -> SliceGrid:
    """Decide the views of an image of `image_size` (w, h) without touching pixels."""
    width, height = image_size
    resolution, patch = settings.scale_resolution, settings.patch_size
    ratio = width * height / (resolution * resolution)
    multiple = min(math.ceil(ratio), settings.max_slice_nums)
    if not settings.slicing or multiple <= 1:
        return SliceGrid(best_resize((width, height), resolution, patch, allow_upscale=True))
    global_size = best_resize((width, height), resolution, patch, allow_upscale=False)
    cols, rows = choose_grid((width, height), multiple, settings.max_slice_nums)
    refined_w, refined_h = ensure_divide(width, cols), ensure_divide(height, rows)
    cell = best_resize((refined_w / cols, refined_h / rows), resolution, patch, allow_upscale=True)
    return SliceGrid(global_size, (cols, rows), cell)


# --- pixels -----------------------------------------------------------------------------------------------


def slice_image(image: Image.Image, settings: SliceSettings) -> tuple[list[Image.Image], SliceGrid]:
    """Return the views [global, crops row by row, left to right] and the grid that produced them."""
    if image.mode != "RGB":  # convert() copies even when the mode already matches: a 5 MB copy per 1344 px image
        image = image.convert("RGB")
    plan = plan_slices(image.size, settings)
    views = [image.resize(plan.global_size, Image.Resampling.BICUBIC)]
    if plan.grid:
        (cols, rows), (cell_w, cell_h) = plan.grid, plan.cell_size
        refined = image.resize((cell_w * cols, cell_h * rows), Image.Resampling.BICUBIC)
        for row in range(rows):
            for col in range(cols):
                box = (col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h)
                views.append(refined.crop(box))
    return views, plan


def normalize_view(view: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float32 [3, H, W] with (x / 255 - 0.5) / 0.5 (the published processor, for reference)."""
    array = np.asarray(view, dtype=np.float32)
    array = (array / 255.0 - IMAGE_MEAN[0]) / IMAGE_STD[0]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_patch_strip(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[3, H, W] -> the published processor's [3, p, L*p] layout: p x p patches side by side, row-major."""
    channels, height, width = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    patches = pixels.reshape(channels, rows, patch_size, cols, patch_size).permute(0, 2, 1, 3, 4)
    return patches.reshape(channels, patch_size, rows * cols * patch_size)


def uint8_patch_strip(view: Image.Image, patch_size: int) -> torch.Tensor:
    """An RGB view -> its [3, p, L*p] strip still as uint8: the layout of `to_patch_strip`, a quarter of the bytes.

    Training keeps pixels as uint8 until the model normalises them on its own device (`normalize_pixels`):
    the data workers skip ~1.5 ms of float work per view and the host-to-GPU copy is 4x smaller.
    """
    array = np.asarray(view if view.mode == "RGB" else view.convert("RGB"), dtype=np.uint8)  # [H, W, 3], no extra copy
    height, width, _ = array.shape
    rows, cols = height // patch_size, width // patch_size
    # [H, W, C] -> [C, p (row inside patch), rows, cols, p (column inside patch)] == [C, p, L*p] row-major
    strip = array.reshape(rows, patch_size, cols, patch_size, 3).transpose(4, 1, 0, 2, 3)
    return torch.from_numpy(np.ascontiguousarray(strip)).reshape(3, patch_size, rows * cols * patch_size)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 (x / 255 - 0.5) / 0.5, the same float32 operations in the same order as the
    published processor (bit-identical), on whatever device the tensor is. Float input is returned as it is."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.to(torch.float32).div_(255.0).sub_(IMAGE_MEAN[0]).div_(IMAGE_STD[0])


def image_views(image: Image.Image, settings: SliceSettings, normalize: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, SliceGrid]:
    """Everything the model needs from one image: pixel strips [3, p, L*p] (float32 normalised, or uint8 with
    normalize=False; the model accepts both), tgt_sizes [n, 2] (h, w), and the grid."""
    views, plan = slice_image(image, settings)
    patch = settings.patch_size
    strips = [uint8_patch_strip(view, patch) for view in views]
    if normalize:
        strips = [normalize_pixels(strip) for strip in strips]
    tgt_sizes = torch.tensor([(view.size[1] // patch, view.size[0] // patch) for view in views], dtype=torch.int64)
    return strips, tgt_sizes, plan


# --- placeholder text -------------------------------------------------------------------------------------


def image_placeholder(plan: SliceGrid, query_num: int, unk_token: str = "<unk>") -> str:
    """The text that stands for an image: its global block, then the grid of slice blocks if sliced."""
    block = "<image>" + unk_token * query_num + "</image>"
    text = block
    if plan.grid:
        cols, rows = plan.grid
        text += "<slice>" + "\n".join(block * cols for _ in range(rows)) + "</slice>"
    return text


def image_bounds(input_ids: torch.Tensor, image_start_id: int, image_end_id: int) -> torch.Tensor:
    """[(start + 1, end)] for every <image> ... </image> block of a 1-D id tensor, in order."""
    starts = torch.nonzero(input_ids == image_start_id).flatten()
    ends = torch.nonzero(input_ids == image_end_id).flatten()
    if len(starts) != len(ends) or bool((ends <= starts).any() if len(starts) else False):
        raise ValueError(f"unbalanced image tags: {len(starts)} <image> and {len(ends)} </image>")
    return torch.stack([starts + 1, ends], dim=1) if len(starts) else torch.zeros(0, 2, dtype=torch.int64)
