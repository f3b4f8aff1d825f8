"""Validate a training set before spending GPU time on it.

    python -m finetune.check_data --model M --data D [--eval_data E] [--image_folder F] [--model_max_length N]
        [--max_slice_nums N] [--scale_resolution N] [--no_slicing] [--show ID] [--dump FILE.pt] [--workers N]

Every sample goes through exactly the code training uses (`finetune.validation`, over `finetune.dataset`):
record validation, image decoding (every image, also those of turns truncation would drop), slicing plans,
tokenization with labels, truncation. Pixels are only computed for --show / --dump. Work is spread over
`--workers` processes (default: all CPU cores). Prints counts, token-length percentiles with a suggested
model_max_length, images per sample, views per image, truncated / skipped counts, and every bad sample with the
reason; exits 1 when any sample (or a data file) is bad.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from finetune.cli import ArgumentParser, check_model_flags
from finetune.dataset import DataError, DataSettings
from finetune.model.versions import VERSIONS
from finetune.validation import build_dataset, validate_dataset

LABEL_OPEN, LABEL_CLOSE = "⟦", "⟧"


# --- --show and --dump -------------------------------------------------------------------------------------


def find_index(dataset, sample_id: str) -> int:
    """Dataset position of the sample with this id (or location like "data.json[3]")."""
    for index in range(len(dataset)):
        raw = dataset.source[dataset.mixed_index(index)]
        name = raw.get("id") if isinstance(raw, dict) else None
        if str(name) == sample_id or (
            name is None and dataset.source.location(dataset.mixed_index(index)) == sample_id
        ):
            return index
    raise KeyError(sample_id)


def render_sample(tokenizer, input_ids: Sequence[int], labels: Sequence[int], query_num: int | None = None) -> str:
    """The sample as text: trained (label) spans wrapped in ⟦ ⟧, each image block's <unk> run abbreviated. A label
    that is not its position's input token (2.0: the </s> after an earlier answer, learnt on the next turn's first
    token) is shown as ⟦→label⟧ before that token."""
    unk = tokenizer.convert_tokens_to_ids(tokenizer.unk_token or "<unk>")
    out: list[str] = []
    trained = False
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            run.clear()

    i, n = 0, len(input_ids)
    while i < n:
        is_label = int(labels[i]) != -100
        if is_label and int(labels[i]) != int(input_ids[i]):
            flush()
            target = tokenizer.decode([int(labels[i])], skip_special_tokens=False)
            out.append(f"{LABEL_CLOSE if trained else ''}{LABEL_OPEN}→{target}{LABEL_CLOSE}")
            trained = False
            run.append(int(input_ids[i]))
            i += 1
            continue
        if is_label != trained:
            flush()
            out.append(LABEL_OPEN if is_label else LABEL_CLOSE)
            trained = is_label
        if int(input_ids[i]) == unk:
            j = i
            while j < n and int(input_ids[j]) == unk and (int(labels[j]) != -100) == is_label:
                j += 1
            flush()
            out.append(f"<unk>×{j - i}")
            i = j
            continue
        run.append(int(input_ids[i]))
        i += 1
    flush()
    if trained:
        out.append(LABEL_CLOSE)
    return "".join(out)


def dump_samples(dataset, indices: Sequence[int], path: str) -> int:
    """Save {id: {input_ids, labels, image_bound, tgt_sizes, pixel_values, position_ids}} as training feeds them."""
    dumped = {}
    for index in indices:
        sample = dataset.prepare(index)
        dumped[sample.id] = {
            "input_ids": sample.input_ids,
            "labels": sample.labels,
            "image_bound": sample.image_bound,
            "tgt_sizes": sample.tgt_sizes,
            "pixel_values": sample.pixel_values,
            "position_ids": torch.arange(len(sample.input_ids), dtype=torch.int64),
        }
    torch.save(dumped, path)
    return len(dumped)


# --- CLI ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m finetune.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (tokenizer + config.json)")
    parser.add_argument("--data", required=True, help="data file(s): a.json, b.jsonl or a mix 'a.json:0.7,b.jsonl:0.3'")
    parser.add_argument("--eval_data", default=None)
    parser.add_argument("--image_folder", default=None, help="folder relative image paths are resolved against first")
    parser.add_argument("--model_max_length", type=int, default=DataSettings.model_max_length)
    parser.add_argument("--max_slice_nums", type=int, default=None)
    parser.add_argument("--scale_resolution", type=int, default=None)
    parser.add_argument("--no_slicing", action="store_true", help="every image is one view")
    parser.add_argument(
        "--llm_type",
        default=None,
        choices=[*(version.llm_type for version in VERSIONS.values()), "minicpm"],
        help="the conversation format; must match the model's tokenizer (default: detected from it)",
    )
    parser.add_argument(
        "--seed", type=int, default=DataSettings.seed, help="seed of the ratio sampling when mixing files"
    )
    parser.add_argument("--show", default=None, metavar="ID", help="print this sample rendered, trained spans in ⟦ ⟧")
    parser.add_argument(
        "--dump",
        default=None,
        metavar="FILE.pt",
        help="save every usable sample as training feeds it (pixel_values as uint8 strips; the model normalises them)",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    return parser


def data_settings_from_flags(args: argparse.Namespace) -> DataSettings:
    """The data settings of a check_data command line (training's --data_path is --data here, and so on)."""
    return DataSettings(
        data_path=args.data,
        eval_data_path=args.eval_data,
        image_folder=args.image_folder,
        model_max_length=args.model_max_length,
        max_slice_nums=args.max_slice_nums,
        scale_resolution=args.scale_resolution,
        slicing=False if args.no_slicing else None,
        llm_type=args.llm_type,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_flags("finetune.check_data", args.model, weights=False)  # tokenizer and config.json: no weights read
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = data_settings_from_flags(args)
    try:
        report = validate_dataset(args.model, settings, workers=args.workers)
    except (ValueError, NotImplementedError) as error:  # e.g. llm_type mismatch: a usage error, not bad data
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.format())

    train = report.splits[0]
    if (args.show or args.dump) and not train.file_errors:
        dataset = build_dataset(args.model, settings)
        if args.show:
            try:
                index = find_index(dataset, args.show)
                sample = dataset.prepare(index)
                print(
                    f"\n== sample {sample.id} ({sample.status}, {len(sample.input_ids)} tokens, {len(sample.pixel_values)} views)"
                )
                print(render_sample(dataset.encoder.tokenizer, sample.input_ids.tolist(), sample.labels.tolist()))
            except KeyError:
                print(f"error: no sample with id {args.show!r}", file=sys.stderr)
                return 1
            except DataError as error:
                print(f"error: {error}", file=sys.stderr)
        if args.dump:
            count = dump_samples(dataset, train.usable_indices, args.dump)
            print(f"dumped {count} samples to {args.dump}")

    if not report.ok:
        bad = sum(len(s.bad) for s in report.splits)
        files = sum(len(s.file_errors) for s in report.splits)
        print(f"\nFAILED: {bad} bad sample(s), {files} bad file(s)", file=sys.stderr)
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
