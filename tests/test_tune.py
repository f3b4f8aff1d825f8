"""finetune.tune: optuna search through Trainer.hyperparameter_search with the tiny model on CPU."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from transformers import HfArgumentParser  # noqa: E402

from finetune.arguments import DataArguments, LoraArguments, ModelArguments, TrainingArguments  # noqa: E402
from finetune.tune import hp_space, launcher_line, main  # noqa: E402


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(16, 4)


def parse_launcher_line(line: str):
    """The printed line -> finetune.py's dataclasses (LR=... is the launcher's --learning_rate)."""
    words = shlex.split(line)
    at = words.index("bash")
    env = dict(word.split("=", 1) for word in words[:at])
    assert words[at + 1] == "finetune/finetune_lora.sh"
    flags = ["--learning_rate", env["LR"], *words[at + 2 :]]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    return parser.parse_args_into_dataclasses(
        args=["--data_path", "x.json", "--output_dir", "/tmp/t", "--report_to", "none", *flags]
    )


@pytest.mark.slow
def test_search_runs_the_trials_and_prints_a_launcher_line(tiny_model, demo, tmp_path, capsys, monkeypatch):
    import transformers.trainer

    warned = []
    original_warning = transformers.trainer.logger.warning
    monkeypatch.setattr(
        transformers.trainer.logger,
        "warning",
        lambda msg, *a, **k: (warned.append(str(msg)), original_warning(msg, *a, **k)),
    )
    result = main(["--model", str(tiny_model), "--data", str(demo / "train.json"), "--eval_data", str(demo / "eval.json"),
                   "--trials", "3", "--max-steps", "2", "--subset", "8", "--output-dir", str(tmp_path / "out"),
                   "--", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--tune_vision", "false"])  # fmt: skip
    assert result.trials == 3
    assert math.isfinite(result.best_eval_loss)
    out = capsys.readouterr().out
    assert out.count("[trial ") == 3
    line = out.strip().splitlines()[-1]
    assert line == result.line
    env = dict(word.split("=", 1) for word in shlex.split(line)[: shlex.split(line).index("bash")])
    assert env == {
        "LR": env["LR"],
        "MODEL": str(tiny_model),
        "DATA": str(demo / "train.json"),
        "EVAL_DATA": str(demo / "eval.json"),
    }
    assert not [w for w in warned if "no corresponding field" in w], warned
    _, _, training_args, lora_args = parse_launcher_line(line)
    assert math.isclose(training_args.learning_rate, result.params["learning_rate"], rel_tol=1e-2)
    assert lora_args.lora_r == result.params["lora_r"]
    assert lora_args.lora_alpha == result.params["lora_r"] * result.params["lora_alpha_ratio"]
    assert 0 <= training_args.warmup_steps <= 0.1


@pytest.mark.slow
def test_rank_from_the_trial_reaches_the_model(tiny_model, demo, tmp_path):
    """Without --eval_data a held-out part of the subset is the eval set; the trial's rank shapes lora_A."""
    import optuna

    from finetune import tune

    seen = []
    original = tune.configure_trainable

    def spy(model, training_args, lora_args):
        seen.append(lora_args.lora_r)
        return original(model, training_args, lora_args)

    tune.configure_trainable = spy
    try:
        result = main(["--model", str(tiny_model), "--data", str(demo / "train.json"), "--trials", "2", "--max-steps", "1",
                       "--subset", "10", "--output-dir", str(tmp_path / "o"), "--seed", "3",
                       "--", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--tune_vision", "false"])  # fmt: skip
    finally:
        tune.configure_trainable = original
    assert result.trials == 2
    # first call: Trainer.__init__'s model_init() without a trial (defaults); then one per trial
    assert seen[0] == 64 and len(seen) == 3 and set(seen[1:]) <= {8, 16, 32, 64}
    trial = optuna.trial.FixedTrial({"lora_r": 16, "learning_rate": 1e-4, "lora_alpha_ratio": 2, "warmup_steps": 0.05})
    assert (
        launcher_line(hp_space(trial))
        == "LR=1.00e-04 bash finetune/finetune_lora.sh --lora_r 16 --lora_alpha 32 --warmup_steps 0.050"
    )
    assert launcher_line(hp_space(trial), "my model", "train.json", q_lora=True) == (
        "LR=1.00e-04 MODEL='my model' DATA=train.json bash finetune/finetune_lora.sh --lora_r 16 --lora_alpha 32 --warmup_steps 0.050 --q_lora true"
    )
