"""The demo's verdict: does the fine-tuned model see? The base model and the fine-tuned one answer the same held-out
questions; a few are shown beside the reference and the last line is the exact match of each.

    python -m finetune.demo_report --model MODEL_DIR --adapter ADAPTER_DIR --data eval.json [--show 6] [--out DIR]

Both models answer every sample of --data greedily through `finetune.evaluate.evaluate` (the prompt training used,
scores normalised by case and whitespace), so the numbers are the evaluator's. The last line is always exactly

    held-out exact match: base B -> fine-tuned F

with B and F fractions with three decimals: scripts and tests parse it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import transformers

from finetune.chat import load_model
from finetune.evaluate import evaluate

LAST_LINE = "held-out exact match: base {base:.3f} -> fine-tuned {tuned:.3f}"


def predictions(
    model_dir: str, adapter: str | None, data: str, out: Path, max_new_tokens: int
) -> tuple[dict[str, Any], list[dict]]:
    """Evaluate one model (the base when adapter is None) on data: (the averages, one row per sample)."""
    model, tokenizer = load_model(model_dir, adapter, "auto", "auto")
    summary = evaluate(model, tokenizer, data, out, max_new_tokens)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    return summary, rows


def question_of(prompt: str) -> str:
    """The last user text of an evaluation prompt, without the chat template's markup and image placeholders."""
    user = prompt.rsplit("<|start_header_id|>user<|end_header_id|>", 1)[-1].split("<|eot_id|>", 1)[0]
    for marker in ("(<image>./</image>)",):
        user = user.replace(marker, " ")
    if "</image>" in user:  # a placeholder already expanded: keep what follows the last one
        user = user.rsplit("</image>", 1)[-1]
    return " ".join(user.split())


def format_table(base_rows: list[dict], tuned_rows: list[dict], show: int) -> list[str]:
    """The first SHOW held-out samples: id, question, reference, base answer, fine-tuned answer (+ for exact)."""
    header = ("sample", "question", "reference", "base model", "fine-tuned")
    table = [header]
    for base, tuned in list(zip(base_rows, tuned_rows, strict=True))[:show]:
        mark = lambda row: f"{row['prediction'][:28]!r}" + (" +" if row["exact_match"] else "")  # noqa: E731
        table.append((base["id"], question_of(base["prompt"])[:40], base["reference"], mark(base), mark(tuned)))
    widths = [max(len(row[k]) for row in table) for k in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]


def report(
    model_dir: str, adapter: str, data: str, out_dir: Path, show: int = 6, max_new_tokens: int = 8
) -> tuple[float, float, list[str]]:
    """Evaluate base and fine-tuned model on data; returns (base exact match, fine-tuned exact match, the lines)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base_summary, base_rows = predictions(model_dir, None, data, out_dir / "predictions_base.jsonl", max_new_tokens)
    tuned_summary, tuned_rows = predictions(
        model_dir, adapter, data, out_dir / "predictions_finetuned.jsonl", max_new_tokens
    )
    lines = [f"[report] {len(base_rows)} held-out samples (pictures not seen in training); '+' marks an exact match"]
    lines += format_table(base_rows, tuned_rows, show)
    base, tuned = base_summary["exact_match"], tuned_summary["exact_match"]
    lines.append(LAST_LINE.format(base=base, tuned=tuned))
    return base, tuned, lines


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base model directory")
    parser.add_argument("--adapter", required=True, help="the LoRA adapter directory (training's output_dir)")
    parser.add_argument("--data", required=True, help="held-out data in the training format")
    parser.add_argument("--out", default=None, help="where both predictions files go (default: the adapter directory)")
    parser.add_argument("--show", type=int, default=6, help="held-out samples shown in the table (default 6)")
    parser.add_argument("--max_new_tokens", type=int, default=8)
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    try:
        *_, lines = report(
            args.model, args.adapter, args.data, Path(args.out or args.adapter), args.show, args.max_new_tokens
        )
    except ValueError as error:  # ChatError / CheckpointError: bad input, one line
        print(f"finetune.demo_report: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
