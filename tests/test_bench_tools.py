"""The benchmark's own tools on CPU: the text set's lengths and the results table (bench/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

import finetune  # noqa: F401
from finetune.dataset import SupervisedDataset
from finetune.model.image_processing import SliceSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_train import make_text_dataset  # noqa: E402
from summarize import table  # noqa: E402


def test_text_rows_are_as_long_as_asked_and_fit(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    settings = SliceSettings(112, 14, 9, 16)
    path = make_text_dataset(str(tmp_path), 3, tokenizer, settings, length=300)
    dataset = SupervisedDataset(path, tokenizer, settings=settings, model_max_length=300)
    lengths = [len(dataset.prepare(i, load_pixels=False).input_ids) for i in range(len(dataset))]
    assert len(lengths) == 3 and all(276 <= n <= 300 for n in lengths), lengths
    assert all("image" not in sample for sample in json.loads(Path(path).read_text()))


def test_summary_table_has_a_row_per_report():
    report = {"name": "t2_z3", "world_size": 2, "deepspeed": "finetune/ds_config_zero3_offload.json", "optim": "adamw_bnb_8bit",
              "loss_chunk_size": 512, "tokens_per_s": 1555.4, "samples_per_s": 0.76, "mfu": 0.025,
              "peak_allocated_gib_per_rank": [15.0, 15.88], "peak_reserved_gib_per_rank": [20.8, 20.7],
              "data_wait_fraction": 0.004, "optimizer_fraction": 0.008}  # fmt: skip
    fast = dict(report, name="fast", deepspeed=None, gradient_checkpointing=False, liger_rms_norm=True, loss_kernel="liger", compiled_layers=32)
    lines = table([report, dict(report, name="other", deepspeed=None), fast]).splitlines()
    assert len(lines) == 5
    assert lines[2] == "| t2_z3 | 2 | ZeRO-3 offload | 8-bit AdamW | 512 | GC | 1555 | 0.76 | 2.5% | 15.88 | 20.80 | 0.4% | 0.8% |"
    assert "| other | 2 | - |" in lines[3]
    assert "| fast | 2 | - | 8-bit AdamW | 512 | no GC, liger + fused CE, compiled layers | 1555 |" in lines[4]
