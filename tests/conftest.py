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
def golden_dir() -> Path:
    return GOLDEN / "checkpoint"


@pytest.fixture(scope="session")
def golden_cases() -> list[dict]:
    return torch.load(GOLDEN / "cases.pt", weights_only=False)["cases"]


@pytest.fixture(scope="session")
def golden_images() -> Path:
    return GOLDEN / "images"
