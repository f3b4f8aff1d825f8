"""Every sample of a data set checked exactly as training reads it, on a pool of worker processes.

Each sample goes through the code training uses (`finetune.dataset`): record validation, image decoding (every
image, also those of turns truncation would drop), slicing plans, tokenization with labels, truncation; pixels
are not computed. The result is a report per data spec (`SplitReport`: one `SampleResult` per sample, file
errors, duplicate ids) and for the whole run (`ValidationReport`). Training (`finetune.data_setup`) and the
`python -m finetune.check_data` command both validate through this module; it imports nothing of the command.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from finetune.dataset import (
    DataError,
    DataSettings,
    SampleTooLong,
    Split,
    SupervisedDataset,
    duplicate_ids,
    prepare_sample,
)

logger = logging.getLogger("finetune.dataset")


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


def build_dataset(model: str, settings: DataSettings, split: Split = "train") -> SupervisedDataset:
    """The dataset of one split, with the tokenizer and config of the model directory `model` (built again in
    each worker process where fork is unavailable: tokenizers and datasets do not pickle cheaply)."""
    from transformers import AutoTokenizer

    import finetune  # noqa: F401  (registers the Auto classes)
    from finetune.model import MiniCPMVConfig

    tokenizer = AutoTokenizer.from_pretrained(model, clean_up_tokenization_spaces=False)
    config = MiniCPMVConfig.from_pretrained(model)
    return SupervisedDataset(settings, tokenizer, config, split=split)


def _init_worker(rebuild: tuple[str, DataSettings, Split] | None) -> None:
    logging.getLogger("finetune.dataset").setLevel(logging.ERROR)  # the parent reports; workers stay quiet
    torch.set_num_threads(1)
    if rebuild is not None:  # spawn; with fork the dataset was inherited
        _WORKER["dataset"] = build_dataset(*rebuild)


def check_sample(dataset: SupervisedDataset, index: int) -> SampleResult:
    """Validate one sample: the training path without pixel math (every image is still fully decoded)."""
    record = None
    try:
        record = dataset.record(index)
        sample = prepare_sample(
            record, dataset.encoder, dataset.settings.model_max_length, load_pixels=False, decode_all=True
        )
    except SampleTooLong as error:
        return SampleResult(
            index,
            error.sample,
            "skipped",
            error.length,
            0,
            len(record.images) if record else 0,
            reason=str(error),
            has_id=bool(record and record.has_id),
        )
    except DataError as error:
        where = error.sample or dataset.source.location(dataset.mixed_index(index))
        return SampleResult(index, where, "bad", reason=error.reason if error.sample else str(error))
    return SampleResult(
        index,
        sample.id,
        sample.status,
        sample.full_length,
        len(sample.input_ids),
        sample.num_images,
        tuple(sample.views_per_image),
        has_id=record.has_id,
    )


def _check_chunk(indices: list[int]) -> list[SampleResult]:
    dataset = _WORKER["dataset"]
    return [check_sample(dataset, i) for i in indices]


# --- driver ------------------------------------------------------------------------------------------------


def validate_split(model: str, settings: DataSettings, split: Split, workers: int) -> SplitReport:
    """Build one split's dataset from the model directory and the settings, and validate every sample of it
    (a data file that cannot be read is the report's file error)."""
    spec = settings.data_spec(split)
    try:
        dataset = build_dataset(model, settings, split)
    except DataError as error:
        report = SplitReport(split, spec)
        report.file_errors.append(str(error))
        return report
    return validate_built(split, spec, dataset, workers, model)


def validate_built(
    name: str, spec: str, dataset: SupervisedDataset, workers: int, model: str | None = None
) -> SplitReport:
    """Validate every sample of a built SupervisedDataset, on `workers` processes (`model`: see check_samples)."""
    return split_report(
        name, spec, check_samples(dataset, range(len(dataset)), workers, model), sources=dataset.source.share_lines()
    )


def check_samples(
    dataset: SupervisedDataset, indices: Sequence[int], workers: int, model: str | None = None
) -> list[SampleResult]:
    """Validate the samples at `indices` of a built SupervisedDataset, on `workers` processes (finetune.py
    gives each rank its share of the indices).

    Workers are forked (Linux) and inherit the dataset; where fork is unavailable they build it again from the
    model directory `model` and the dataset's settings and split, and without `model` the check runs in this
    process.
    """
    import multiprocessing

    indices = list(indices)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if workers <= 1 or len(indices) < 64 or (method == "spawn" and model is None):
        return [check_sample(dataset, i) for i in indices]
    chunk = max(16, min(1024, len(indices) // (workers * 8) or 1))
    chunks = [indices[s : s + chunk] for s in range(0, len(indices), chunk)]
    # fork: workers inherit the parent's dataset, no re-import (spawn costs seconds per worker). The parent
    # has run no torch parallel region, and tokenizers' own thread pool is disabled below.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["dataset"] = dataset if method == "fork" else None
    initargs = (None if method == "fork" else (model, dataset.settings, dataset.split),)
    try:
        with ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker, initargs=initargs
        ) as pool:
            return [r for part in pool.map(_check_chunk, chunks) for r in part]
    finally:
        _WORKER.pop("dataset", None)


def split_report(
    name: str, spec: str, results: list[SampleResult], log: bool = True, sources: Sequence[str] = ()
) -> SplitReport:
    """The report of one data spec from every sample's result, in dataset order; with `log`, each truncated or
    skipped sample and duplicate ids are logged here (workers are quiet). Bad samples are not: the report lists
    them, and finetune.py's error and check_data's exit do again. `sources`: MixedSource.share_lines(), printed
    for a mix of several files."""
    report = SplitReport(name, spec, results=results, sources=list(sources))
    for r in results if log else ():
        if r.status == "truncated":
            logger.info("sample %s: truncated from %d to %d tokens", r.id, r.length, r.kept_length)
        elif r.status == "skipped":
            logger.warning("%s", r.reason)
    report.duplicate_ids = duplicate_ids(Counter(r.id for r in results if r.has_id), warn=log)
    return report


def validate_dataset(model: str, settings: DataSettings, workers: int | None = None) -> ValidationReport:
    """Validate the train (and eval) data exactly as training will read it, with the tokenizer and config of
    the model directory `model`, on `workers` processes (default: all CPU cores); see ValidationReport."""
    workers = workers or os.cpu_count() or 1
    splits = [validate_split(model, settings, "train", workers)]
    if settings.eval_data_path:
        splits.append(validate_split(model, settings, "eval", workers))
    return ValidationReport(splits, settings.model_max_length)


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
