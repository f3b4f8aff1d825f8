"""`python -m finetune.build_tiny OUT_DIR [--version 2.5|2.6|2.0] [--seed N] [--shards K] [--demo]`: write a tiny
random-weight MiniCPM-V checkpoint in the published layout (tokenizer trained on the bundled demo texts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.build_tiny", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="directory to write the checkpoint into (created if missing)")
    parser.add_argument(
        "--version",
        choices=("2.5", "2.6", "2.0"),
        default="2.5",
        help="MiniCPM-V version: 2.5 (MiniCPM-Llama3-V-2.5, the default), 2.6 (MiniCPM-V 2.6) or 2.0 (MiniCPM-V 2.0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=1024,
        help="tokenizer size cap incl. the special tokens (at least 2.5: 512, 2.6: 280, 2.0: 467; default 1024)",
    )
    parser.add_argument(
        "--shards", type=int, default=0, help="also write a sharded copy (published layout) to OUT_DIR-sharded"
    )
    parser.add_argument(
        "--demo", action="store_true", help="make demo's sizes (DEMO_CONFIG_OVERRIDES: a wider vision tower)"
    )
    args = parser.parse_args(argv)

    from finetune.model.versions import VERSIONS
    from finetune.synthetic import DEMO_CONFIG_OVERRIDES, build_tiny_checkpoint, write_published_shards

    overrides = DEMO_CONFIG_OVERRIDES if args.demo else None
    out_dir = build_tiny_checkpoint(
        args.out_dir, seed=args.seed, vocab_size=args.vocab_size, config_overrides=overrides, version=args.version
    )
    config = json.loads((out_dir / "config.json").read_text())
    model_name = VERSIONS[args.version].hub_id.split("/")[-1]
    print(f"wrote tiny {model_name} checkpoint to {out_dir} (seed {args.seed}):")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path.name:28s} {path.stat().st_size:>12,d} bytes")
    print(
        f"  vocab {config['vocab_size']} (bos {config['bos_token_id']}, eos {config['eos_token_id']}, pad "
        f"{config.get('pad_token_id')}), hidden {config['hidden_size']}, layers {config['num_hidden_layers']}, "
        f"vision hidden {config['vision_config']['hidden_size']}, "
        f"query_num {config['query_num']}, scale_resolution {config.get('slice_config', config)['scale_resolution']}"
    )
    if args.shards:
        sharded = write_published_shards(out_dir, Path(f"{out_dir}-sharded"), args.shards)
        print(f"wrote a {args.shards}-shard copy to {sharded}")


if __name__ == "__main__":
    main()
