"""A small hyper-parameter search for LoRA fine-tuning (optuna through Trainer.hyperparameter_search).

    python -m finetune.tune --model M --data train.json [--eval_data eval.json] --trials 8 \\
        [--time-budget-s 3600] [--subset 512] [--max-steps 100] [--q_lora] [-- more finetune.py flags]

Searched: learning rate (log-uniform), LoRA rank and alpha, warmup fraction. Each trial builds the model with the
same functions finetune.py uses (load_model_and_tokenizer + configure_trainable) inside `model_init(trial)`,
because the LoRA rank changes the model's structure, trains --max-steps steps on a random --subset of the data,
and is scored by its eval loss (on --eval_data, else on a held-out 20% of the subset). optuna's timeout stops
starting new trials after --time-budget-s. The best trial is printed as a ready launcher line:

    LR=2.10e-04 MODEL=M DATA=train.json EVAL_DATA=eval.json bash finetune/finetune_lora.sh --lora_r 16 --lora_alpha 32 \\
        --warmup_steps 0.050
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import tempfile
from dataclasses import dataclass

import transformers
from transformers import HfArgumentParser

from finetune.arguments import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainingArguments,
    UsageError,
    check_arguments,
)
from finetune.cli import FlagParser
from finetune.data_setup import build_datasets
from finetune.dataset import DataCollator
from finetune.model.tokenization import SpecialTokens
from finetune.model_setup import (
    configure_trainable,
    load_model_and_tokenizer,
    set_trainable_precision,
)
from finetune.trainer import MiniCPMVTrainer

RANKS = (8, 16, 32, 64)
ALPHA_RATIOS = (1, 2)  # alpha = ratio x rank


def hp_space(trial) -> dict:
    rank = trial.suggest_categorical("lora_r", list(RANKS))
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True),
        "lora_r": rank,
        "lora_alpha_ratio": trial.suggest_categorical("lora_alpha_ratio", list(ALPHA_RATIOS)),
        "warmup_steps": trial.suggest_float("warmup_steps", 0.0, 0.1),
    }


@dataclass
class SearchResult:
    trials: int
    best_eval_loss: float
    params: dict
    line: str


def trainer_hp_space(trial) -> dict:
    """hp_space as the Trainer sees it: every parameter is still suggested (model_init reads the LoRA ones from
    trial.params), but only TrainingArguments' fields are returned for it to set, so it does not warn about
    `lora_r` and `lora_alpha_ratio` having no field there."""
    return {key: value for key, value in hp_space(trial).items() if hasattr(TrainingArguments, key)}


def launcher_line(
    params: dict, model: str | None = None, data: str | None = None, eval_data: str | None = None, q_lora: bool = False
) -> str:
    """The best trial as a `finetune_lora.sh` line, with the model and data it was searched on."""
    rank = int(params["lora_r"])
    alpha = rank * int(params["lora_alpha_ratio"])
    env = [f"LR={params['learning_rate']:.2e}"]
    env += [
        f"{name}={shlex.quote(value)}"
        for name, value in (("MODEL", model), ("DATA", data), ("EVAL_DATA", eval_data))
        if value
    ]
    flags = ["--lora_r", str(rank), "--lora_alpha", str(alpha), "--warmup_steps", f"{params['warmup_steps']:.3f}"]
    if q_lora:
        flags += ["--q_lora", "true"]
    return " ".join(env) + " bash finetune/finetune_lora.sh " + shlex.join(flags)


def _subset(dataset, size: int | None, seed: int):
    if size is None or size >= len(dataset):
        return dataset
    return dataset.subset(sorted(random.Random(seed).sample(range(len(dataset)), size)))


def search(args: argparse.Namespace, extra: list[str]) -> SearchResult:
    import optuna

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="tune-")
    argv = [
        "--model_name_or_path", args.model, "--data_path", args.data, "--output_dir", output_dir,
        "--max_steps", str(args.max_steps), "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
        "--eval_strategy", "no", "--disable_tqdm", "true", "--seed", str(args.seed),
    ]  # fmt: skip
    if args.eval_data:
        argv += ["--eval_data_path", args.eval_data]
    if args.q_lora:
        argv += ["--q_lora", "true"]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    try:
        model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(args=argv + extra)
    except ValueError as error:
        raise UsageError(str(error)) from error
    check_arguments(model_args, data_args, training_args, lora_args)
    transformers.set_seed(training_args.seed)

    # Data once (tokenizer and config only: no model weights needed).
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    train, evaluation = build_datasets(data_args, training_args, tokenizer, config)
    train = _subset(train, args.subset, args.seed)
    if evaluation is None:  # hold out 20% of the subset
        order = list(range(len(train)))
        random.Random(args.seed + 1).shuffle(order)
        held = max(1, len(order) // 5)
        if len(order) - held < 1:
            raise UsageError("--subset too small to hold out eval samples; give --eval_data")
        evaluation = train.subset(sorted(order[:held]))
        train = train.subset(sorted(order[held:]))

    def model_init(trial=None):
        params = dict(trial.params) if trial is not None and hasattr(trial, "params") else {}
        trial_lora = LoraArguments(**{**vars(lora_args)})
        if "lora_r" in params:
            trial_lora.lora_r = int(params["lora_r"])
            trial_lora.lora_alpha = int(params["lora_r"]) * int(params.get("lora_alpha_ratio", 1))
        transformers.set_seed(training_args.seed)
        model, _ = load_model_and_tokenizer(model_args, training_args, trial_lora)
        model = configure_trainable(model, training_args, trial_lora)
        set_trainable_precision(model, training_args)  # as finetune.main does
        return model

    trainer = MiniCPMVTrainer(
        model_init=model_init,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad, packing=data_args.packing),
        base_model_dir=model_args.model_name_or_path,
    )
    storage = optuna.storages.InMemoryStorage()
    best = trainer.hyperparameter_search(
        hp_space=trainer_hp_space,
        backend="optuna",
        direction="minimize",
        n_trials=args.trials,
        timeout=args.time_budget_s,
        compute_objective=lambda metrics: metrics["eval_loss"],
        study_name="finetune-tune",
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=args.seed),
    )
    study = optuna.load_study(study_name="finetune-tune", storage=storage)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in finished:
        print(f"[trial {t.number}] eval_loss {t.value:.4f} {t.params}", flush=True)
    if not math.isfinite(best.objective):
        raise UsageError(f"best eval loss is not finite ({best.objective}); lower the learning-rate range")
    line = launcher_line(best.hyperparameters, args.model, args.data, args.eval_data, args.q_lora)
    return SearchResult(len(finished), float(best.objective), dict(best.hyperparameters), line)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="python -m finetune.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    parser.add_argument("--data", required=True, help="training data (finetune.py's --data_path)")
    parser.add_argument("--eval_data", "--eval-data", default=None)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--time-budget-s", "--time_budget_s", type=float, default=None, help="optuna timeout")
    parser.add_argument("--subset", type=int, default=256, help="random training samples per trial (0: all)")
    parser.add_argument("--max-steps", "--max_steps", type=int, default=50, help="optimizer steps per trial")
    parser.add_argument("--q_lora", "--q-lora", action="store_true")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--seed", type=int, default=42)
    return parser


def main(argv: list[str] | None = None) -> SearchResult:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    if args.subset == 0:
        args.subset = None
    result = search(args, extra)
    print(
        f"[tune] {result.trials} trials; best eval loss {result.best_eval_loss:.4f}; params {result.params}", flush=True
    )
    print(result.line, flush=True)
    return result


def cli() -> None:
    try:
        main()
    except UsageError as error:
        print(f"tune: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
