"""finetune.run_report: loss.png, run_summary.txt and TensorBoard logs from a short in-process training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base_args
from transformers import AutoTokenizer

import finetune  # noqa: F401
from finetune.dataset import DataSettings, SupervisedDataset
from finetune.model import MiniCPMVConfig
from finetune.run_report import PLOT_NAME, SUMMARY_NAME, cli, plot_losses, report_from_state, series
from finetune.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(8, 4)


@pytest.fixture(scope="module")
def run(tiny_model, demo, tmp_path_factory):
    """One epoch over 8 samples at batch 2 (4 steps; every sample seen exactly once), eval every 2 steps."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = base_args(tiny_model, demo / "train.json", out, "--eval_data_path", str(demo / "eval.json"), "--eval_strategy", "steps",
                     "--eval_steps", "2", "--num_train_epochs", "1", "--report_to", "tensorboard")  # fmt: skip
    return train(args), out


def parse_summary(path: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines())


@pytest.mark.slow
def test_training_writes_plot_and_summary(run):
    trainer, out = run
    plot, summary = out / PLOT_NAME, out / SUMMARY_NAME
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    fields = parse_summary(summary)
    assert fields["steps"] == "4" == str(trainer.state.global_step)
    assert fields["steps_this_session"] == "4"
    history = trainer.state.log_history
    assert float(fields["final_train_loss"]) == pytest.approx(series(history, "loss")[1][-1], rel=1e-5)
    assert float(fields["final_eval_loss"]) == pytest.approx(series(history, "eval_loss")[1][-1], rel=1e-5)
    assert fields["peak_gpu_memory"] == ("n/a (CPU)" if not torch.cuda.is_available() else fields["peak_gpu_memory"])
    assert float(fields["wall_time_s"]) > 0


def test_token_counts_are_exact(run, tiny_model, demo):
    """Every training sample is seen once: the counts equal the dataset's non-padding and label tokens."""
    trainer, out = run
    fields = parse_summary(out / SUMMARY_NAME)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = MiniCPMVConfig.from_pretrained(tiny_model)
    dataset = SupervisedDataset(DataSettings(str(demo / "train.json")), tokenizer, config)
    items = [dataset.prepare(i, load_pixels=False) for i in range(len(dataset))]
    inputs = sum(len(item.input_ids) for item in items)
    labels = sum(int((item.labels != -100).sum()) for item in items)
    assert int(fields["input_tokens_seen (non-padding, all ranks)"]) == inputs
    assert int(fields["label_tokens_seen (all ranks)"]) == labels
    assert float(fields["input_tokens_per_step"]) == pytest.approx(inputs / 4, abs=0.1)
    assert fields["micro_batches (rank 0, this session)"] == "4"  # evaluation batches are not counted


def test_tensorboard_logs_land_in_output_dir_runs(run):
    _, out = run
    events = list((out / "runs").glob("*/events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    assert parse_summary(out / SUMMARY_NAME)["tensorboard_logdir"] == str(events[0].parent)


def test_plot_from_synthetic_history_and_from_trainer_state(tmp_path, run, capsys):
    history = [
        {"step": s, "loss": 5.0 / s, "learning_rate": 1e-3 * (1 - s / 20), "epoch": s / 20} for s in range(1, 21)
    ]
    history += [{"step": 10, "eval_loss": 1.0}, {"step": 20, "eval_loss": 0.5}, {"step": 20, "train_loss": 1.2}]
    assert series(history, "eval_loss") == ([10, 20], [1.0, 0.5])
    path = plot_losses(history, tmp_path / "loss.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert plot_losses([], tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)  # nothing logged: still a PNG

    _, out = run
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "trainer_state.json").write_text(
        json.dumps({"global_step": 20, "max_steps": 20, "epoch": 1.0, "log_history": history})
    )
    plot, summary = report_from_state(finished)
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and parse_summary(summary)["steps"] == "20"
    assert cli([str(tmp_path / "nope")]) == 2 and "trainer_state.json: missing" in capsys.readouterr().err
