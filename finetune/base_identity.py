"""Which base model an adapter was trained on: a cheap fingerprint of the base's weights and tokenizer vocabulary.

Training writes it as `base_model_identity.json` beside every adapter it saves (finetune.trainer), and merge
compares it with the base it is given. Shape checks alone accept another base of the same architecture, whose
merged model then loads without a complaint and answers garbage (other weights) or fails with an IndexError
(another tokenizer).

Cheap on a 16 GB base: the tensor names and shapes come from the safetensors headers, plus VALUES_PER_TENSOR
values at fixed pseudo-random positions of SAMPLED_TENSORS tensors spread over the model, each read as a
one-element slice (a few hundred small reads; no tensor is loaded whole, no shard is hashed). Robust to a copy
of the same base stored in another dtype: the shapes are hashed without the dtypes, and the sampled values are
compared as numbers within a tolerance wider than bf16's rounding, never as bytes. The tokenizer's vocabulary is
hashed as the sorted (token, id) pairs of tokenizer.json's model vocabulary and added tokens: re-serialising the
file (indentation, key order) changes nothing, other tokens or other ids do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from pathlib import Path

from finetune.model.checkpoint import stored_shapes
from finetune.model.loading import looks_like_hub_id

logger = logging.getLogger(__name__)

IDENTITY_FILE = "base_model_identity.json"
FORMAT = 1  # bump when what is sampled changes: a record of another format cannot be compared value by value
SAMPLED_TENSORS = 32
VALUES_PER_TENSOR = 8
# bf16 keeps 8 significant bits: storing a value in bf16 moves it by at most 2^-8 of itself (2^-8 + 2^-11 after
# an fp16 copy first). Twice that still tells apart another base, whose values differ entirely.
RELATIVE_TOLERANCE = 2**-7
ABSOLUTE_TOLERANCE = 1e-6  # values near zero: fp16 flushes those below 6e-8 to zero


def fingerprint(model_dir: str | Path) -> dict:
    """The identity of the checkpoint in `model_dir`: {"format", "weights", "tokenizer"} (see compare).

    Raises CheckpointError when the directory holds no safetensors weights, ValueError for an unreadable
    tokenizer.json."""
    model_dir = Path(model_dir)
    return {"format": FORMAT, "weights": weights_fingerprint(model_dir), "tokenizer": vocabulary_fingerprint(model_dir)}


def weights_fingerprint(model_dir: Path) -> dict:
    """Tensor count, a hash of the sorted names and shapes, and sampled values of SAMPLED_TENSORS tensors chosen
    evenly over the sorted names (so every part of the model is represented: llm layers, resampler, vpm)."""
    from safetensors import safe_open

    stored = stored_shapes(model_dir)  # name -> (shape, file), headers only
    names = sorted(stored)
    listing = "\n".join(f"{name} {list(stored[name][0])}" for name in names)
    if len(names) <= SAMPLED_TENSORS:
        chosen = names
    else:
        chosen = sorted({names[round(k * (len(names) - 1) / (SAMPLED_TENSORS - 1))] for k in range(SAMPLED_TENSORS)})
    by_file: dict[str, list[str]] = {}
    for name in chosen:
        by_file.setdefault(stored[name][1], []).append(name)
    samples = {}
    for file, group in sorted(by_file.items()):
        with safe_open(str(model_dir / file), framework="pt") as handle:
            for name in group:
                shape = stored[name][0]
                positions = sample_positions(name, shape)
                values = [_value_at(handle, name, shape, position) for position in positions]
                samples[name] = {"positions": positions, "values": values}
    return {
        "tensors": len(names),
        "names_and_shapes_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "samples": dict(sorted(samples.items())),
    }


def sample_positions(name: str, shape: tuple[int, ...]) -> list[int]:
    """VALUES_PER_TENSOR flat positions of the tensor, pseudo-random but the same in every process (seeded by
    the name and shape, not by Python's salted hash), so that structured regions (padding rows) are not all
    that is sampled."""
    size = math.prod(shape)
    generator = random.Random(f"{name} {list(shape)}")
    return sorted(generator.sample(range(size), min(VALUES_PER_TENSOR, size)))


def _value_at(handle, name: str, shape: tuple[int, ...], position: int) -> float:
    """The element at flat `position`, read as a one-element slice, as a float rounded to 8 significant digits
    (more than fp32 holds reliably; keeps the JSON small)."""
    if not shape:
        value = handle.get_tensor(name)
    else:
        index = []
        for dim in reversed(shape):
            index.append(position % dim)
            position //= dim
        value = handle.get_slice(name)[tuple(slice(i, i + 1) for i in reversed(index))]
    return float(f"{float(value.reshape(-1)[0].double()):.8g}")


def vocabulary_fingerprint(model_dir: Path) -> dict | None:
    """{"tokens", "vocabulary_sha256"} of the directory's tokenizer.json, or None without one.

    Hashes the set of (token, id) pairs of the model's vocabulary (a dict for BPE/WordPiece/WordLevel, a list of
    [piece, score] for Unigram) and of the added tokens, sorted by id then token."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    vocab = (data.get("model") or {}).get("vocab") or {}
    pairs = vocab.items() if isinstance(vocab, dict) else ((entry[0], index) for index, entry in enumerate(vocab))
    tokens = {(str(token), int(index)) for token, index in pairs}
    tokens |= {(str(added["content"]), int(added["id"])) for added in data.get("added_tokens") or []}
    canonical = json.dumps(
        sorted(tokens, key=lambda pair: (pair[1], pair[0])), ensure_ascii=False, separators=(",", ":")
    )
    return {"tokens": len(tokens), "vocabulary_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest()}


def compare(recorded: dict, actual: dict) -> str | None:
    """None when `actual` (a fingerprint of the base at hand) is the base `recorded` was taken of; otherwise what
    differs, as a phrase: the weights (names/shapes, or sampled values beyond the dtype tolerance) and/or the
    tokenizer vocabulary. A side without tokenizer.json is not compared. Both must be of the same FORMAT."""
    problems = []
    weights, actual_weights = recorded["weights"], actual["weights"]
    if weights["names_and_shapes_sha256"] != actual_weights["names_and_shapes_sha256"]:
        problems.append(
            f"the weights differ (tensor names or shapes: {weights['tensors']} tensors recorded, {actual_weights['tensors']} in the base)"
        )
    else:
        differing = {}
        for name, sample in weights["samples"].items():
            other = actual_weights["samples"].get(name)
            if other is None or other["positions"] != sample["positions"]:
                differing[name] = len(sample["values"])
                continue
            count = sum(not _close(a, b) for a, b in zip(sample["values"], other["values"], strict=True))
            if count:
                differing[name] = count
        if differing:
            name, count = next(iter(differing.items()))
            problems.append(
                f"the weights differ (sampled values of {len(differing)} of {len(weights['samples'])} tensors, "
                f"e.g. {name}: {count} of {len(weights['samples'][name]['values'])})"
            )
    vocabulary, actual_vocabulary = recorded.get("tokenizer"), actual.get("tokenizer")
    if vocabulary and actual_vocabulary and vocabulary["vocabulary_sha256"] != actual_vocabulary["vocabulary_sha256"]:
        counts = f"{vocabulary['tokens']} tokens recorded, {actual_vocabulary['tokens']} in the base's tokenizer.json"
        if vocabulary["tokens"] == actual_vocabulary["tokens"]:
            counts = f"{vocabulary['tokens']} tokens each, other tokens or ids"
        problems.append(f"the tokenizer vocabulary differs ({counts})")
    return " and ".join(problems) or None


def _close(recorded: float, actual: float) -> bool:
    """Equal within what storing the weights in bf16/fp16 changes (NaN matches NaN, an infinity itself)."""
    if math.isnan(recorded) or math.isnan(actual):
        return math.isnan(recorded) and math.isnan(actual)
    if recorded == actual:
        return True
    return abs(recorded - actual) <= ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * max(abs(recorded), abs(actual))


# --- files ------------------------------------------------------------------------------------------------------


def local_model_dir(model_name_or_path: str) -> Path | None:
    """The directory holding the model's files: the path itself, or for a hub id its snapshot in the local
    Hugging Face cache (never a download); None when neither exists."""
    path = Path(model_name_or_path)
    if path.is_dir():
        return path
    if not looks_like_hub_id(model_name_or_path):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_name_or_path, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), no huggingface_hub, a broken cache entry, ...
        return None


def identity_for_training(model_name_or_path: str) -> dict | None:
    """The fingerprint training records for its base (once per run), with the base as it was named; None, with a
    logged notice, when the base's files cannot be found locally or read: training goes on, and merge will
    verify that adapter's base by shapes only."""
    model_dir = local_model_dir(model_name_or_path)
    if model_dir is None:
        logger.warning(
            "base model identity not recorded: %s is neither a local directory nor in the local Hugging Face cache "
            "(merge will check this adapter's base by tensor shapes only)", model_name_or_path,
        )  # fmt: skip
        return None
    try:
        identity = fingerprint(model_dir)
    except (
        Exception
    ) as error:  # no safetensors (a .bin checkpoint), a broken tokenizer.json, ...: never stop training for it
        logger.warning("base model identity not recorded: cannot fingerprint %s (%s)", model_dir, error)
        return None
    return {**identity, "base": model_name_or_path}


def write_identity(directory: str | Path, identity: dict) -> Path:
    """IDENTITY_FILE in `directory`, indented, with each list of numbers on one line (under 10 KB); returns its
    path."""
    path = Path(directory) / IDENTITY_FILE
    text = re.sub(r"\[\s+([-+.\deE,\s]*?)\s+\]", lambda match: "[" + ", ".join(n.strip() for n in match.group(1).split(",")) + "]",
                  json.dumps(identity, indent=1))  # fmt: skip
    path.write_text(text + "\n")
    return path


def read_identity(directory: str | Path) -> dict | None:
    """The identity recorded in `directory`, or None when it has no IDENTITY_FILE; ValueError (naming the file)
    when the file is not a JSON object."""
    path = Path(directory) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        identity = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(identity, dict):
        raise ValueError(f"{path}: not a JSON object")
    return identity
