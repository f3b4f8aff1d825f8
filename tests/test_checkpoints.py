"""What a real run does after its first steps: save checkpoints from several processes, resume the latest complete
one (never executing code from its files), and keep one run's output directory from being taken by another."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModel

import finetune  # noqa: F401
from finetune.finetune import TrainingArguments
from finetune.trainer import MiniCPMVTrainer


# --- saving from several processes --------------------------------------------------------------------------


def test_a_process_that_does_not_save_writes_nothing(tiny_model, tmp_path, monkeypatch):
    """The library calls _save on every rank under DeepSpeed and DDP; only the saving process may write. A rank that
    arrived before rank 0 had created checkpoint-N used to fail copying the tokenizer files into it."""
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    trainer = MiniCPMVTrainer(model=AutoModel.from_pretrained(tiny_model), args=args, base_model_dir=str(tiny_model))
    monkeypatch.setattr(type(args), "should_save", property(lambda self: False))
    trainer._save(str(tmp_path / "out" / "checkpoint-1"))
    assert not (tmp_path / "out" / "checkpoint-1").exists()
