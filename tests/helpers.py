"""finetune.py command lines for the tiny model, a free port for process groups and a golden case as model input:
shared by the test files.

(pytest puts tests/ on sys.path, as it does for conftest.py: test files import this as `from helpers import ...`.)
Later flags override earlier ones (argparse keeps the last value), so a test passes the value it needs as an extra.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch


def path_flags(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The three paths every run names; with nothing else, finetune.py's own defaults apply."""
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out), *extra]


def training_flags(*extra: str) -> list[str]:
    """Quick, quiet, reproducible CPU training: batch 2, a learning rate the tiny model visibly learns at, seed 0,
    a loss logged every step, nothing saved but the final adapter, no reporting, no data-loader workers."""
    return [
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none",
        "--save_strategy", "no", "--learning_rate", "2e-3", "--warmup_steps", "0", "--seed", "0",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The paths and the standard training flags, then the test's own."""
    return path_flags(model, data, out, *training_flags(*extra))


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous (other runs may hold the default)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def case_data(case: dict) -> dict:
    """A golden case as the published `data` argument: one row, position ids 0.., its images (if any)."""
    return {
        "input_ids": case["input_ids"][None],
        "position_ids": torch.arange(len(case["input_ids"]))[None],
        "pixel_values": [case.get("pixel_values", [])],
        "tgt_sizes": [case["tgt_sizes"]],
        "image_bound": [case["image_bound"]],
    }
