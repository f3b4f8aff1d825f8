"""Write a checkpoint directory of the FULL-SIZE MiniCPM-Llama3-V-2.5 architecture with random weights.

    python3 bench/make_checkpoint.py OUT_DIR [--dtype bf16|fp32] [--device cuda]

The model is created directly on the GPU (finetune.model.builders.build_full_size_random), saved with
save_pretrained (safetensors shards, ~16 GB in bf16), next to the demo tokenizer files (build_tokenizer: a small
Llama-3-style vocabulary; the model's 128256-row embedding simply has unused rows) and the published
preprocessor / generation sidecar files. Used by bench/device_run.sh to drive finetune/finetune_lora.sh on a
full-size model. `--tiny` writes the tiny test architecture instead (CPU smoke tests of the same commands).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny test architecture (CPU smoke tests)")
    args = parser.parse_args()

    from finetune.model.builders import build_full_size_random, build_tiny_checkpoint, build_tokenizer, write_sidecar_files

    start = time.perf_counter()
    if args.tiny:
        build_tiny_checkpoint(args.out_dir)
        print(f"[ckpt] tiny checkpoint in {args.out_dir} ({time.perf_counter() - start:.1f}s)", flush=True)
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    build_tokenizer(args.out_dir)
    model = build_full_size_random(args.device, dtype=dtype)
    built = time.perf_counter()
    model.save_pretrained(args.out_dir, safe_serialization=True, max_shard_size="4GB")
    write_sidecar_files(args.out_dir, model.config)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"[ckpt] {params / 1e9:.3f} B parameters ({args.dtype}) in {args.out_dir}: built {built - start:.1f}s, "
        f"saved {time.perf_counter() - built:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
