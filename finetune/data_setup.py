"""The data of a training run: the train and eval datasets, every sample checked as training will read it (shared
out over the ranks), bad samples a UsageError that lists them by id before training starts."""

from __future__ import annotations

import os

import torch

from finetune.arguments import DataArguments, TrainingArguments, UsageError, data_settings_from_arguments
from finetune.dataset import DataError, SupervisedDataset
from finetune.model.tokenization import detect_llm_type
from finetune.validation import (
    SplitReport,
    ValidationReport,
    check_samples,
    split_report,
    validate_built,
)


def build_datasets(data_args: DataArguments, training_args: TrainingArguments, tokenizer, config):
    detected = detect_llm_type(tokenizer)
    if training_args.llm_type and training_args.llm_type != detected:
        raise UsageError(f"--llm_type {training_args.llm_type} but the model's tokenizer is {detected}")
    settings = data_settings_from_arguments(data_args, training_args)
    datasets = []
    for split in ("train", "eval"):
        spec = settings.data_spec(split)
        if spec is None:
            datasets.append(None)
            continue
        try:
            dataset = SupervisedDataset(settings, tokenizer, config, split=split)
        except DataError as error:  # a whole file unreadable (malformed JSON names line and column)
            raise UsageError(str(error)) from error
        if data_args.validate_data:
            report = validate_across_ranks(split, spec, dataset, training_args)
            if training_args.process_index == 0:
                print(
                    "[data] "
                    + ValidationReport([report], settings.model_max_length).format().replace("\n", "\n[data] "),
                    flush=True,
                )
            if report.bad:
                listing = "\n".join(f"  {r.id}: {r.reason}" for r in report.bad)
                raise UsageError(
                    f"{len(report.bad)} bad {split} samples (fix them; `python -m finetune.check_data` lists all):\n{listing}"
                )
            dataset = dataset.subset(report.usable_indices)
        if len(dataset) == 0:
            raise UsageError(f"no usable {split} samples in {spec}")
        datasets.append(dataset)
    return datasets


def validate_across_ranks(
    name: str, spec: str, dataset: SupervisedDataset, training_args: TrainingArguments
) -> SplitReport:
    """Every sample, as training will read it. Each rank checks every world_size-th sample on its share of
    the node's CPU cores, and the results are gathered: every rank gets the whole report, so that a bad sample
    any rank found stops them all, and they keep the same samples. A rank whose check itself fails (not a bad
    sample: a worker killed, say) stops them all too, instead of leaving them waiting. Rank 0 logs."""
    world, rank = training_args.world_size, training_args.process_index
    sharded = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not sharded:
        return validate_built(name, spec, dataset, workers)
    try:
        share, failure = check_samples(dataset, range(rank, len(dataset), world), workers), None
    except Exception as error:  # e.g. a validation worker killed for memory: the other ranks must not wait for this one
        share, failure = [], f"{type(error).__name__}: {error}"
    shares = [None] * world
    torch.distributed.all_gather_object(shares, (share, failure))
    failures = [f"rank {index}: {failure}" for index, (_, failure) in enumerate(shares) if failure]
    if failures:
        raise UsageError(f"validating the {name} data failed on " + "; ".join(failures))
    results = sorted((result for share, _ in shares for result in share), key=lambda result: result.index)
    return split_report(name, spec, results, log=rank == 0, sources=dataset.source.share_lines())
