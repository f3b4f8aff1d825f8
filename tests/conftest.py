"""Shared fixtures: the golden tiny checkpoint (copied from ../shared/golden/tiny) and its cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden_tiny"
REFERENCE = TESTS / "reference"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the published layout, built by the project (read-only for tests)."""
    from finetune.model.builders import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def demo_factory(tmp_path_factory):
    """demo_factory(num_train, num_eval) -> a folder with the bundled demo data of that size (built once)."""
    from finetune.demo_data import write_demo_dataset

    built: dict[tuple[int, int], Path] = {}

    def make(num_train: int = 24, num_eval: int = 6) -> Path:
        if (num_train, num_eval) not in built:
            out = tmp_path_factory.mktemp(f"demo_{num_train}_{num_eval}")
            write_demo_dataset(out, num_train=num_train, num_eval=num_eval)
            built[num_train, num_eval] = out
        return built[num_train, num_eval]

    return make


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN / "checkpoint"


@pytest.fixture(scope="session")
def golden_cases() -> list[dict]:
    return torch.load(GOLDEN / "cases.pt", weights_only=False)["cases"]


@pytest.fixture(scope="session")
def golden_images() -> Path:
    return GOLDEN / "images"
