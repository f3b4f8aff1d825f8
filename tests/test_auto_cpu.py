"""AUTO=1 on a CPU machine: the planner's `--deepspeed ''` comes after the launcher's own --deepspeed; the last one
wins, and an empty one means no DeepSpeed, on the CPU as on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LAUNCHER, PYTHON_BIN

from finetune.distributed import deepspeed_config


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(4, 2)


def test_the_last_deepspeed_flag_wins_and_an_empty_one_means_none():
    assert deepspeed_config(["--deepspeed", "a.json", "--deepspeed", ""]) == ""
    assert deepspeed_config(["--deepspeed", "", "--deepspeed=b.json"]) == "b.json"
    assert deepspeed_config(["--max_steps", "1"]) == ""


@pytest.mark.slow
def test_auto_launcher_trains_on_a_cpu_machine(tiny_model, demo, tmp_path):
    """AUTO=1 GPU_MEM=24: the planner's `--deepspeed ''` after the launcher's own config means no DeepSpeed."""
    report = tmp_path / "report"
    env = dict(os.environ, PATH=f"{PYTHON_BIN}:{os.environ['PATH']}", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               FINETUNE_RUN_REPORT=str(report), AUTO="1", GPU_MEM="24", GPUS_PER_NODE="1", MODEL=str(tiny_model),
               DATA=str(demo / "train.json"), OUTPUT_DIR=str(tmp_path / "out"), REPORT_TO="none", MAX_STEPS="1")  # fmt: skip
    env.pop("CUDA_VISIBLE_DEVICES", None)
    flags = [
        "--gradient_accumulation_steps",
        "1",
        "--per_device_train_batch_size",
        "1",
        "--optim",
        "adamw_torch",
        "--dataloader_num_workers",
        "0",
    ]
    result = subprocess.run(["sh", str(LAUNCHER), *flags], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "--deepspeed ''" in result.stdout
    (rank,) = [json.loads(p.read_text()) for p in report.glob("rank*.json")]
    assert rank["wrapper"] != "DeepSpeedEngine" and rank["global_step"] == 1
