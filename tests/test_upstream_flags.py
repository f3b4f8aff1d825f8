"""Upstream's launch script (openbmb/MiniCPM-V finetune/finetune_lora.sh) and older advice: every flag it passes is
accepted, the ones transformers 5 removed mapped to today's meaning with a notice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune.arguments import REMOVED_FLAGS, UsageError, map_removed_flags

# Every flag upstream's finetune/finetune_lora.sh (openbmb/MiniCPM-V) passes, with values for this CPU machine.
UPSTREAM_FLAGS = [
    "--llm_type", "llama3", "--remove_unused_columns", "false", "--label_names", "labels", "--prediction_loss_only", "false",
    "--bf16", "false", "--bf16_full_eval", "false", "--fp16", "false", "--fp16_full_eval", "false",
    "--do_train", "--do_eval", "--tune_vision", "true", "--tune_llm", "false", "--use_lora", "true",
    "--lora_target_modules", r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "--model_max_length", "2048", "--max_slice_nums", "9", "--max_steps", "4", "--eval_steps", "2",
    "--logging_strategy", "steps", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
    "--gradient_accumulation_steps", "1", "--evaluation_strategy", "steps", "--save_strategy", "steps", "--save_steps", "1000",
    "--save_total_limit", "10", "--learning_rate", "1e-3", "--weight_decay", "0.1", "--adam_beta2", "0.95",
    "--warmup_ratio", "0.5", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--gradient_checkpointing", "true",
    "--deepspeed", "", "--report_to", "tensorboard",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(4, 2)


# --- upstream's flags -------------------------------------------------------------------------------------------------


def test_removed_flags_are_mapped_with_a_notice(monkeypatch, tmp_path):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    notices: list[str] = []
    mapped = map_removed_flags(
        ["--warmup_ratio", "0.05", "--evaluation_strategy=steps", "--logging_dir", str(tmp_path), "--seed", "1"],
        notices.append,
    )
    assert mapped == ["--warmup_steps", "0.05", "--eval_strategy", "steps", "--seed", "1"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path)
    assert len(notices) == len(REMOVED_FLAGS) and all(n.startswith("[args] --") and "\n" not in n for n in notices)
    with pytest.raises(UsageError, match="--warmup_ratio 3: must be at least 0 and below 1"):
        map_removed_flags(["--warmup_ratio", "3"], notices.append)


@pytest.mark.slow
def test_upstreams_full_flag_list_trains_with_the_mapped_meanings(tiny_model, demo, tmp_path, monkeypatch, capsys):
    from finetune.train import train

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    tensorboard = tmp_path / "tb"
    argv = ["--model_name_or_path", str(tiny_model), "--data_path", str(demo / "train.json"), "--eval_data_path",
            str(demo / "eval.json"), "--output_dir", str(tmp_path / "out"), "--logging_dir", str(tensorboard),
            *UPSTREAM_FLAGS, "--dataloader_num_workers", "0", "--disable_tqdm", "true"]  # fmt: skip
    trainer = train(argv)
    err = capsys.readouterr().err
    for old in REMOVED_FLAGS:
        assert f"[args] {old} " in err
    assert trainer.args.warmup_steps == 0.5 and trainer.args.get_warmup_steps(4) == 2
    rates = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert rates[0] < rates[1], "the learning rate rises over the warmup half of the run"
    assert str(getattr(trainer.args.eval_strategy, "value", trainer.args.eval_strategy)) == "steps"
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e][:2] == [2, 4]
    assert list(tensorboard.rglob("events.out.tfevents.*")), "TensorBoard writes into --logging_dir"
    assert not (tmp_path / "out" / "runs").exists()
