"""Generate answers for a held-out set in the training format and score them against the references.

    python -m finetune.evaluate --model openbmb/MiniCPM-Llama3-V-2_5 --adapter output/output__lora \\
        --data eval.json [--out predictions.jsonl] [--max_new_tokens 256] [--limit N] [--device auto] [--dtype auto]

For every sample (a JSON list or JSON Lines file, exactly as for training; images resolved relative to the data
file or --image_folder): all turns before the LAST assistant turn are the prompt, that assistant turn's content
is the reference. The record is parsed by `finetune.dataset.parse_record` and the prompt built by
`finetune.chat.build_prompt`, so images and contents are what training wrote; the prompt is the published
inference prompt of the model's version (its chat template ending with the assistant header, images as
`(<image>./</image>)`). Decoding is greedy (num_beams 1, no repetition penalty).

Scores (pure functions below; text normalised by strip + lowercase + collapsing whitespace, tokens = words):
exact_match (normalised strings equal), token F1 (SQuAD-style bag-of-words overlap) and ROUGE-L (F1 of the
longest common token subsequence). Writes one JSON line per sample {id, prompt, prediction, reference,
exact_match, f1, rouge_l} to --out (default: predictions.jsonl beside the adapter, else in the working
directory) and prints the averages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import transformers

from finetune.chat import ChatError, build_prompt, generation_config, load_image, load_model
from finetune.cli import ArgumentParser, check_model_flags
from finetune.model.loading import DTYPES

# --- metrics (pure) ------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """strip, lowercase, collapse every run of whitespace to one space."""
    return " ".join(text.lower().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the multiset of normalised words; 1.0 when both are empty."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over normalised words; 1.0 when both are empty."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, reference: str) -> dict[str, float]:
    return {
        "exact_match": exact_match(prediction, reference),
        "f1": token_f1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
    }


# --- samples -------------------------------------------------------------------------------------------------------


def split_record(record) -> tuple[list[tuple[str, str]], str]:
    """A parsed training Record -> (turns before the last assistant turn, the last assistant content)."""
    last = max(i for i, (role, _) in enumerate(record.messages) if role == "assistant")
    return list(record.messages[:last]), record.messages[last][1]


def iter_samples(data: str, image_folder: str | None = None):
    """(id, prompt turns, reference, (marker, image path) pairs) for each sample of a training-format file."""
    from finetune.dataset import DataError, open_source, parse_record

    try:
        source = open_source(data)
    except DataError as error:
        raise ChatError(str(error)) from None
    base_dir = os.path.dirname(os.path.abspath(data))
    for index in range(len(source)):
        try:
            record = parse_record(source[index], source.location(index), base_dir, image_folder)
        except DataError as error:
            raise ChatError(f"{error} (`python -m finetune.check_data` lists every bad sample)") from None
        turns, reference = split_record(record)
        yield record.id, turns, reference, list(record.images)


def evaluate(
    model,
    tokenizer,
    data: str,
    out: str | Path,
    max_new_tokens: int = 256,
    image_folder: str | None = None,
    limit: int | None = None,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Generate (greedy) and score every sample of `data`; write JSON lines to `out`. Returns the averages."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = generation_config(greedy=True, beams=1)
    rows = []
    with out.open("w", encoding="utf-8") as handle:
        for count, (sample_id, turns, reference, image_paths) in enumerate(iter_samples(data, image_folder)):
            if limit is not None and count >= limit:
                break
            images = [(marker, load_image(path)) for marker, path in image_paths]
            prompt, ordered = build_prompt(tokenizer, turns, images)
            prediction = model.generate_text(prompt, ordered, tokenizer, max_new_tokens, **config)
            row = {
                "id": sample_id,
                "prompt": prompt,
                "prediction": prediction,
                "reference": reference,
                **score(prediction, reference),
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            rows.append(row)
            if log is not None:
                log.write(f"[{count + 1}] {sample_id}: f1={row['f1']:.3f} rouge_l={row['rouge_l']:.3f}\n")
    if not rows:
        raise ChatError(f"{data}: no samples")
    summary = {
        "samples": len(rows),
        **{k: sum(r[k] for r in rows) / len(rows) for k in ("exact_match", "f1", "rouge_l")},
        "predictions": str(out),
    }
    return summary


# --- command line ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m finetune.evaluate", description="Score MiniCPM-V answers on a held-out set."
    )
    parser.add_argument("--model", required=True, help="base (or merged) model directory or hub id")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (the training output_dir)")
    parser.add_argument("--data", required=True, help="held-out data in the training format (.json or .jsonl)")
    parser.add_argument(
        "--out", default=None, help="predictions JSONL (default: ADAPTER/predictions.jsonl or ./predictions.jsonl)"
    )
    parser.add_argument("--image_folder", default=None, help="where relative image paths are looked up too")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    return parser


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_flags("finetune.evaluate", args.model, args.adapter)  # one line, before any hub look-up
    transformers.utils.logging.disable_progress_bar()  # keep the terminal for the answers
    out = args.out or str(Path(args.adapter or ".") / "predictions.jsonl")
    try:
        if not Path(args.data).is_file():
            raise ChatError(f"--data {args.data}: no such file")
        model, tokenizer = load_model(args.model, args.adapter, args.device, args.dtype)
        summary = evaluate(
            model, tokenizer, args.data, out, args.max_new_tokens, args.image_folder, args.limit, log=sys.stderr
        )
    except ValueError as error:  # ChatError and CheckpointError included: bad input, one line
        print(f"finetune.evaluate: error: {error}", file=sys.stderr)
        return 2
    print(
        f"[evaluate] {summary['samples']} samples: exact_match {summary['exact_match']:.4f}  f1 {summary['f1']:.4f}  "
        f"rouge_l {summary['rouge_l']:.4f}  -> {summary['predictions']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
