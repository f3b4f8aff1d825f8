"""Time preparing one 1344x1344 JPEG sample on one core: decode, slice, normalise, tokenize (target <= 25 ms).

Full-size slicing settings (scale_resolution 448, query_num 96, max_slice_nums 9) with the tiny test tokenizer
(the cost of tokenizing is similar in kind: the 96-<unk> blocks are built from cached ids, not tokenized).

    .venv/bin/python bench/bench_data_prep.py [--iters 50] [--compare]

--compare also times the same sample through image_processing.image_views (the reference pixel path).
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
from finetune.model.image_processing import SliceSettings, image_views  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--compare", action="store_true", help="also time the reference image_views path")
    args = parser.parse_args()
    torch.set_num_threads(1)

    settings = SliceSettings(scale_resolution=448, patch_size=14, max_slice_nums=9, query_num=96)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    encoder = ConversationEncoder(tokenizer, settings)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        raw = make_sample(folder)
        record = parse_record(raw, "bench", folder)

        def full() -> None:
            sample = prepare_sample(record, encoder, max_length=4096)
            assert len(sample.pixel_values) == 10 and len(sample.input_ids) > 960

        def reference_pixels() -> None:
            image = Image.open(record.images[0][1])
            image.load()
            image_views(image, settings)

        from finetune.model.image_processing import normalize_pixels, slice_image, uint8_patch_strip

        def decode() -> Image.Image:
            image = Image.open(record.images[0][1])
            image.load()
            return image

        decoded = decode()
        views, plan = slice_image(decoded, settings)

        def tokenize() -> None:
            encoder._placeholders.clear()  # uncached: includes building the placeholder ids
            encoder.encode(record, [plan], 4096)

        cases = [
            ("prepare_sample (decode+slice+strips+tokenize)", full),
            ("  part: decode JPEG (PIL)", decode),
            ("  part: slice (slice_image: resize + crops)", lambda: slice_image(decoded, settings)),
            ("  part: 10 uint8 strips (what training feeds)", lambda: [uint8_patch_strip(v, 14) for v in views]),
            ("  (moved to the model's device: normalise 10 strips)", lambda: [normalize_pixels(uint8_patch_strip(v, 14)) for v in views]),
            ("  part: tokenize + labels (encoder.encode)", tokenize),
        ]
        if args.compare:
            cases.append(("reference image_views (decode+slice+normalise)", reference_pixels))
        for name, fn in cases:
            for _ in range(3):  # warm-up (caches, allocator)
                fn()
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1000)
            rows.append((name, *stats(times)))

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, PIL {Image.__version__}, threads {torch.get_num_threads()}")
    print(f"{'case':<52} {'mean ms':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for name, mean, p50, p95 in rows:
        print(f"{name:<52} {mean:8.2f} {p50:8.2f} {p95:8.2f}")
    print(json.dumps({name: {"mean_ms": round(m, 2), "p50_ms": round(p, 2), "p95_ms": round(q, 2)} for name, m, p, q in rows}))


if __name__ == "__main__":
    main()
