"""How an image becomes views, pixel tensors and placeholder text (spec section 3).

This module is the single source of truth for adaptive slicing: training (`finetune.dataset`) and inference
(`MiniCPMV.chat`) both call it, so what the model sees in training can never drift from what it sees in use.
Everything here is a pure function of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool
) -> tuple[int, int]:
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
        refined = _refined(image, plan)
        for row in range(rows):
            for col in range(cols):
                box = (col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h)
                views.append(refined.crop(box))
    return views, plan


def _refined(image: Image.Image, plan: SliceGrid) -> Image.Image:
    """The image resized to the grid (cols * cell_w, rows * cell_h). PIL's resize to the same size is a plain
    copy (e.g. 1344 x 1344 into 3 x 3 cells of 448): the image itself has the same pixels without the copy."""
    (cols, rows), (cell_w, cell_h) = plan.grid, plan.cell_size
    size = (cell_w * cols, cell_h * rows)
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def view_strips(
    image: Image.Image, settings: SliceSettings, plan: SliceGrid | None = None
) -> tuple[list[torch.Tensor], SliceGrid]:
    """The uint8 [3, p, L*p] strips of all views of `image` (what `uint8_patch_strip` gives for each view of
    `slice_image`, bit for bit) without the PIL crops: the grid's strips come from one pass over each colour
    plane of the refined image (see `grid_strips`). `plan`: the image's `plan_slices`, when already made."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    plan = plan if plan is not None else plan_slices(image.size, settings)
    patch = settings.patch_size
    strips = grid_strips(image.resize(plan.global_size, Image.Resampling.BICUBIC), (1, 1), patch)
    if plan.grid:
        strips += grid_strips(_refined(image, plan), plan.grid, patch)
    return strips, plan


def grid_strips(image: Image.Image, grid: tuple[int, int], patch_size: int) -> list[torch.Tensor]:
    """Cut an RGB image into a (cols, rows) grid of equal cells; return each cell's uint8 [3, p, L*p] strip
    (the layout of `to_patch_strip`), row by row, left to right.

    In the strip, row i of channel c is: for each patch row r, image row r*p + i of the cell, all its columns
    (patches side by side, p columns each, are just the row). So from a colour plane, every copy below moves
    whole cell rows: PIL packs each plane (`tobytes("raw", "R")`, one C pass; np.asarray would interleave RGB
    and a per-channel gather at stride 3 is 3-4x slower) and numpy writes the strips of all cells in one
    assignment per plane. The strips are views of one buffer (no copy per cell), made by torch.from_numpy
    only: a few torch calls fewer per view, which counts when the caches are cold after decoding.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    cols, rows = grid
    width, height = image.size
    cell_w, cell_h = width // cols, height // rows
    if cell_w * cols != width or cell_h * rows != height or cell_w % patch_size or cell_h % patch_size:
        raise ValueError(
            f"a {width}x{height} image does not split into {cols}x{rows} cells of whole {patch_size} px patches"
        )
    patch_rows = cell_h // patch_size
    strips = np.empty((rows, cols, 3, patch_size, patch_rows, cell_w), dtype=np.uint8)
    for channel, band in enumerate("RGB"):
        plane = np.frombuffer(image.tobytes("raw", band), dtype=np.uint8).reshape(
            rows, patch_rows, patch_size, cols, cell_w
        )
        # [grid row, patch row r, row in patch i, grid col, x] -> [grid row, grid col, i, r, x]
        strips[:, :, channel] = plane.transpose(0, 3, 2, 1, 4)
    return [torch.from_numpy(cell) for cell in strips.reshape(rows * cols, 3, patch_size, patch_rows * cell_w)]


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


def from_patch_strip(strip: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of `to_patch_strip`: [3, p, rows*cols*p] -> [3, rows*p, cols*p]."""
    channels, patch = strip.shape[0], strip.shape[1]
    patches = strip.reshape(channels, patch, rows, cols, patch).permute(0, 2, 1, 3, 4)
    return patches.reshape(channels, rows * patch, cols * patch)


def uint8_patch_strip(view: Image.Image, patch_size: int) -> torch.Tensor:
    """An RGB view -> its [3, p, L*p] strip still as uint8: the layout of `to_patch_strip`, a quarter of the bytes.

    Training keeps pixels as uint8 until the model normalises them on its own device (`normalize_pixels`):
    the data workers skip ~1.5 ms of float work per view and the host-to-GPU copy is 4x smaller.
    """
    return grid_strips(view, (1, 1), patch_size)[0]


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 (x / 255 - 0.5) / 0.5, the same float32 operations in the same order as the
    published processor (bit-identical), on whatever device the tensor is. Float input is returned as it is."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.to(torch.float32).div_(255.0).sub_(IMAGE_MEAN[0]).div_(IMAGE_STD[0])


def image_views(
    image: Image.Image, settings: SliceSettings, normalize: bool = True
) -> tuple[list[torch.Tensor], torch.Tensor, SliceGrid]:
    """Everything the model needs from one image: pixel strips [3, p, L*p] (float32 normalised, or uint8 with
    normalize=False; the model accepts both), tgt_sizes [n, 2] (h, w), and the grid."""
    strips, plan = view_strips(image, settings)
    if normalize:
        strips = [normalize_pixels(strip) for strip in strips]
    return strips, view_patch_sizes([plan], settings.patch_size), plan


def view_patch_sizes(plans: Sequence[SliceGrid], patch_size: int) -> torch.Tensor:
    """tgt_sizes of the views of `plans`, in order: [n, 2] int64 (height, width) in patches."""
    sizes = [(h // patch_size, w // patch_size) for plan in plans for w, h in plan.view_sizes()]
    return torch.from_numpy(np.array(sizes, dtype=np.int64).reshape(-1, 2))


# --- where the image features go -----------------------------------------------------------------------
# (The placeholder text itself is a version's own: `versions.<version>.image_placeholder`.)


def image_bounds(
    input_ids: torch.Tensor, image_start_id: int | Sequence[int], image_end_id: int | Sequence[int]
) -> torch.Tensor:
    """[(start + 1, end)] int64 for every block of image-feature positions of a 1-D id tensor, in order: a block
    opens with one of the start ids (<image>; in MiniCPM-V 2.6 also <slice>) and closes with the next end id."""
    return torch.from_numpy(image_bound_array(input_ids.cpu().numpy(), image_start_id, image_end_id))


def image_bound_array(
    input_ids: np.ndarray, image_start_id: int | Sequence[int], image_end_id: int | Sequence[int]
) -> np.ndarray:
    """`image_bounds` on a numpy id array (numpy: a few us per call where torch ops cost tens)."""
    starts = np.flatnonzero(np.isin(input_ids, image_start_id))
    ends = np.flatnonzero(np.isin(input_ids, image_end_id))
    if len(starts) != len(ends) or bool((ends <= starts).any()) or bool((starts[1:] <= ends[:-1]).any()):
        raise ValueError(f"unbalanced image tags: {len(starts)} block openings and {len(ends)} closings")
    return np.stack([starts + 1, ends], axis=1).astype(np.int64, copy=False)
