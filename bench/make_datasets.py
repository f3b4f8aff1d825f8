"""Write the benchmark's two synthetic training sets for finetune.py / trainer_bench.py runs.

    python3 bench/make_datasets.py OUT_DIR [--mm-samples 64] [--text-samples 24] [--tiny]

OUT_DIR/mm/train.json    multimodal: JPEG 400..2000 px sliced by the real rule, 1-3 exchanges, 300..2000 tokens
                         (bench_train.make_mm_dataset, seed 0: the same set bench_train.py's mm rows read;
                         1209 tokens and 7.6 views per sample on average)
OUT_DIR/mm_upstream_like/train.json
                         multimodal with the averages of the set upstream's 1.35 samples/s was measured on
                         (bench_train.UPSTREAM_LIKE: 448..1920 px, 2-4 exchanges; 865 tokens, 5.7 views)
                         (both kept, not rebuilt, when one made with the same parameters is already there)
OUT_DIR/text/train.json  text only: one question + one answer, 2024..2048 tokens each (make_text_dataset)

Token counts use the demo tokenizer that make_checkpoint.py writes beside the full-size random checkpoint.
`--tiny` uses the tiny test architecture's slicing (112 px views) and shorter text rows (256 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--mm-samples", type=int, default=64)
    parser.add_argument("--text-samples", type=int, default=24)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()

    from bench_train import UPSTREAM_LIKE, make_mm_dataset, make_text_dataset, mm_set_stats
    from finetune.model.builders import build_tokenizer
    from finetune.model.image_processing import SliceSettings

    tokenizer = build_tokenizer(os.path.join(args.out_dir, "tokenizer"))
    settings = SliceSettings(112, 14, 9, 16) if args.tiny else SliceSettings(448, 14, 9, 96)
    paths = {
        "mm": make_mm_dataset(os.path.join(args.out_dir, "mm"), args.mm_samples, tokenizer, settings),
        "mm_upstream_like": make_mm_dataset(os.path.join(args.out_dir, "mm_upstream_like"), args.mm_samples, tokenizer, settings, **UPSTREAM_LIKE),
        "text": make_text_dataset(os.path.join(args.out_dir, "text"), args.text_samples, tokenizer, settings, 256 if args.tiny else 2048),
    }
    print("[data] " + json.dumps(paths), flush=True)
    for name in ("mm", "mm_upstream_like"):
        print(f"[data] {name}: " + json.dumps(mm_set_stats(paths[name], tokenizer, settings)), flush=True)


if __name__ == "__main__":
    main()
