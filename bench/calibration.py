"""The memory planner's calibration data from benchmark runs: a Trainer row's report as the planner's Setup, and
the calibration file (finetune/plan_calibration.json) refreshed with a run's measured peaks.

The planner (finetune.plan) predicts peak allocated GiB per GPU for a Setup; `python -m finetune.plan
--validate` compares its predictions with the measured records of that file. A record is one measured
configuration; a run of `python -m bench SUITE --calibration FILE` replaces the records of the rows it measured
(by row name) and appends the others.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.plan import LOSS_CHUNK, Measurement, Setup


def setup_of_report(report: dict, version: str = "2.5") -> tuple[Setup, str]:
    """The planner's Setup of a bench.trainer_bench report (finetune.py's real Trainer), and a note saying which
    micro-batch the peak belongs to. The report's largest micro-batch gives the tokens and image views a step
    (packed samples are one row: micro_batch 1); reports without `vocab_sharded_loss` gathered lm_head."""
    deepspeed = str(report.get("deepspeed") or "")
    stage = 3 if "zero3" in deepspeed else 2 if "zero2" in deepspeed else 0
    tokens, views = int(report["largest_micro_batch_tokens"]), float(report["largest_micro_batch_views"])
    setup = Setup(
        gpus=report["world_size"],
        zero_stage=stage,
        offload="offload" in deepspeed,
        gradient_checkpointing=bool(report.get("gradient_checkpointing", True)),
        micro_batch=1,
        tokens_per_sample=tokens,
        views_per_sample=views,
        q_lora=bool(report.get("q_lora", False)),
        tune_vision=bool(report.get("tune_vision", True)),
        loss_chunk=int(report.get("loss_chunk_size", LOSS_CHUNK)),
        optim_8bit="8bit" in str(report.get("optim", "")),
        lean=stage == 3 and "lean" in deepspeed,
        vocab_shards=bool(report.get("vocab_sharded_loss", False)),
        version=version,
    )
    return setup, f"largest micro-batch: {tokens} tokens, {views:.0f} views"


def measurement_of_report(
    name: str, report: dict, device: str, date: str, versions: str, source: str, version: str = "2.5"
) -> Measurement | None:
    """A calibration record of one Trainer row (None without a measured peak: a run on the CPU)."""
    peaks = report.get("peak_allocated_gib_per_rank")
    if not peaks:
        return None
    setup, note = setup_of_report(report, version)
    return Measurement(name, setup, max(peaks), device, date, versions, source, note)


def refresh_calibration(path: Path, measurements: list[Measurement]) -> None:
    """Write the measurements into the calibration file at `path` (created if missing): a record of the same
    name is replaced where it stands, new names are appended."""
    data = json.loads(path.read_text()) if path.is_file() else {"records": []}
    fresh = {m.name: m.record() for m in measurements}
    records = [fresh.pop(record["name"], record) for record in data["records"]]
    data["records"] = records + list(fresh.values())
    path.write_text(json.dumps(data, indent=1) + "\n")
