"""Print the Trainer-path benchmark as a markdown table: one row per trainer_bench.py report.

    python3 bench/summarize.py bench/results/h200x2_2026-11-29_suite/part2/results.jsonl [more.jsonl ...]

Reads the JSON lines device_suite.sh collects (trainer_bench.py's report plus its run name). Columns: GPUs,
DeepSpeed stage, optimizer, loss chunk, checkpointing and fast kernels, tokens/s (all GPUs), samples/s, MFU (bench_train.flops_of_batch over
step time and the datasheet peak), peak allocated / reserved GiB (worst rank), and the fractions of step time
spent waiting for data and in the optimizer step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def kernels(report: dict) -> str:
    """Checkpointing and the fast paths the model had (older reports lack the kernel fields)."""
    parts = ["GC" if report.get("gradient_checkpointing", True) else "no GC"]
    if report.get("liger_rms_norm"):
        parts.append("liger" + (" + fused CE" if report.get("loss_kernel") == "liger" else ""))
    if report.get("compiled_layers"):
        parts.append("compiled layers" + (" (both towers)" if report.get("compiled_vision_layers") else ""))
    if report.get("llm_attention") == "varlen":
        parts.append("varlen attention" + (" (both towers)" if report.get("vision_attention") == "varlen" else ""))
    return ", ".join(parts)


def describe(report: dict) -> list[str]:
    ds = str(report.get("deepspeed") or "")
    stage = ("ZeRO-3" if "zero3" in ds else "ZeRO-2" if "zero2" in ds else "-") + (" offload" if "offload" in ds else "")
    return [
        report.get("name", "?"),
        str(report["world_size"]),
        stage,
        report.get("optim", "?").replace("adamw_bnb_8bit", "8-bit AdamW").replace("adamw_torch_fused", "AdamW"),
        str(report.get("loss_chunk_size", "?")) + (" on vocabulary shards" if report.get("vocab_sharded_loss") else ""),
        kernels(report),
        f"{report['tokens_per_s']:.0f}",
        f"{report['samples_per_s']:.2f}",
        f"{100 * report['mfu']:.1f}%",
        f"{max(report['peak_allocated_gib_per_rank']):.2f}",
        f"{max(report['peak_reserved_gib_per_rank']):.2f}",
        f"{100 * report['data_wait_fraction']:.1f}%" if "data_wait_fraction" in report else "-",
        f"{100 * report['optimizer_fraction']:.1f}%" if "optimizer_fraction" in report else "-",
    ]


def table(reports: list[dict]) -> str:
    head = ["run", "GPUs", "DeepSpeed", "optimizer", "loss chunk", "checkpointing, kernels", "tokens/s", "samples/s", "MFU",
            "peak alloc GiB", "peak reserved GiB", "data wait", "optimizer"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(describe(r)) + " |" for r in reports]
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    reports = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
