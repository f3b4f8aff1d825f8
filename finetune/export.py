"""Export a MiniCPM-V checkpoint for use outside this project.

    python -m finetune.export --model BASE_DIR --output OUT_DIR [--overwrite]
    python -m finetune.export --gguf --model MERGED_DIR --output GGUF_DIR [--type f16|q8_0] [--overwrite]

Formats (one per export; a flag each in the `format` group, the function that writes it in FORMATS):
- `--self_contained` (the default): the checkpoint unchanged -- weights, config.json, tokenizer, preprocessor and
  generation files copied byte for byte -- plus the project's model code as the checkpoint's own remote code
  (finetune.self_contained; config.json's and tokenizer_config.json's auto_map entries are added only where
  missing). It loads with `AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)` and
  `AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)` wherever transformers 5 is installed, this
  project not needed. (A merged model from `python -m finetune.merge` is written this way already.)
- `--gguf`: the two files llama.cpp runs MiniCPM-Llama3-V-2.5 from, the language model (`--type`: f16 or q8_0) and
  the vision projector (finetune.gguf_export, which states the layout); MERGED_DIR is a merged or base checkpoint.

For the self-contained format the model directory is checked first (finetune.model.checkpoint: every tensor present with its shape), and the
output is written as merge writes it: into `OUT_DIR.tmp-<pid>`, renamed at the end; an existing non-empty
OUT_DIR needs --overwrite and must look like a model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from finetune.cli import ArgumentParser
from finetune.gguf_export import QUANT_TYPES, GGUFExportError, export_gguf
from finetune.merge import MergeError, _finish, _give_normal_modes, prepare_output, remove_leftovers, resolve_base
from finetune.model.checkpoint import CheckpointError, validate_checkpoint_dir
from finetune.model.modeling import MiniCPMV
from finetune.model.tokenization import MiniCPMVTokenizerFast
from finetune.self_contained import ModelCodeError, make_self_contained
from finetune.trainer import PASSTHROUGH_FILES

WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


def write_self_contained(model_dir: Path, out: Path, options: argparse.Namespace) -> None:
    """The checkpoint's weights, config and side files copied byte for byte into `out`, with the model code."""
    from transformers import AutoConfig

    import finetune  # noqa: F401  (registers the native config class for model_type minicpmv)

    names = ["config.json", *(p.name for pattern in WEIGHT_FILES for p in sorted(model_dir.glob(pattern)))]
    names += [name for name in PASSTHROUGH_FILES if (model_dir / name).is_file()]
    for name in names:
        shutil.copyfile(model_dir / name, out / name)
    config_class = type(AutoConfig.from_pretrained(model_dir))
    make_self_contained(out, config_class, MiniCPMV, MiniCPMVTokenizerFast)


# Format name -> the function writing it into a fresh directory: (model directory, output directory, options).
FORMATS: dict[str, Callable[[Path, Path, argparse.Namespace], None]] = {"self_contained": write_self_contained}


def export(model: str | Path, output: str | Path, options: argparse.Namespace) -> Path:
    """Check the model directory and OUT, write `options.format` atomically; returns OUT. Raises MergeError or
    CheckpointError before anything is written when the model or OUT is unusable."""
    model_dir, out = resolve_base(str(model), flag="--model"), Path(output)
    validate_checkpoint_dir(model_dir, MiniCPMV)
    tmp = prepare_output(out, options.overwrite, {"--model": model_dir}, out_flag="--output", what="export")
    remove_leftovers(out)
    try:
        tmp.mkdir(parents=True)
        FORMATS[options.format](model_dir, tmp, options)
        _give_normal_modes(tmp)
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m finetune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (or hub id) in the published layout")
    parser.add_argument("--output", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    formats = parser.add_argument_group("format").add_mutually_exclusive_group()
    formats.add_argument(
        "--self_contained",
        dest="format",
        action="store_const",
        const="self_contained",
        help="(default) the checkpoint with the model code as its remote code: loads with trust_remote_code=True, "
        "no need for this project",
    )
    formats.add_argument(
        "--gguf",
        dest="format",
        action="store_const",
        const="gguf",
        help="the language model and the vision projector as GGUF files for llama.cpp (needs `pip install gguf`)",
    )
    parser.add_argument("--type", default="f16", help=f"with --gguf, the LLM's weights: {', '.join(QUANT_TYPES)}")
    parser.set_defaults(format="self_contained")
    return parser


def gguf_cli(args: argparse.Namespace) -> int:
    """--gguf: the two files, written beside each other in --output (existing ones of this type need --overwrite)."""
    try:
        llm_path, mmproj_path = export_gguf(args.model, args.output, args.type, args.overwrite)
    except GGUFExportError as error:
        print(f"finetune.export: error: {error}", file=sys.stderr)
        return 2
    print(f"[export] gguf language model: {llm_path.resolve()}")
    print(f"[export] gguf vision projector: {mmproj_path.resolve()}")
    print(
        f"[export] run it: llama-mtmd-cli -m {llm_path} --mmproj {mmproj_path} --image IMAGE -p 'What is in the image?'"
    )
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "gguf":
        return gguf_cli(args)
    if args.type != parser.get_default("type"):
        parser.error("--type is for --gguf")
    try:
        out = export(args.model, args.output, args)
    except (MergeError, CheckpointError, ModelCodeError) as error:
        print(f"finetune.export: error: {error}", file=sys.stderr)
        return 2
    print(f"[export] {args.format.replace('_', '-')} checkpoint written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
