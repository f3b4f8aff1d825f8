"""One training run in this process: command line -> checks -> model + tokenizer -> data -> LoRA -> Trainer ->
saved adapter. finetune/finetune.py (what the launchers run) calls it; tests and benchmarks call it in-process."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

import finetune  # noqa: F401  (registers the native model with the Auto classes)
from finetune.arguments import check_arguments, parse_arguments
from finetune.base_identity import identity_for_training, local_model_dir
from finetune.data_setup import build_datasets
from finetune.dataset import DataCollator
from finetune.distributed import prepare_cpu_distributed
from finetune.model.tokenization import SpecialTokens
from finetune.model_setup import (
    apply_fast_paths,
    configure_trainable,
    count_parameters,
    load_model_and_tokenizer,
    set_trainable_precision,
)
from finetune.run_directory import prepare_run_directory
from finetune.run_report import (
    PLOT_NAME,
    SUMMARY_NAME,
    RunReportCallback,
    write_run_report,
)
from finetune.trainer import MiniCPMVTrainer


def train(argv: list[str]) -> MiniCPMVTrainer:
    """Train as `finetune.py ARGV` does and return the Trainer. A command line, data set or output directory that
    cannot work raises UsageError (one line) before the model is loaded where it can be known then."""
    argv = prepare_cpu_distributed(argv)
    model_args, data_args, training_args, lora_args = parse_arguments(argv)
    check_arguments(model_args, data_args, training_args, lora_args)
    resume = prepare_run_directory(training_args)
    # Before anything random: LoRA's initial weights must not depend on what ran earlier in the process.
    transformers.set_seed(training_args.seed)

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(training_args.cudnn_attention)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args, lora_args)
    train_dataset, eval_dataset = build_datasets(data_args, training_args, tokenizer, model.config)
    model = configure_trainable(model, training_args, lora_args)
    set_trainable_precision(model, training_args)
    fast_paths = apply_fast_paths(model, training_args)
    trainable, total = count_parameters(model)
    if training_args.process_index == 0:
        print(f"[model] {type(model).__name__}: {trainable:,} trainable of {total:,} parameters", flush=True)
        if fast_paths:
            print(f"[model] fast paths: {'; '.join(fast_paths)}", flush=True)

    collator = DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad, packing=data_args.packing)
    trainer = MiniCPMVTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        # A hub id's files are in the local cache once the model has loaded: the saves copy and fingerprint those.
        base_model_dir=str(local_model_dir(model_args.model_name_or_path) or model_args.model_name_or_path),
        base_identity=identity_for_training(model_args.model_name_or_path),
        callbacks=[RunReportCallback()],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if os.environ.get("FINETUNE_RUN_REPORT"):
        write_run_report(trainer, Path(os.environ["FINETUNE_RUN_REPORT"]))
    if training_args.process_index == 0:
        print(f"[done] adapter and tokenizer saved to {Path(training_args.output_dir).resolve()}", flush=True)
        print(f"[done] loss plot: {Path(training_args.output_dir).resolve() / PLOT_NAME}; summary: "
              f"{Path(training_args.output_dir).resolve() / SUMMARY_NAME}", flush=True)  # fmt: skip
    return trainer
