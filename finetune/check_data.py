"""Validate a training set before spending GPU time on it.

    python -m finetune.check_data --model M --data D [--eval_data E] [--image_folder F] [--model_max_length N]
        [--max_slice_nums N] [--scale_resolution N] [--no_slicing] [--show ID] [--dump FILE.pt] [--workers N]

Every sample goes through exactly the code training uses (`finetune.dataset`): record validation, image
decoding (every image, also those of turns truncation would drop), slicing plans, tokenization with labels,
truncation. Pixels are only computed for --show / --dump. Work is spread over `--workers` processes (default:
all CPU cores). Prints counts, token-length percentiles with a suggested model_max_length, images per sample,
views per image, truncated / skipped counts, and every bad sample with the reason; exits 1 when any sample
(or a data file) is bad. `validate_dataset(...)` returns the same report for finetune.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger("finetune.dataset")

LABEL_OPEN, LABEL_CLOSE = "⟦", "⟧"


@dataclass
class SampleResult:
    """What validation learned about one sample (small: sent back from worker processes)."""

    index: int
    id: str | None
    status: str  # kept / truncated / skipped / bad
    length: int = 0  # tokens before truncation (0 when bad)
    kept_length: int = 0
    num_images: int = 0
    views_per_image: tuple[int, ...] = ()
    reason: str = ""
    has_id: bool = False


@dataclass
class SplitReport:
    """Validation of one data spec (train or eval)."""

    name: str
    spec: str
    results: list[SampleResult] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)  # a whole file unusable (malformed JSON list, missing)
    duplicate_ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # one line per data file: what it contributes (MixedSource)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def bad(self) -> list[SampleResult]:
        return [r for r in self.results if r.status == "bad"]

    @property
    def usable_indices(self) -> list[int]:
        return [r.index for r in self.results if r.status in ("kept", "truncated")]

    @property
    def lengths(self) -> list[int]:
        return [r.length for r in self.results if r.status != "bad"]

    def percentiles(self) -> dict[str, int]:
        lengths = np.asarray(self.lengths)
        if not len(lengths):
            return {}
        out = {f"p{q}": int(math.ceil(np.percentile(lengths, q))) for q in (50, 90, 95, 99)}
        out["max"] = int(lengths.max())
        return out

    def suggested_max_length(self) -> int | None:
        """p99 rounded up to a multiple of 64 (covers 99% of samples untruncated); never above max rounded up."""
        stats = self.percentiles()
        if not stats:
            return None
        return min(_round_up(stats["p99"], 64), _round_up(stats["max"], 64))


@dataclass
class ValidationReport:
    """The report `validate_dataset` returns; `ok` is False when any sample or file is bad."""

    splits: list[SplitReport]
    model_max_length: int | None

    @property
    def ok(self) -> bool:
        return all(not s.bad and not s.file_errors for s in self.splits)

    def format(self) -> str:
        return "\n".join(_format_split(s, self.model_max_length) for s in self.splits)


def _round_up(value: int, multiple: int) -> int:
    return int(-(-value // multiple) * multiple)


# --- worker side -------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _build(options: dict[str, Any]):
    """Tokenizer + config + dataset for one data spec (in each worker process: they do not pickle cheaply)."""
    import finetune  # noqa: F401  (registers the Auto classes)
    from transformers import AutoTokenizer

    from finetune.dataset import SupervisedDataset
    from finetune.model import MiniCPMVConfig

    tokenizer = AutoTokenizer.from_pretrained(options["model"], clean_up_tokenization_spaces=False)
    config = MiniCPMVConfig.from_pretrained(options["model"])
    return SupervisedDataset(
        options["data"], tokenizer, config,
        image_folder=options.get("image_folder"),
        model_max_length=options.get("model_max_length"),
        max_slice_nums=options.get("max_slice_nums"),
        scale_resolution=options.get("scale_resolution"),
        slicing=options.get("slicing"),
        llm_type=options.get("llm_type"),
        seed=options.get("seed", 42),
    )  # fmt: skip


def _init_worker(options: dict[str, Any] | None) -> None:
    logging.getLogger("finetune.dataset").setLevel(logging.ERROR)  # the parent reports; workers stay quiet
    torch.set_num_threads(1)
    if options is not None:  # spawn; with fork the dataset was inherited
        _WORKER["dataset"] = _build(options)


def check_sample(dataset, index: int) -> SampleResult:
    """Validate one sample: the training path without pixel math (every image is still fully decoded)."""
    from finetune.dataset import DataError, SampleTooLong, prepare_sample

    record = None
    try:
        record = dataset.record(index)
        sample = prepare_sample(record, dataset.encoder, dataset.model_max_length, load_pixels=False, decode_all=True)
    except SampleTooLong as error:
        return SampleResult(index, error.sample, "skipped", error.length, 0, len(record.images) if record else 0, reason=str(error), has_id=bool(record and record.has_id))
    except DataError as error:
        where = error.sample or dataset.source.location(dataset.mixed_index(index))
        return SampleResult(index, where, "bad", reason=error.reason if error.sample else str(error))
    return SampleResult(index, sample.id, sample.status, sample.full_length, len(sample.input_ids), sample.num_images, tuple(sample.views_per_image), has_id=record.has_id)


def _check_chunk(indices: list[int]) -> list[SampleResult]:
    dataset = _WORKER["dataset"]
    return [check_sample(dataset, i) for i in indices]


# --- driver ------------------------------------------------------------------------------------------------


def validate_split(name: str, options: dict[str, Any], workers: int) -> SplitReport:
    from finetune.dataset import DataError

    try:
        dataset = _build(options)
    except DataError as error:
        report = SplitReport(name, options["data"])
        report.file_errors.append(str(error))
        return report
    return validate_built(name, options["data"], dataset, workers, options)


def validate_built(name: str, spec: str, dataset, workers: int, options: dict[str, Any] | None = None) -> SplitReport:
    """Validate every sample of a built SupervisedDataset, on `workers` processes."""
    return split_report(name, spec, check_samples(dataset, range(len(dataset)), workers, options), sources=dataset.source.share_lines())


def check_samples(dataset, indices: Sequence[int], workers: int, options: dict[str, Any] | None = None) -> list[SampleResult]:
    """Validate the samples at `indices` of a built SupervisedDataset, on `workers` processes (finetune.py
    gives each rank its share of the indices).

    Workers are forked (Linux) and inherit the dataset; where fork is unavailable they rebuild it from
    `options` (check_data's), and without options the check runs in this process.
    """
    import multiprocessing

    indices = list(indices)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if workers <= 1 or len(indices) < 64 or (method == "spawn" and options is None):
        return [check_sample(dataset, i) for i in indices]
    chunk = max(16, min(1024, len(indices) // (workers * 8) or 1))
    chunks = [indices[s : s + chunk] for s in range(0, len(indices), chunk)]
    # fork: workers inherit the parent's dataset, no re-import (spawn costs seconds per worker). The parent
    # has run no torch parallel region, and tokenizers' own thread pool is disabled below.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["dataset"] = dataset if method == "fork" else None
    initargs = (None if method == "fork" else options,)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker, initargs=initargs) as pool:
            return [r for part in pool.map(_check_chunk, chunks) for r in part]
    finally:
        _WORKER.pop("dataset", None)


def split_report(name: str, spec: str, results: list[SampleResult], log: bool = True, sources: Sequence[str] = ()) -> SplitReport:
    """The report of one data spec from every sample's result, in dataset order; with `log`, each truncated or
    skipped sample and duplicate ids are logged here (workers are quiet). Bad samples are not: the report lists
    them, and finetune.py's error and check_data's exit do again. `sources`: MixedSource.share_lines(), printed
    for a mix of several files."""
    from finetune.dataset import duplicate_ids

    report = SplitReport(name, spec, results=results, sources=list(sources))
    for r in results if log else ():
        if r.status == "truncated":
            logger.info("sample %s: truncated from %d to %d tokens", r.id, r.length, r.kept_length)
        elif r.status == "skipped":
            logger.warning("%s", r.reason)
    report.duplicate_ids = duplicate_ids(Counter(r.id for r in results if r.has_id), warn=log)
    return report


def validate_dataset(
    model: str,
    data: str,
    eval_data: str | None = None,
    *,
    image_folder: str | None = None,
    model_max_length: int | None = 2048,
    max_slice_nums: int | None = None,
    scale_resolution: int | None = None,
    slicing: bool | None = None,
    llm_type: str | None = None,
    workers: int | None = None,
    seed: int = 42,
) -> ValidationReport:
    """Validate the train (and eval) data exactly as training will read it; see ValidationReport."""
    workers = workers or os.cpu_count() or 1
    common = dict(model=model, image_folder=image_folder, model_max_length=model_max_length, max_slice_nums=max_slice_nums,
                  scale_resolution=scale_resolution, slicing=slicing, llm_type=llm_type, seed=seed)  # fmt: skip
    splits = [validate_split("train", dict(common, data=data), workers)]
    if eval_data:
        splits.append(validate_split("eval", dict(common, data=eval_data), workers))
    return ValidationReport(splits, model_max_length)


def _format_split(split: SplitReport, model_max_length: int | None) -> str:
    lines = [f"== {split.name}: {split.spec}"]
    for error in split.file_errors:
        lines.append(f"  BAD FILE: {error}")
    if split.file_errors:
        return "\n".join(lines)
    results = split.results
    lines.append(
        f"  samples: {len(results)}  kept: {split.count('kept')}  truncated: {split.count('truncated')}  "
        f"skipped (too long): {split.count('skipped')}  bad: {split.count('bad')}"
    )
    if len(split.sources) > 1:
        lines += [f"  from {line}" for line in split.sources]
    stats = split.percentiles()
    if stats:
        lines.append("  tokens (before truncation): " + "  ".join(f"{k} {v}" for k, v in stats.items()))
        lines.append(
            f"  suggested model_max_length: {split.suggested_max_length()} (p99 rounded up to 64; "
            f"{_round_up(stats['max'], 64)} keeps every sample whole); current: {model_max_length}"
        )
    good = [r for r in results if r.status != "bad"]
    if good:
        images = Counter(r.num_images for r in good)
        lines.append("  images per sample: " + ", ".join(f"{k}: {images[k]}" for k in sorted(images)))
        views = Counter(v for r in good for v in r.views_per_image)
        if views:
            lines.append("  views per image: " + ", ".join(f"{k}: {views[k]}" for k in sorted(views)))
    if split.duplicate_ids:
        lines.append(f"  WARNING duplicate ids ({len(split.duplicate_ids)}): {', '.join(split.duplicate_ids[:20])}")
    for r in results:
        if r.status == "skipped":
            lines.append(f"  SKIPPED {r.id}: {r.reason}")
    for r in split.bad:
        lines.append(f"  BAD {r.id}: {r.reason}")
    return "\n".join(lines)


# --- --show and --dump -------------------------------------------------------------------------------------


def find_index(dataset, sample_id: str) -> int:
    """Dataset position of the sample with this id (or location like "data.json[3]")."""
    for index in range(len(dataset)):
        raw = dataset.source[dataset.mixed_index(index)]
        name = raw.get("id") if isinstance(raw, dict) else None
        if str(name) == sample_id or (name is None and dataset.source.location(dataset.mixed_index(index)) == sample_id):
            return index
    raise KeyError(sample_id)


def render_sample(tokenizer, input_ids: Sequence[int], labels: Sequence[int], query_num: int | None = None) -> str:
    """The sample as text: trained (label) spans wrapped in ⟦ ⟧, each image block's <unk> run abbreviated."""
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
    parser = argparse.ArgumentParser(prog="python -m finetune.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (tokenizer + config.json)")
    parser.add_argument("--data", required=True, help="data file(s): a.json, b.jsonl or a mix 'a.json:0.7,b.jsonl:0.3'")
    parser.add_argument("--eval_data", default=None)
    parser.add_argument("--image_folder", default=None, help="folder relative image paths are resolved against first")
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--max_slice_nums", type=int, default=None)
    parser.add_argument("--scale_resolution", type=int, default=None)
    parser.add_argument("--no_slicing", action="store_true", help="every image is one view")
    parser.add_argument("--llm_type", default=None, choices=["llama3", "minicpm"])
    parser.add_argument("--seed", type=int, default=42, help="seed of the ratio sampling when mixing files")
    parser.add_argument("--show", default=None, metavar="ID", help="print this sample rendered, trained spans in ⟦ ⟧")
    parser.add_argument("--dump", default=None, metavar="FILE.pt", help="save every usable sample as training feeds it (pixel_values as uint8 strips; the model normalises them)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from finetune.dataset import DataError

    try:
        report = validate_dataset(
            args.model, args.data, args.eval_data, image_folder=args.image_folder, model_max_length=args.model_max_length,
            max_slice_nums=args.max_slice_nums, scale_resolution=args.scale_resolution,
            slicing=False if args.no_slicing else None, llm_type=args.llm_type, workers=args.workers, seed=args.seed,
        )  # fmt: skip
    except (ValueError, NotImplementedError) as error:  # e.g. llm_type mismatch: a usage error, not bad data
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.format())

    options = dict(model=args.model, data=args.data, image_folder=args.image_folder, model_max_length=args.model_max_length,
                   max_slice_nums=args.max_slice_nums, scale_resolution=args.scale_resolution,
                   slicing=False if args.no_slicing else None, llm_type=args.llm_type, seed=args.seed)  # fmt: skip
    train = report.splits[0]
    if (args.show or args.dump) and not train.file_errors:
        dataset = _build(options)
        if args.show:
            try:
                index = find_index(dataset, args.show)
                sample = dataset.prepare(index)
                print(f"\n== sample {sample.id} ({sample.status}, {len(sample.input_ids)} tokens, {len(sample.pixel_values)} views)")
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
