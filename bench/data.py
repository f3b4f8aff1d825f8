"""What the benchmarks train on: a full-size random checkpoint on disk and three synthetic training sets.

Nothing here downloads anything. The checkpoint has the published architecture of the MiniCPM-V version asked
for (MiniCPM-Llama3-V-2.5 by default, MiniCPM-V 2.6 or 2.0) with random weights (memory and speed do not depend
on the weights' values) and that version's small demo tokenizer (its ids index the 128,256-, 151,666- or
122,753-row embedding; the unused rows cost nothing). The sets, encoded with that tokenizer and its chat template:

    mm                multimodal: one JPEG of 400..2000 px per side (sliced by the real rule), 1-3 exchanges,
                      300..2000 tokens a sample (1209 tokens and 7.6 image views a sample on average)
    mm_upstream_like  multimodal with the averages of the set upstream's published 1.35 samples/s was measured
                      on: 448..1920 px, 2-4 exchanges, ~865 tokens and 5.7 views a sample (UPSTREAM_LIKE)
    text              text only: one question and one long answer of 2024..2048 tokens (98% of it labelled)

`prepare_workspace` writes what is missing and reuses what a previous run left (a set is reused only when its
parameters file matches). The tiny variant (smoke runs on CPU) uses the tiny test architecture, its 112-px
slicing, 256-token text rows and multimodal samples a quarter of the size. Each version has its own checkpoint,
tokenizer and sets in the work folder (2.5's keep their names; 2.6's end in `_v2_6`, 2.0's in `_v2_0`).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

WORDS = (
    "the a picture shows red green blue yellow circle square triangle left right top bottom corner near far "
    "large small bright dark shape colour background object scene there is are with and of in on at next "
    "which what where how many count describe detail answer question image text line row column table chart"
).split()

# The statistics of the set upstream's published 1.35 samples/s was measured on: images 448..1920 px, 2-4
# exchanges, 846 tokens and 5.7 views per sample on average. With the demo tokenizer and seed 0 these parameters
# give 64 samples of 865 tokens (453..1380) and 5.69 views on average.
UPSTREAM_LIKE = {"min_len": 300, "max_len": 1400, "sides": (448, 1920), "turns": (2, 4), "mean_views": 5.7}
# The tiny architecture's sets (112-px views, 16 tokens each): images and samples a quarter of the size.
TINY_MM = {"min_len": 100, "max_len": 500, "sides": (100, 500)}
TINY_UPSTREAM_LIKE = {"min_len": 100, "max_len": 350, "sides": (112, 480), "turns": (2, 4), "mean_views": 5.7}
CHECKPOINT_MARKER = "bench_checkpoint.json"  # written last: a checkpoint cut short is not reused


@dataclass(frozen=True)
class Workspace:
    """Where a benchmark run finds its checkpoint, its tokenizer and its training sets (train.json files)."""

    checkpoint: Path
    text: Path
    mm: Path
    mm_upstream_like: Path
    tiny: bool
    tokenizer: Path
    version: str = "2.5"

    def data(self, name: str) -> Path:
        return {"text": self.text, "mm": self.mm, "mm_upstream_like": self.mm_upstream_like}[name]


def slice_settings(tiny: bool, version: str = "2.5"):
    """The slicing of the tiny test architecture (112 px, 16 queries), or of the version's published model (448
    px and its query count: 96 for 2.5, 64 for 2.6 and 2.0)."""
    from finetune.model.image_processing import SliceSettings
    from finetune.synthetic import REFERENCE_CONFIGS

    return SliceSettings(112, 14, 9, 16) if tiny else SliceSettings(448, 14, 9, REFERENCE_CONFIGS[version]["query_num"])


def _suffix(version: str) -> str:
    """The version's part of the work folder's names: none for 2.5 (the names of earlier runs), `_v2_6` / `_v2_0`
    else."""
    return "" if version == "2.5" else "_v" + version.replace(".", "_")


def prepare_workspace(
    folder: Path,
    tiny: bool,
    mm_samples: int = 64,
    text_samples: int = 96,
    checkpoint: bool = True,
    version: str = "2.5",
) -> Workspace:
    """The checkpoint of MiniCPM-V `version` (unless not asked for), its demo tokenizer and the three sets under
    `folder`, written where missing. 96 text samples: the timed steps of a run of up to 96 steps stay within one
    epoch (a DataLoader restart would fall in the timing)."""
    from finetune.synthetic import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(version)
    checkpoint_dir = folder / (("checkpoint_tiny" if tiny else "checkpoint") + suffix)
    if checkpoint:
        write_checkpoint(checkpoint_dir, tiny, version)
    tokenizer_dir = folder / ("tokenizer" + suffix)
    tokenizer = build_tokenizer(tokenizer_dir, version=version)  # the checkpoint's own (same corpus and size)
    settings = slice_settings(tiny, version)
    text_length = 256 if tiny else 2048
    sets = folder / (("data_tiny" if tiny else "data") + suffix)
    return Workspace(
        checkpoint=checkpoint_dir,
        text=Path(make_text_dataset(str(sets / "text"), text_samples, tokenizer, settings, length=text_length)),
        mm=Path(make_mm_dataset(str(sets / "mm"), mm_samples, tokenizer, settings, **(TINY_MM if tiny else {}))),
        mm_upstream_like=Path(
            make_mm_dataset(
                str(sets / "mm_upstream_like"),
                mm_samples,
                tokenizer,
                settings,
                **(TINY_UPSTREAM_LIKE if tiny else UPSTREAM_LIKE),
            )
        ),
        tiny=tiny,
        tokenizer=tokenizer_dir,
        version=version,
    )


def write_checkpoint(folder: Path, tiny: bool, version: str = "2.5") -> Path:
    """The full-size architecture of MiniCPM-V `version` with random weights in bf16 (safetensors shards of 4 GB,
    ~16 GB; built on the GPU in about a second, written in ~20 s) beside the version's demo tokenizer and the
    published sidecar files, or the tiny test checkpoint of that version. Reused when a complete one is there."""
    import torch

    from finetune.synthetic import build_full_size_random, build_tiny_checkpoint, build_tokenizer, write_sidecar_files

    marker = folder / CHECKPOINT_MARKER
    made = {"tiny": tiny, "version": version}
    if marker.is_file() and json.loads(marker.read_text()) == made:
        return folder
    marker.unlink(missing_ok=True)
    if tiny:
        build_tiny_checkpoint(folder, seed=0, version=version)
    else:
        build_tokenizer(folder, version=version)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = build_full_size_random(device, dtype=torch.bfloat16, version=version)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="4GB")
        write_sidecar_files(folder, model.config)
        del model
    marker.write_text(json.dumps(made))
    return folder


def _photo(rng: random.Random, size: tuple[int, int]):
    """A smooth random image (low-res noise upsampled): decodes like a photo, costs little to make."""
    import numpy as np
    from PIL import Image

    small = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def _encoded_length(sample: dict, encoder) -> int:
    """Tokens of a sample as the training data path encodes it (no pixels loaded)."""
    from finetune.dataset import parse_record, prepare_sample

    return len(prepare_sample(parse_record(sample, sample["id"]), encoder, None, load_pixels=False).input_ids)


def _made_with(data_path: str, params_path: str, params: dict) -> bool:
    """Whether data_path is a finished set made with `params` (its parameters file matches) whose images exist."""
    try:
        with open(params_path) as handle:
            if json.load(handle) != params:
                return False
        with open(data_path) as handle:
            return all(os.path.exists(sample["image"]) for sample in json.load(handle))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def make_mm_dataset(
    folder: str, num: int, tokenizer, settings, seed: int = 0, min_len: int = 300, max_len: int = 2000,
    sides: tuple[int, int] = (400, 2000), turns: tuple[int, int] = (1, 3), mean_views: float | None = None,
) -> str:  # fmt: skip
    """Write `num` samples (JPEG `sides` px per side, uniform; `turns` user/assistant exchanges, image in the
    first user turn) whose encoded length is close to a uniform target in [min_len, max_len]. Returns the JSON
    path.

    With `mean_views`, each image is the one of 8 candidates (sides log-uniform in `sides`) whose view count
    (the real slicing rule) brings the set's running mean closest to `mean_views`: a set with a given average
    vision load, as upstream's published measurement had (UPSTREAM_LIKE).

    A set already in `folder` made with the same parameters (train.params.json beside train.json, written last)
    whose images are all there is reused, not rebuilt."""
    from finetune.dataset import ConversationEncoder
    from finetune.model.image_processing import plan_slices

    data_path = os.path.join(folder, "train.json")
    params_path = os.path.join(folder, "train.params.json")
    params = {
        "num": num,
        "seed": seed,
        "min_len": min_len,
        "max_len": max_len,
        "settings": asdict(settings),
        "vocab": len(tokenizer),
    }
    if (sides, turns, mean_views) != ((400, 2000), (1, 3), None):
        params.update(sides=list(sides), turns=list(turns), mean_views=mean_views)
    if _made_with(data_path, params_path, params):
        return data_path
    if os.path.exists(params_path):
        os.remove(params_path)  # a build cut short must not pass for a finished one
    rng = random.Random(seed)
    encoder = ConversationEncoder(tokenizer, settings)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    samples = []
    views_so_far = 0
    for index in range(num):
        if mean_views is None:
            size = (rng.randint(*sides), rng.randint(*sides))
        else:
            log_side = lambda: round(math.exp(rng.uniform(math.log(sides[0]), math.log(sides[1]))))  # noqa: E731
            candidates = [(log_side(), log_side()) for _ in range(8)]
            views = {c: len(plan_slices(c, settings).view_sizes()) for c in candidates}
            size = min(candidates, key=lambda c: abs((views_so_far + views[c]) / (index + 1) - mean_views))
            views_so_far += views[size]
        path = os.path.join(folder, "images", f"{index:04d}.jpg")
        _photo(rng, size).save(path, quality=90)
        target = rng.randint(min_len, max_len)
        exchanges = rng.randint(*turns)
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(max(1, n)))  # noqa: E731
        answer_words = [rng.randint(5, 40) for _ in range(exchanges)]
        sample = None
        for _ in range(6):  # scale the answers until the encoded length is near the target
            conversations = []
            for turn in range(exchanges):
                question = words(rng.randint(4, 12)) + "?"
                conversations.append({"role": "user", "content": ("<image>\n" if turn == 0 else "") + question})
                conversations.append({"role": "assistant", "content": words(answer_words[turn])})
            sample = {"id": f"mm{index}", "image": path, "conversations": conversations}
            length = _encoded_length(sample, encoder)
            if abs(length - target) <= 16 or length > max_len:
                break
            text = sum(answer_words)
            grow = max(0.1, (target - length) / max(1, text * 2.5) + 1)  # ~2.5 tokens a word with the demo BPE
            answer_words = [max(1, int(round(n * grow))) for n in answer_words]
        if length > max_len:  # the image alone may take ~1000 tokens: trim the answers back
            answer_words = [max(1, n // 3) for n in answer_words]
            conversations = [dict(m) for m in conversations]
            for turn in range(exchanges):
                conversations[2 * turn + 1]["content"] = words(answer_words[turn])
            sample = {"id": f"mm{index}", "image": path, "conversations": conversations}
        samples.append(sample)
    with open(data_path, "w") as handle:
        json.dump(samples, handle)
    with open(params_path, "w") as handle:
        json.dump(params, handle)
    return data_path


def mm_set_stats(data_path: str, tokenizer, settings) -> dict:
    """A multimodal set's averages per sample: encoded tokens, image views (the real slicing rule), exchanges."""
    from PIL import Image

    from finetune.dataset import ConversationEncoder
    from finetune.model.image_processing import plan_slices

    encoder = ConversationEncoder(tokenizer, settings)
    with open(data_path) as handle:
        samples = json.load(handle)
    tokens = [_encoded_length(sample, encoder) for sample in samples]
    views = []
    for sample in samples:
        with Image.open(sample["image"]) as image:
            views.append(len(plan_slices(image.size, settings).view_sizes()))
    return {
        "samples": len(samples), "mean_tokens": sum(tokens) / len(tokens), "min_tokens": min(tokens), "max_tokens": max(tokens),
        "mean_views": sum(views) / len(views), "mean_exchanges": sum(len(s["conversations"]) // 2 for s in samples) / len(samples),
    }  # fmt: skip


def make_text_dataset(folder: str, num: int, tokenizer, settings, length: int = 2048, seed: int = 0) -> str:
    """Write `num` text-only samples (one question, one long answer) whose encoded length is in
    [length - 24, length]: the Trainer's counterpart of the bench loop's random-id text rows (the labels are the
    answer and its end of turn, ~98% of the row). Returns the JSON path; a set made with the same parameters is
    reused."""
    from finetune.dataset import ConversationEncoder

    data_path = os.path.join(folder, "train.json")
    params_path = os.path.join(folder, "train.params.json")
    params = {"num": num, "seed": seed, "length": length, "settings": asdict(settings), "vocab": len(tokenizer)}
    try:
        if json.loads(Path(params_path).read_text()) == params and os.path.exists(data_path):
            return data_path
    except (OSError, ValueError):
        pass
    rng = random.Random(seed)
    encoder = ConversationEncoder(tokenizer, settings)
    samples = []
    for index in range(num):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "?"
        vocabulary = [rng.choice(WORDS) for _ in range(4 * length)]

        def encoded(words: int, index=index, question=question, vocabulary=vocabulary) -> tuple[int, dict]:
            sample = {"id": f"text{index}", "conversations": [
                {"role": "user", "content": question}, {"role": "assistant", "content": " ".join(vocabulary[:words])}]}  # fmt: skip
            return _encoded_length(sample, encoder), sample

        low, high = 1, len(vocabulary)  # the longest answer that still fits (length grows with the word count)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if encoded(middle)[0] <= length else (low, middle - 1)
        tokens, sample = encoded(low)
        if not length - 24 <= tokens <= length:
            raise RuntimeError(f"text sample {index}: {tokens} tokens, wanted {length - 24}..{length}")
        samples.append(sample)
    os.makedirs(folder, exist_ok=True)
    with open(data_path, "w") as handle:
        json.dump(samples, handle)
    with open(params_path, "w") as handle:
        json.dump(params, handle)
    return data_path
