"""Time preparing one 1344x1344 JPEG sample on one core: decode, slice, strips, tokenize (target <= 25 ms).

Full-size slicing settings (scale_resolution 448, query_num 96, max_slice_nums 9) with the tiny test tokenizer
(the cost of tokenizing is similar in kind: the 96-<unk> blocks are built from cached ids, not tokenized).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/bench_data_prep.py [--iters 50] [--compare]

Each case reports wall time and the thread's CPU time (time.thread_time): on a shared machine the wall time
also counts time the core spent on other processes, the CPU time does not. --compare also times the previous
per-view PIL path (crops + one strip per view) and the float reference path (image_views, normalised).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import finetune  # noqa: E402,F401
from transformers import AutoTokenizer  # noqa: E402

from finetune.dataset import ConversationEncoder, parse_record, prepare_sample  # noqa: E402
from finetune.model.image_processing import (  # noqa: E402
    SliceSettings, grid_strips, image_views, normalize_pixels, plan_slices, slice_image, view_strips,
)

CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden_tiny", "checkpoint")


def make_sample(folder: str) -> dict:
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
            {"role": "assistant", "content": "It is a smooth gradient from dark to bright, with red growing to the right and green downwards."},
        ],
    }


def stats(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return statistics.mean(times), statistics.median(times), p95


def measure(fn, iters: int) -> tuple[float, float, float, float]:
    """(mean, p50, p95) wall ms and mean thread CPU ms of `iters` calls, after 3 warm-up calls."""
    for _ in range(3):  # warm-up (caches, allocator)
        fn()
    wall, cpu = [], []
    for _ in range(iters):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.thread_time() - start_cpu) * 1000)
    return (*stats(wall), statistics.mean(cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--compare", action="store_true", help="also time the previous per-view path and the float reference path")
    args = parser.parse_args()
    torch.set_num_threads(1)

    settings = SliceSettings(scale_resolution=448, patch_size=14, max_slice_nums=9, query_num=96)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    encoder = ConversationEncoder(tokenizer, settings)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        raw = make_sample(folder)
        record = parse_record(raw, "bench", folder)
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

        def per_view_path() -> None:  # before: PIL crops, then one np.asarray + transpose copy per view
            views, _ = slice_image(decode(), settings)
            [grid_strips(view, (1, 1), 14)[0] for view in views]

        def reference_pixels() -> None:
            image_views(decode(), settings)

        cases = [
            ("prepare_sample (decode+slice+strips+tokenize)", full),
            ("  part: open + decode JPEG (PIL)", decode),
            ("  part: bicubic resize 1344->448 (PIL, global view)", lambda: decoded.resize(plan.global_size, Image.Resampling.BICUBIC)),
            ("  part: strip of the global view (grid_strips)", lambda: grid_strips(resized, (1, 1), 14)),
            ("  part: 9 strips of the 3x3 grid (grid_strips)", lambda: grid_strips(decoded, plan.grid, 14)),
            ("  part: tokenize + labels (encoder.encode)", tokenize),
            ("  (on the model's device: normalise 10 strips)", lambda: [normalize_pixels(strip) for strip in strips]),
        ]
        if args.compare:
            cases.append(("before: decode + slice_image + strip per view", per_view_path))
            cases.append(("reference image_views (decode+slice+normalise)", reference_pixels))
        for name, fn in cases:
            rows.append((name, *measure(fn, args.iters)))

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}, load average {os.getloadavg()[0]:.2f}, affinity {sorted(os.sched_getaffinity(0))}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, PIL {Image.__version__}, threads {torch.get_num_threads()}")
    print(f"{'case':<52} {'mean ms':>8} {'p50 ms':>8} {'p95 ms':>8} {'cpu ms':>8}")
    for name, mean, p50, p95, cpu in rows:
        print(f"{name:<52} {mean:8.2f} {p50:8.2f} {p95:8.2f} {cpu:8.2f}")
    print(json.dumps({name.strip(): {"mean_ms": round(m, 2), "p50_ms": round(p, 2), "p95_ms": round(q, 2), "cpu_ms": round(c, 2)} for name, m, p, q, c in rows}))


if __name__ == "__main__":
    main()
