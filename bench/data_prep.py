"""Data preparation speed on one CPU core: one 1344 x 1344 JPEG sample decoded, sliced, cut into strips and
tokenized, as a DataLoader worker prepares it.

The sample: a photo-like JPEG (gradient + noise, quality 90) and a two-turn conversation, with the full-size
slicing settings (scale_resolution 448, patch 14, max_slice_nums 9, query_num 96: 1 global view + a 3x3 grid =
10 views, 960 placeholder tokens) and the tiny test tokenizer (tokenizing is similar in kind: the placeholder
blocks are built from cached ids, not tokenized). `prepare_sample` is exactly what
`SupervisedDataset.__getitem__` does: header read, slicing plan, tokens and labels, full JPEG decode, the global
view's bicubic resize, and the [3, 14, L*14] uint8 strips of all 10 views; the model normalises them on its own
device. Its parts are timed one by one too, with two reference paths: the per-view PIL path (crops, then one strip
per view) and the float path (`image_views`: decode, slice, normalise).

Each case runs 3 untimed calls, then `iters` timed ones: mean, median and 95th percentile wall time, and the
thread's CPU time (`time.thread_time`), which on a shared machine leaves out the time the core spent elsewhere.
Pin the process to one core for numbers that mean something (`taskset -c 0`).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent.parent / "tests" / "golden_tiny" / "checkpoint"
PREPARE_SAMPLE = "prepare_sample (decode + slice + strips + tokenize)"
PER_VIEW_PATH = "per-view PIL path: decode + slice_image + one strip per view"
FLOAT_PATH = "float path: image_views (decode + slice + normalise)"


def make_sample(folder: str) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # Smooth gradients plus noise: a JPEG that decodes like a photo rather than a flat colour.
    y, x = np.mgrid[0:1344, 0:1344]
    base = np.stack([(x * 255 // 1343), (y * 255 // 1343), ((x + y) * 255 // 2686)], axis=-1)
    pixels = np.clip(base + rng.integers(-20, 20, size=base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, "img.jpg"), quality=90)
    return {
        "id": "bench",
        "image": "img.jpg",
        "conversations": [
            {"role": "user", "content": "Describe this image in detail, please. What are the colours and the layout?"},
            {
                "role": "assistant",
                "content": "It is a smooth gradient from dark to bright, with red growing to the right and green downwards.",
            },
        ],
    }


def measure(fn: Callable[[], object], iters: int) -> dict[str, float]:
    """Mean, p50 and p95 wall ms and mean thread CPU ms of `iters` calls, after 3 warm-up calls."""
    for _ in range(3):  # warm-up (caches, allocator)
        fn()
    wall, cpu = [], []
    for _ in range(iters):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.thread_time() - start_cpu) * 1000)
    ordered = sorted(wall)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {
        "mean_ms": statistics.mean(wall),
        "p50_ms": statistics.median(wall),
        "p95_ms": p95,
        "cpu_ms": statistics.mean(cpu),
    }


def time_cases(iters: int) -> list[dict]:
    """Every case of the module docstring timed on one thread: [{"row": case, "mean_ms", "p50_ms", "p95_ms", "cpu_ms"}]."""
    import torch

    import finetune  # noqa: F401  (registers the tokenizer class)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as each DataLoader worker has; the caller's setting is restored below
    try:
        return _time_cases_on_one_thread(iters)
    finally:
        torch.set_num_threads(threads)


def _time_cases_on_one_thread(iters: int) -> list[dict]:
    from PIL import Image
    from transformers import AutoTokenizer

    from finetune.dataset import ConversationEncoder, parse_record, prepare_sample
    from finetune.model.image_processing import (
        SliceSettings,
        grid_strips,
        image_views,
        normalize_pixels,
        plan_slices,
        slice_image,
        view_strips,
    )

    settings = SliceSettings(scale_resolution=448, patch_size=14, max_slice_nums=9, query_num=96)
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(CHECKPOINT), settings)
    with tempfile.TemporaryDirectory() as folder:
        record = parse_record(make_sample(folder), "bench", folder)
        path = record.images[0][1]

        def full() -> None:
            sample = prepare_sample(record, encoder, max_length=4096)
            assert len(sample.pixel_values) == 10 and len(sample.input_ids) > 960

        def decode() -> Image.Image:
            image = Image.open(path)
            image.load()
            return image

        decoded = decode()
        plan = plan_slices(decoded.size, settings)
        resized = decoded.resize(plan.global_size, Image.Resampling.BICUBIC)
        strips, _ = view_strips(decoded, settings)

        def tokenize() -> None:
            encoder._placeholders.clear()  # uncached: includes building the placeholder ids
            encoder.encode(record, [plan], 4096)

        def per_view_path() -> None:
            views, _ = slice_image(decode(), settings)
            [grid_strips(view, (1, 1), 14)[0] for view in views]

        cases = [
            (PREPARE_SAMPLE, full),
            ("part: open + decode JPEG (PIL)", decode),
            (
                "part: bicubic resize 1344 -> 448 (PIL, global view)",
                lambda: decoded.resize(plan.global_size, Image.Resampling.BICUBIC),
            ),
            ("part: strip of the global view (grid_strips)", lambda: grid_strips(resized, (1, 1), 14)),
            ("part: 9 strips of the 3x3 grid (grid_strips)", lambda: grid_strips(decoded, plan.grid, 14)),
            ("part: tokenize + labels (encoder.encode)", tokenize),
            ("on the model's device: normalise 10 strips", lambda: [normalize_pixels(strip) for strip in strips]),
            (PER_VIEW_PATH, per_view_path),
            (FLOAT_PATH, lambda: image_views(decode(), settings)),
        ]
        return [{"row": name, **measure(fn, iters)} for name, fn in cases]
