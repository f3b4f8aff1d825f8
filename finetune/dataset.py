"""Conversations -> model inputs for MiniCPM-V fine-tuning (2.5, 2.6, 2.0): faithful to the model, safe on bad data.

Pipeline (each step a pure function, so it can be tested and reused by `finetune.validation`):

1. `open_source` / `parse_data_spec` / `MixedSource`: read upstream's data format (a JSON list, or JSON Lines
   read lazily through a byte-offset index) and mix several files with sampling ratios.
2. `parse_record`: raw dict -> validated `Record` (roles, contents, image markers, image files). Every problem
   raises `DataError` naming the sample and the problem.
3. `ConversationEncoder.encode`: `Record` + image grids -> token ids and labels, built piecewise with the model
   version's *training* template (`TRAINING_TEMPLATES`: Llama-3 for 2.5, ChatML for 2.6, `<用户>`/`<AI>` for
   2.0; no generation prompt)
   and its image placeholders, with whole trailing turns dropped when too long.
4. `prepare_sample`: the whole thing, including pixels (adaptive slicing from `finetune.model.image_processing`).
5. `SupervisedDataset` (torch Dataset, reading one split of a run's `DataSettings`) and `DataCollator` (padding or
   packing) produce the batch contract the model (`MiniCPMV.forward(data=...)`) and the trainer rely on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .model.configuration import slice_settings_from_config
from .model.image_processing import (
    SliceGrid,
    SliceSettings,
    image_bound_array,
    plan_slices,
    view_patch_sizes,
    view_strips,
)
from .model.tokenization import SpecialTokens, detect_llm_type
from .model.versions import VERSIONS, ModelVersion

logger = logging.getLogger("finetune.dataset")

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")
# Tag strings the tokenizer turns into image-structure tokens: in plain text they would corrupt image_bound.
RESERVED_TAGS = ("<image>", "</image>", "<slice>", "</slice>")
# Grounding markup the model is taught to write (`<ref>a cat</ref><box>x1 y1 x2 y2</box>`): special tokens that
# are content, not control: they move no role, trained span or image bound.
GROUNDING_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>")
_DICT_MARKER = re.compile(r"<image_[^<>\s]*>")


# --- errors --------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A sample (or a whole data file) is unusable; the message names the sample and the problem."""

    def __init__(self, message: str, sample: str | None = None):
        super().__init__(f"sample {sample}: {message}" if sample is not None else message)
        self.sample = sample
        self.reason = message


class SampleTooLong(Exception):
    """Not bad data: the sample cannot fit model_max_length even with all trailing turns dropped (skipped)."""

    def __init__(self, sample: str, length: int, minimum: int, max_length: int):
        super().__init__(
            f"sample {sample}: skipped, {length} tokens; even its first exchange needs {minimum} > model_max_length={max_length}"
        )
        self.sample, self.length, self.minimum, self.max_length = sample, length, minimum, max_length


# --- reading data files ------------------------------------------------------------------------------------


class JsonListSource:
    """A JSON file holding a list of samples (upstream's format). Loaded whole: JSON cannot be read lazily."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: cannot read data file: {error}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> Any:
        return self._data[index]

    def location(self, index: int) -> str:
        return f"{os.path.basename(self.path)}[{index}]"


class JsonlSource:
    """A JSON Lines file read lazily: only the byte offset of every non-empty line is kept in memory.

    Lines are parsed on access, so a malformed line is reported (with its line number) when that sample is
    validated or loaded, not when the file is opened. Safe across fork/spawn: the file is reopened per process.
    """

    def __init__(self, path: str):
        self.path = path
        offsets, line_numbers = [], []
        try:
            with open(path, "rb") as handle:
                position = 0
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        offsets.append(position)
                        line_numbers.append(number)
                    position += len(line)
        except OSError as error:
            raise DataError(f"{path}: cannot read data file: {error}") from None
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(line_numbers, dtype=np.int64)
        self._handle = None
        self._pid = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, None  # file handles do not pickle (DataLoader workers)
        return state

    def _file(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        return self._handle

    def __getitem__(self, index: int) -> Any:
        handle = self._file()
        handle.seek(int(self._offsets[index]))
        line = handle.readline()
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            column = getattr(error, "colno", "?")
            detail = getattr(error, "msg", str(error))
            raise DataError(
                f"{self.path} line {int(self._lines[index])}: malformed JSON (column {column}): {detail}"
            ) from None

    def location(self, index: int) -> str:
        return f"{os.path.basename(self.path)}:{int(self._lines[index])}"


def open_source(path: str) -> JsonListSource | JsonlSource:
    """`.jsonl` files are read lazily; anything else must be a JSON list."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    return JsonlSource(path) if path.endswith(".jsonl") else JsonListSource(path)


def parse_data_spec(spec: str | Sequence[str]) -> list[tuple[str, float | None]]:
    """`"ocr.json:0.7,chat.jsonl:0.3"` -> [("ocr.json", 0.7), ("chat.jsonl", 0.3)]; no ratio -> None.

    A trailing `:number` is a ratio if it parses as a float, so paths with colons still work. A ratio must be
    finite and > 0 (a file to drop is left out of the spec), and the ratios must add up to a finite number (they
    are normalised by their sum). Raises ValueError, one line, naming the item or the spec.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    parsed = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        path, ratio = item, None
        if ":" in item:
            head, tail = item.rsplit(":", 1)
            try:
                ratio = float(tail)
                path = head
            except ValueError:
                pass
        if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
            hint = " (leave a file out of the spec to drop it)" if ratio == 0 else ""
            raise ValueError(f"data spec {item!r}: ratio must be a finite number > 0{hint}")
        parsed.append((path, ratio))
    if not parsed:
        raise ValueError(f"empty data spec {spec!r}")
    if not math.isfinite(sum(ratio for _, ratio in parsed if ratio is not None)):
        shown = spec if isinstance(spec, str) else ",".join(spec)
        raise ValueError(
            f"data spec {shown!r}: the ratios add up to more than the largest float; only their proportions count, "
            f"so give them on a smaller scale (7,3 mixes as 0.7,0.3 does)"
        )
    return parsed


class MixedSource:
    """Several data files as one indexable sequence of raw samples.

    Mixing rule (deterministic for a given seed):
    - a file given without a ratio contributes every sample once, in file order;
    - the files given with ratios form one mixed pool whose size is the sum of their sizes, N = sum(n_i).
      Ratios are normalised (r_i / sum r); file i contributes k_i = round(N * r_i / sum r) samples. When
      k_i <= n_i they are a seeded sample without replacement (random.Random(seed + i), kept in file order);
      when k_i > n_i the file is repeated floor(k_i / n_i) times plus a seeded sample of the remainder
      (oversampling).
    Every file named must contribute at least one sample: a file with none, or a ratio whose share rounds to 0
    samples, raises DataError (one line) instead of silently leaving out a file the user asked for.
    Order in the mixed dataset: sources in spec order, each source's picks in increasing index order (the
    trainer's sampler shuffles). `counts` and `share_lines()` say what each file contributes.
    """

    def __init__(self, spec: str | Sequence[str], seed: int = 42):
        entries = parse_data_spec(spec)
        self.sources = [open_source(path) for path, _ in entries]
        self.ratios = [ratio for _, ratio in entries]
        total_ratio = sum(r for r in self.ratios if r is not None)  # finite: parse_data_spec checks
        pool = sum(len(s) for s, r in zip(self.sources, self.ratios, strict=True) if r is not None)
        where = "data mix" if len(entries) > 1 else "data"
        self.counts = []  # samples each source contributes
        picks: list[np.ndarray] = []
        for i, (source, ratio) in enumerate(zip(self.sources, self.ratios, strict=True)):
            n = len(source)
            if n == 0:
                raise DataError(f"{where}: {source.path} gets 0 samples: the file holds none")
            if ratio is None:
                chosen = np.arange(n)
            else:
                share = ratio / total_ratio  # first: pool * ratio alone can overflow for a huge ratio
                k = int(round(pool * share))
                if k == 0:
                    raise DataError(
                        f"{where}: {source.path} gets 0 samples (ratio {ratio:g} is {100 * share:.3g}% of the ratios, "
                        f"of a pool of {pool} samples); raise its ratio or leave it out"
                    )
                rng = random.Random(seed + i)
                repeats, rest = divmod(k, n)
                chosen = np.concatenate([np.tile(np.arange(n), repeats), np.sort(rng.sample(range(n), rest))]).astype(
                    np.int64
                )
                chosen = np.sort(chosen, kind="stable")
            self.counts.append(len(chosen))
            picks.append(chosen)
        self._source_of = (
            np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(picks)])
            if picks
            else np.zeros(0, np.int64)
        )
        self._index_in = np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, np.int64)

    def share_lines(self) -> list[str]:
        """One line per file: the samples it contributes and how (check_data and training print them)."""
        lines = []
        for source, ratio, count in zip(self.sources, self.ratios, self.counts, strict=True):
            size = len(source)
            if ratio is None:
                how = "no ratio: every sample once"
            else:
                how = f"ratio {ratio:g}: {size} in the file" + (f", {count - size} repeated" if count > size else "")
            lines.append(f"{source.path}: {count} samples ({how})")
        return lines

    def __len__(self) -> int:
        return len(self._index_in)

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index inside that source) of a mixed index."""
        return int(self._source_of[index]), int(self._index_in[index])

    def __getitem__(self, index: int) -> Any:
        source, inner = self.locate(index)
        return self.sources[source][inner]

    def location(self, index: int) -> str:
        source, inner = self.locate(index)
        return self.sources[source].location(inner)

    def base_dir(self, index: int) -> str:
        return os.path.dirname(os.path.abspath(self.sources[self.locate(index)[0]].path))


# --- records -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """A validated sample. `images` are (marker, absolute path) in order of first appearance in the text."""

    id: str  # the sample's id, or its location ("data.json[3]") when it has none
    messages: tuple[tuple[str, str], ...]  # (role, content) with image markers still in the content
    images: tuple[tuple[str, str], ...]
    has_id: bool = True


def resolve_image_path(path: str, base_dir: str | None, image_folder: str | None) -> tuple[str, list[str]]:
    """An absolute path, or relative to `image_folder` (tried first when given), or to the data file's folder."""
    if os.path.isabs(path):
        return path, [path]
    tried = []
    for root in (image_folder, base_dir):
        if root:
            candidate = os.path.join(root, path)
            tried.append(candidate)
            if os.path.isfile(candidate):
                return candidate, tried
    return (tried[0] if tried else path), tried or [path]


def parse_record(
    raw: Any,
    name: str,
    base_dir: str | None = None,
    image_folder: str | None = None,
    check_files: bool = True,
    control_tokens: re.Pattern[str] | None = None,
) -> Record:
    """Validate one raw sample (upstream format) and resolve its images. Raises DataError naming the sample.

    `name` is used when the sample has no "id". Rules: optional leading system message, then user/assistant
    alternating starting with user and ending with assistant; contents are non-empty strings; `image` is a path
    (one image: an optional single `<image>` marker; without one it goes before the first user text) or a dict
    name -> path (each name must appear exactly once as `<name>` in user turns), or absent (text only).
    With `control_tokens` (`control_token_pattern`; the dataset passes its tokenizer's), no content may contain
    one of those tokens as text: the tokenizer would make it that token, moving roles and trained spans.
    """
    if not isinstance(raw, dict):
        raise DataError(f"expected a JSON object, got {type(raw).__name__}", name)
    has_id = raw.get("id") is not None
    sample = str(raw["id"]) if has_id else name
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError("'conversations' must be a non-empty list", sample)

    messages = []
    for turn, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise DataError(f"turn {turn}: expected an object with 'role' and 'content'", sample)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"turn {turn}: unknown role {role!r} (expected one of {', '.join(ROLES)})", sample)
        if not isinstance(content, str):
            raise DataError(f"turn {turn} ({role}): content must be a string, got {type(content).__name__}", sample)
        if not content.strip():
            raise DataError(f"turn {turn} ({role}): empty content", sample)
        found = control_tokens.search(content) if control_tokens is not None else None
        if found:
            raise DataError(f"turn {turn} ({role}) contains the special token {found.group()!r} as text", sample)
        messages.append((role, content))

    # Roles: [system] user assistant user assistant ...
    start = 1 if messages[0][0] == "system" else 0
    if start == len(messages):
        raise DataError("no user turn after the system message", sample)
    if messages[start][0] != "user":
        raise DataError(
            f"turn {start}: first turn must be from the user (after an optional system), got {messages[start][0]!r}",
            sample,
        )
    for turn in range(start, len(messages)):
        expected = "user" if (turn - start) % 2 == 0 else "assistant"
        if messages[turn][0] != expected:
            raise DataError(
                f"turn {turn}: roles must alternate user/assistant, expected {expected!r} got {messages[turn][0]!r}",
                sample,
            )
    if not any(role == "assistant" for role, _ in messages):
        raise DataError("no assistant turn: nothing to train on", sample)
    if messages[-1][0] != "assistant":
        raise DataError(f"turn {len(messages) - 1}: conversation ends with a user turn that has no answer", sample)

    images = _parse_images(raw.get("image"), messages, sample)
    resolved = []
    for marker, path in images:
        full, tried = resolve_image_path(path, base_dir, image_folder)
        if check_files and not os.path.isfile(full):
            raise DataError(f"image file not found: {path!r} (tried {', '.join(tried)})", sample)
        resolved.append((marker, full))
    return Record(sample, tuple(messages), tuple(resolved), has_id)


def control_token_pattern(tokenizer, extra: Iterable[str] = ()) -> re.Pattern[str] | None:
    """A pattern matching the text of every control token of `tokenizer` and of the `extra` strings, or None when
    there is none.

    Control tokens are its special tokens (`all_special_tokens` and the added tokens marked special) that it
    splits out of text (added tokens), except:
    - the image tags (RESERVED_TAGS): `<image>` is the data format's image marker, and the other three are
      refused by a rule of their own (`_parse_images`), as before;
    - the grounding tags (GROUNDING_TAGS): content, see there.
    - the pad token when the tokenizer's own vocabulary (its BPE model) has it as an ordinary token:
      MiniCPM-Llama3-V-2.5's pad is "!", which transformers registers as an added special token. A pad that is
      a control token of its own (MiniCPM-V 2.6's `<|endoftext|>`) is refused like the others.
    What is left (2.5: `<|begin_of_text|>`, `<|end_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`,
    `<|eot_id|>`; 2.6: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<image_id>`, `</image_id>`; both: `<unk>`
    (the image placeholder), the reserved special tokens) would, written in a turn, start a new role, end a
    trained span (the label rule stops at the end-of-turn token), or add an image placeholder or image id.
    """
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    allowed = set(RESERVED_TAGS) | set(GROUNDING_TAGS)
    if _is_ordinary_token(tokenizer, tokenizer.pad_token):
        allowed.add(tokenizer.pad_token)
    control = {t for t in special if t in added and t not in allowed} | set(extra)
    control = sorted(control, key=lambda t: (-len(t), t))
    return re.compile("|".join(map(re.escape, control))) if control else None


def _is_ordinary_token(tokenizer, token: str | None) -> bool:
    """Whether `token` is an entry of the tokenizer's BPE vocabulary itself, not only an added token (a tokenizer
    without a backend model to ask is taken to have it, as a pad token always was)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if token is None or backend is None:
        return token is not None
    return backend.model.token_to_id(token) is not None


def _dict_marker(name: str) -> str:
    """Upstream (MiniCPM-V 2.6) writes the keys with brackets, {"<image_00>": path}; bare "image_00" works too."""
    return name if name.startswith("<") and name.endswith(">") else f"<{name}>"


def _parse_images(image: Any, messages: list[tuple[str, str]], sample: str) -> list[tuple[str, str]]:
    """(marker, path) pairs in order of appearance; checks markers match images one to one."""
    for turn, (_role, content) in enumerate(messages):
        for tag in RESERVED_TAGS[1:]:
            if tag in content:
                raise DataError(f"turn {turn}: content contains the reserved tag {tag!r}", sample)
    marker_turns = lambda marker: [t for t, (_, c) in enumerate(messages) if marker in c]  # noqa: E731
    total = lambda marker: sum(c.count(marker) for _, c in messages)  # noqa: E731

    if image is None:
        found = total(IMAGE_MARKER) + sum(len(_DICT_MARKER.findall(c)) for _, c in messages)
        if found:
            raise DataError(f"{found} image marker(s) but no image", sample)
        return []
    if isinstance(image, str):
        if not image:
            raise DataError("empty image path", sample)
        count = total(IMAGE_MARKER)
        if count > 1:
            raise DataError(f"{count} <image> markers but 1 image", sample)
        if count == 1 and messages[marker_turns(IMAGE_MARKER)[0]][0] != "user":
            raise DataError("image marker in a non-user turn", sample)
        return [(IMAGE_MARKER, image)]
    if isinstance(image, dict):
        if not image:
            raise DataError("'image' is an empty dict", sample)
        if total(IMAGE_MARKER):
            raise DataError("'image' is a dict: use its keys as markers (<image_00>), not <image>", sample)
        positions = []
        for name, path in image.items():
            if not isinstance(path, str) or not path:
                raise DataError(f"image {name!r}: path must be a non-empty string", sample)
            marker = _dict_marker(name)
            count = total(marker)
            if count != 1:
                raise DataError(f"image {name!r}: marker {marker} appears {count} times, expected exactly once", sample)
            turn = marker_turns(marker)[0]
            if messages[turn][0] != "user":
                raise DataError(f"image marker {marker} in a non-user turn", sample)
            positions.append((turn, messages[turn][1].index(marker), marker, path))
        known = {_dict_marker(name) for name in image}
        extra = sorted({m for _, c in messages for m in _DICT_MARKER.findall(c)} - known)
        if extra:
            raise DataError(f"image marker(s) {', '.join(extra)} without an image ({len(image)} images given)", sample)
        positions.sort()
        return [(marker, path) for _, _, marker, path in positions]
    raise DataError(f"'image' must be a path or a dict name -> path, got {type(image).__name__}", sample)


# --- images ------------------------------------------------------------------------------------------------


def open_image(path: str, sample: str, decode: bool = True) -> Image.Image:
    """Open (and by default fully decode) an image; unreadable or corrupt files raise DataError naming the path."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}", sample) from None
    except _IMAGE_ERRORS as error:
        raise DataError(f"cannot read image {path}: {error}", sample) from None
    return decode_image(image, path, sample) if decode else image


def decode_image(image: Image.Image, path: str, sample: str) -> Image.Image:
    """Decode an image opened by `open_image(decode=False)`. Opening succeeds on truncated files (header only):
    decoding is what catches corrupt bytes, raised as DataError naming the path."""
    try:
        image.load()
        return image
    except _IMAGE_ERRORS as error:
        image.close()
        raise DataError(f"cannot read image {path}: {error}", sample) from None


_IMAGE_ERRORS = (OSError, Image.UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)


# --- text --------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids and labels of a (possibly truncated) conversation, and what was kept."""

    input_ids: list[int]
    labels: list[int]
    kept_images: int  # the first `kept_images` images of the record (markers in kept turns)
    dropped_turns: int  # messages dropped from the end
    full_length: int  # length before truncation


@dataclass(frozen=True)
class TrainingTemplate:
    """A version's conversation format as training writes it: the version's published chat template
    (`ModelVersion.chat_template`) for a conversation that ends with an answer, without the generation prompt.

    A turn is `header` ("{role}" standing for the role, or for its `role_markers` entry), the content (stripped
    when `strips_content`, as the template trims it), `end_of_turn` (for a non-answer turn `prompt_end_of_turn`
    where that is set) and `after_turn`. A conversation without a system message gets `default_system` as one
    when the template inserts it; a template without `has_system` refuses system messages. Labels: each
    answer's content and its `end_of_turn`. Without `history_end_of_turn` (the published chat writes an earlier
    answer without its end of turn), only the last answer is followed by `end_of_turn` (a single token); an
    earlier one is followed directly by the next turn, whose first token gets `end_of_turn` as its label, so that
    the model still learns to stop after every answer.
    """

    header: str
    end_of_turn: str
    special_tokens: tuple[str, ...]  # the template's tokens the tokenizer must have as single tokens
    after_turn: str = ""
    default_system: str | None = None
    strips_content: bool = False
    role_markers: dict[str, str] | None = None  # what "{role}" stands for, per role (None: the role's name)
    prompt_end_of_turn: str | None = None  # the end of a user/system turn, where it is not `end_of_turn`
    has_system: bool = True
    history_end_of_turn: bool = True

    def header_text(self, role: str) -> str:
        return self.header.format(role=self.role_markers[role] if self.role_markers else role)

    def end_text(self, role: str) -> str:
        end = self.end_of_turn if role == "assistant" or self.prompt_end_of_turn is None else self.prompt_end_of_turn
        return end + self.after_turn


# The training template of each version, by its llm_type (the upstream finetune's name for the format).
TRAINING_TEMPLATES: dict[str, TrainingTemplate] = {
    # MiniCPM-Llama3-V-2.5: Llama-3 headers; the published template trims every content.
    "llama3": TrainingTemplate(
        header="<|start_header_id|>{role}<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        strips_content=True,
    ),
    # MiniCPM-V 2.6: ChatML; the published template inserts this system turn before a first non-system message.
    "qwen": TrainingTemplate(
        header="<|im_start|>{role}\n",
        end_of_turn="<|im_end|>",
        special_tokens=("<|im_start|>", "<|im_end|>"),
        after_turn="\n",
        default_system="You are a helpful assistant.",
    ),
    # MiniCPM-V 2.0: what its chat() writes (BOS, then `<用户>` / `<AI>` + content per turn, contents as written),
    # with EOS closing the last answer, the token generation stops on (earlier answers have it as the label of the
    # next turn's first token, as upstream's finetune does). Upstream's finetune encodes the sequence without
    # BOS; training follows inference here. No system turn.
    "minicpm": TrainingTemplate(
        header="{role}",
        end_of_turn="</s>",
        special_tokens=("<用户>", "<AI>", "</s>"),
        role_markers={"user": "<用户>", "assistant": "<AI>"},
        prompt_end_of_turn="",
        has_system=False,
        history_end_of_turn=False,
    ),
}


def version_of_tokenizer(tokenizer) -> ModelVersion:
    """The implemented version whose chat format the tokenizer has (NotImplementedError for any other)."""
    detected = detect_llm_type(tokenizer)
    version = next((v for v in VERSIONS.values() if v.llm_type == detected), None)
    if version is None or version.llm_type not in TRAINING_TEMPLATES:
        supported = ", ".join(f"'{v.llm_type}' (MiniCPM-V {v.name})" for v in VERSIONS.values())
        raise NotImplementedError(f"llm_type {detected!r} is not supported by finetune.dataset; supported: {supported}")
    return version


class ConversationEncoder:
    """A version's training template (`TrainingTemplate`), tokenized piecewise so label spans and image blocks are
    known exactly; the version (`ModelVersion`) is the one whose chat format the tokenizer has.

    Per message: header, content with each image's placeholder (the version's `image_placeholder`, image ids
    counting the sample's images in order) at its marker, or before the first user text followed by "\\n" when
    there is no marker (what the published chat() does), then the end of turn. BOS first where the version adds
    one; the template's default system turn when the conversation has no system message. Labels: every
    assistant content token and its end of turn; -100 elsewhere.

    Tokenizing piecewise equals tokenizing the whole string as inference does: the text between two special
    tokens is tokenized in one piece (a turn's header with its content), and the tokenizer splits at special
    tokens. An answer's content is tokenized apart from its header, as the model generates it after the header.
    Placeholder ids are built from the placeholder text with one `<unk>` per block (cached per grid and image
    index) after checking once that the tokenizer gives the same ids for the full placeholder text.
    """

    def __init__(self, tokenizer, settings: SliceSettings, llm_type: str | None = None):
        detected = detect_llm_type(tokenizer)
        if llm_type is not None and llm_type != detected:
            chat_tokens = {v.llm_type: v.chat_token for v in VERSIONS.values()}
            evidence = f"has {chat_tokens[detected]}" if detected in chat_tokens else "has none of its chat tokens"
            raise ValueError(
                f"llm_type={llm_type!r} but the tokenizer is a {detected!r} tokenizer ({evidence}): "
                "pass the matching model"
            )
        self.version = version_of_tokenizer(tokenizer)
        self.template = TRAINING_TEMPLATES[self.version.llm_type]
        self.llm_type = detected
        self.tokenizer = tokenizer
        self.settings = settings
        self.tokens = SpecialTokens.from_tokenizer(tokenizer)
        vocab = tokenizer.get_vocab()
        required = (*self.template.special_tokens, *(tag for block in self.version.feature_blocks for tag in block))
        missing = [token for token in required if token not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks {', '.join(missing)}: not a MiniCPM-V {self.version.name} tokenizer")
        self.feature_blocks = self.tokens.feature_block_ids(self.version)  # (opening ids, closing ids)
        self.unk_token = tokenizer.unk_token or "<unk>"
        # Refused as text in records (parse_record); with the template's role markers where they are ordinary
        # vocabulary entries (MiniCPM-V 2.0's <用户>/<AI>), which would start a role all the same.
        self.control_tokens = control_token_pattern(tokenizer, (self.template.role_markers or {}).values())
        self.after_turn = self.text_ids(self.template.after_turn)
        # The end of turn only the last answer is written with (none: every answer has it in its message ids).
        self.last_end = [] if self.template.history_end_of_turn else self.text_ids(self.template.end_of_turn)
        if len(self.last_end) > 1:
            raise ValueError(f"end of turn {self.template.end_of_turn!r} is not a single token of the tokenizer")
        self._headers: dict[str, list[int]] = {}
        self._placeholders: dict[tuple, list[int]] = {}
        self._check_placeholder_tokenization()
        default_system = self.template.default_system
        self._default_system = self.message_ids("system", default_system, {}) if default_system else []

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def header_ids(self, role: str) -> list[int]:
        if role not in self._headers:
            self._headers[role] = self.text_ids(self.template.header_text(role))
        return self._headers[role]

    def prefix_ids(self, record: Record) -> list[int]:
        """What precedes the record's messages: BOS where the version adds one, then the template's default
        system turn when the record has no system message."""
        bos = [self.tokens.bos] if self.version.adds_bos else []
        return bos + (self._default_system if record.messages[0][0] != "system" else [])

    def placeholder_ids(self, plan: SliceGrid, image_index: int = 0) -> list[int]:
        """Ids of the version's placeholder of image number `image_index` (from 0 in its sample) with grid `plan`:
        cached per grid and image id, built from the text with one unk per block (no 1000-token tokenize)."""
        key = (plan.grid, image_index if self.version.uses_image_id else 0)
        if key not in self._placeholders:
            unk, query_num = self.tokens.unk, self.settings.query_num
            ids: list[int] = []
            for token in self.text_ids(self.version.image_placeholder(plan, 1, self.unk_token, image_index)):
                ids += [unk] * query_num if token == unk else [token]
            self._placeholders[key] = ids
        return self._placeholders[key]

    def _check_placeholder_tokenization(self) -> None:
        """The model needs exactly query_num <unk> per block: make sure the tokenizer agrees with our ids."""
        plan, image_index = SliceGrid((14, 14), (2, 2), (14, 14)), 1
        text = self.version.image_placeholder(plan, self.settings.query_num, self.unk_token, image_index)
        ids = self.placeholder_ids(plan, image_index)
        if self.text_ids(text) != ids or ids.count(self.tokens.unk) != self.settings.query_num * plan.num_views:
            tags = ", ".join(tag for block in self.version.feature_blocks for tag in block)
            raise ValueError(
                f"the tokenizer does not tokenize the image placeholder as single special tokens ({tags}, "
                f"{self.unk_token}): each block would not hold query_num={self.settings.query_num} {self.unk_token} "
                "tokens"
            )

    def image_bounds(self, input_ids: np.ndarray) -> np.ndarray:
        """[n, 2] (start + 1, end) of every image-feature block of the version (`feature_blocks`), in order."""
        return image_bound_array(input_ids, *self.feature_blocks)

    def message_ids(self, role: str, content: str, images: dict[str, tuple[int, SliceGrid]]) -> list[int]:
        """Header + content (placeholders at their markers) + end of turn for one message.

        `images` maps the markers present in this message to (image index in the sample, grid); a single image
        without marker is passed under the key "" and goes before the text, followed by "\\n" (upstream
        behaviour, and the published chat()'s). Text runs between placeholders are tokenized whole, the header
        with them except an answer's (see the class docstring).
        """
        if self.template.strips_content:
            content = content.strip()
        parts: list[str | list[int]] = [
            self.header_ids(role) if role == "assistant" else self.template.header_text(role)
        ]
        if "" in images:
            parts += [self.placeholder_ids(images[""][1], images[""][0]), "\n"]
        markers = {m: image for m, image in images.items() if m}
        if markers:
            pattern = "(" + "|".join(re.escape(m) for m in markers) + ")"
            for piece in re.split(pattern, content):
                parts.append(self.placeholder_ids(markers[piece][1], markers[piece][0]) if piece in markers else piece)
        else:
            parts.append(content)
        parts.append(self.template.end_text(role))
        ids: list[int] = []
        text = ""
        for part in parts:
            if isinstance(part, str):
                text += part
            else:
                ids += self.text_ids(text) + part
                text = ""
        return ids + self.text_ids(text)

    def encode(self, record: Record, plans: Sequence[SliceGrid], max_length: int | None = None) -> Encoded:
        """Ids and labels for `record` whose images have grids `plans` (same order as record.images).

        Over max_length: drop whole trailing user+assistant pairs while at least one complete exchange remains;
        raises SampleTooLong when even the first exchange does not fit. Image blocks are never cut because only
        whole messages are dropped; images whose markers are in dropped turns are dropped with them (they are
        the last ones, so the kept images keep their ids).
        """
        if not self.template.has_system and record.messages[0][0] == "system":
            raise DataError(
                f"MiniCPM-V {self.version.name} has no system turn (its template is {self.template.header_text('user')}"
                f"/{self.template.header_text('assistant')} only): remove the system message",
                record.id,
            )
        # Which message holds which image (record.images is in order of appearance, so kept images are a prefix).
        per_message: list[dict[str, tuple[int, SliceGrid]]] = [{} for _ in record.messages]
        for index, ((marker, _), plan) in enumerate(zip(record.images, plans, strict=True)):
            holder = next((i for i, (_, c) in enumerate(record.messages) if marker in c), None)
            if holder is None:  # single image without marker: before the first user text
                per_message[_first_user(record)][""] = (index, plan)
            else:
                per_message[holder][marker] = (index, plan)
        pieces = [
            (self.message_ids(role, content, per_message[i]), role == "assistant")
            for i, (role, content) in enumerate(record.messages)
        ]
        if self.last_end:  # answers without their end of turn: only the last kept one gets it back, below
            pieces = [(ids[: len(ids) - len(self.last_end)] if answer else ids, answer) for ids, answer in pieces]
        prefix = self.prefix_ids(record)
        image_count = [len(m) for m in per_message]
        lengths = [len(ids) for ids, _ in pieces]
        fixed = len(prefix) + len(self.last_end)
        full_length = fixed + sum(lengths)
        keep = len(pieces)
        if max_length is not None and full_length > max_length:
            start = 1 if record.messages[0][0] == "system" else 0
            minimum = fixed + sum(lengths[: start + 2])
            if minimum > max_length:
                raise SampleTooLong(record.id, full_length, minimum, max_length)
            while fixed + sum(lengths[:keep]) > max_length:
                keep -= 2  # one user+assistant pair
        input_ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
        header, after = len(self.header_ids("assistant")), len(self.after_turn)
        follows_answer = False  # the previous piece is an answer written without its end of turn
        for ids, is_assistant in pieces[:keep]:
            if is_assistant:
                piece_labels = [IGNORE_INDEX] * header + ids[header : len(ids) - after] + [IGNORE_INDEX] * after
            else:
                piece_labels = [IGNORE_INDEX] * len(ids)
            if follows_answer:
                piece_labels[0] = self.last_end[0]
            input_ids += ids
            labels += piece_labels
            follows_answer = is_assistant and bool(self.last_end)
        input_ids += self.last_end
        labels += self.last_end
        return Encoded(input_ids, labels, sum(image_count[:keep]), len(pieces) - keep, full_length)


def _first_user(record: Record) -> int:
    return next(i for i, (role, _) in enumerate(record.messages) if role == "user")


# --- whole samples -----------------------------------------------------------------------------------------


@dataclass
class PreparedSample:
    """What training feeds for one sample, plus what check_data reports."""

    id: str
    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, -100 where not trained
    pixel_values: list[torch.Tensor]  # uint8 views [3, p, L*p] of the kept images, in order (the model normalises)
    tgt_sizes: torch.Tensor  # [n, 2] (h, w) in patches
    image_bound: torch.Tensor  # [n, 2]
    status: str  # "kept" or "truncated"
    full_length: int
    dropped_turns: int = 0
    views_per_image: list[int] = field(default_factory=list)
    num_images: int = 0  # images of the record (kept or not)

    def as_item(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "input_ids": self.input_ids,
            "labels": self.labels,
            "pixel_values": self.pixel_values,
            "tgt_sizes": self.tgt_sizes,
            "image_bound": self.image_bound,
        }


def prepare_sample(
    record: Record,
    encoder: ConversationEncoder,
    max_length: int | None = None,
    load_pixels: bool = True,
    decode_all: bool = False,
) -> PreparedSample:
    """Record -> model inputs. Grids come from image sizes (header only), so dropped images are never decoded.

    With load_pixels=False no pixels are computed (validation: lengths and bounds only); decode_all=True still
    decodes every image of the record to catch corrupt files, including images of turns that truncation drops.
    """
    settings = encoder.settings
    opened: list[Image.Image] = []  # header-only opens, decoded later if kept: the file is parsed once
    try:
        for _, path in record.images:
            opened.append(open_image(path, record.id, decode=False))
            if decode_all:
                decode_image(opened[-1], path, record.id)
        plans = [plan_slices(image.size, settings) for image in opened]
        encoded = encoder.encode(record, plans, max_length)
        pixel_values: list[torch.Tensor] = []
        if load_pixels:
            for (_, path), image, plan in zip(record.images[: encoded.kept_images], opened, plans, strict=False):
                strips, _ = view_strips(
                    decode_image(image, path, record.id), settings, plan
                )  # uint8: the model normalises on its device
                pixel_values += strips
    finally:
        for image in opened:
            image.close()
    # The tail in numpy, tensors made by torch.from_numpy only (no copy): torch's per-op overhead is tens of us.
    input_ids = np.array(encoded.input_ids, dtype=np.int64)
    bounds = encoder.image_bounds(input_ids)
    tgt_sizes = view_patch_sizes(plans[: encoded.kept_images], settings.patch_size)
    # Invariants the model relies on (cheap; a failure here is a bug, not bad data).
    if len(bounds) != len(tgt_sizes) or bool((bounds[:, 1] - bounds[:, 0] != settings.query_num).any()):
        raise AssertionError(f"sample {record.id}: image_bound {bounds.tolist()} does not match {len(tgt_sizes)} views")
    status = "truncated" if encoded.dropped_turns else "kept"
    if encoded.dropped_turns:
        logger.info(
            "sample %s: truncated from %d to %d tokens (dropped the last %d turns, %d images)",
            record.id,
            encoded.full_length,
            len(input_ids),
            encoded.dropped_turns,
            len(plans) - encoded.kept_images,
        )
    return PreparedSample(
        id=record.id,
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(np.array(encoded.labels, dtype=np.int64)),
        pixel_values=pixel_values,
        tgt_sizes=tgt_sizes,
        image_bound=torch.from_numpy(bounds),
        status=status,
        full_length=encoded.full_length,
        dropped_turns=encoded.dropped_turns,
        views_per_image=[p.num_views for p in plans],
        num_images=len(plans),
    )


Split = Literal["train", "eval"]


@dataclass(frozen=True)
class DataSettings:
    """How a run's data files become samples: the one description of them that training (built from its command
    line by `finetune.arguments.data_settings_from_arguments`), `python -m finetune.check_data` (from its flags),
    the planner and the validation workers share. Plain values only, so that it pickles to worker processes
    that build the dataset again (where fork is unavailable).

    The slice fields left None keep the checkpoint's values; `resolve_settings` is where they apply.
    """

    data_path: str  # a .json / .jsonl file, or a mix "a.json:0.7,b.jsonl:0.3" (parse_data_spec, MixedSource)
    eval_data_path: str | None = None  # held-out data in the same format
    image_folder: str | None = None  # looked up first for relative image paths, then the data file's folder
    model_max_length: int | None = 2048  # longer samples lose whole trailing turns, or are skipped; None: no limit
    max_slice_nums: int | None = None  # overrides the checkpoint's
    scale_resolution: int | None = None  # overrides the checkpoint's
    slicing: bool | None = None  # False: every image is one view; None: the checkpoint's slice_mode
    llm_type: str | None = None  # must match the tokenizer's; None: detected from it
    seed: int = 42  # seed of the ratio sampling when mixing files

    def data_spec(self, split: Split) -> str | None:
        """The data spec of the "train" or "eval" split (None when there is no eval data)."""
        return self.data_path if split == "train" else self.eval_data_path


def resolve_settings(config: Any, settings: DataSettings) -> SliceSettings:
    """The slice settings images are cut by: the checkpoint's with the data settings' overrides (max_slice_nums,
    scale_resolution, slicing; None keeps the checkpoint's value). The one place those overrides are applied.

    `config` is this project's MiniCPMVConfig or the hub's remote-code one (--trust_remote_code): only fields
    both expose are read (slice_settings_from_config). A benchmark's synthetic set, which has no checkpoint,
    passes its SliceSettings instead.
    """
    base = config if isinstance(config, SliceSettings) else slice_settings_from_config(config)
    overrides = {
        name: getattr(settings, name)
        for name in ("max_slice_nums", "scale_resolution", "slicing")
        if getattr(settings, name) is not None
    }
    return dataclasses.replace(base, **overrides)


# --- the Dataset -------------------------------------------------------------------------------------------


class SupervisedDataset(torch.utils.data.Dataset):
    """Samples from one or more data files, prepared on access (lazily: JSONL files are never loaded whole).

    `indices` restricts the dataset to those mixed indices: pass the usable indices of the validation
    (`finetune.validation.validate_built`) so that samples too long to fit are excluded up front (a Dataset item
    cannot vanish at training time). Accessing a bad or too-long sample raises (DataError / SampleTooLong):
    nothing is silently dropped.
    """

    def __init__(
        self,
        settings: DataSettings,
        tokenizer,
        config: Any,
        *,
        split: Split = "train",
        indices: Sequence[int] | None = None,
    ):
        """`split` picks which of the settings' data specs is read; `config` is the model's config, whose slice
        settings the settings' overrides apply to (resolve_settings; a set made without a checkpoint passes
        SliceSettings)."""
        spec = settings.data_spec(split)
        if spec is None:
            raise ValueError(f"the data settings have no {split} data")
        self.settings = settings
        self.split = split
        self.spec = spec
        self.slice_settings = resolve_settings(config, settings)
        self.encoder = ConversationEncoder(tokenizer, self.slice_settings, settings.llm_type)
        self.source = MixedSource(spec, seed=settings.seed)
        self.indices = list(indices) if indices is not None else None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.source)

    def mixed_index(self, index: int) -> int:
        return self.indices[index] if self.indices is not None else index

    def subset(self, indices: Sequence[int]) -> SupervisedDataset:
        """The same data restricted to dataset positions `indices` (sources and encoder shared, files not re-read)."""
        restricted = copy.copy(self)
        restricted.indices = [self.mixed_index(i) for i in indices]
        return restricted

    def record(self, index: int) -> Record:
        """The validated record at dataset position `index` (DataError when bad)."""
        mixed = self.mixed_index(index)
        location = self.source.location(mixed)
        return parse_record(
            self.source[mixed],
            location,
            self.source.base_dir(mixed),
            self.settings.image_folder,
            control_tokens=self.encoder.control_tokens,
        )

    def prepare(self, index: int, load_pixels: bool = True, decode_all: bool = False) -> PreparedSample:
        return prepare_sample(self.record(index), self.encoder, self.settings.model_max_length, load_pixels, decode_all)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.prepare(index).as_item()


def duplicate_ids(ids: Counter, warn: bool = True) -> list[str]:
    """Ids used more than once, sorted. Duplicates are allowed (with `warn`, a warning): they make --show/--dump
    and logs ambiguous."""
    duplicates = sorted(name for name, count in ids.items() if count > 1)
    if duplicates and warn:
        logger.warning(
            "duplicate sample ids (%d): %s", len(duplicates), ", ".join(f"{d} (x{ids[d]})" for d in duplicates[:50])
        )
    return duplicates


# --- collation ---------------------------------------------------------------------------------------------


class DataCollator:
    """Per-sample items -> the batch contract of MiniCPMV.forward and the trainer.

    Padding mode (packing=False), right padding:
        {"data": {"input_ids" [B,T], "position_ids" [B,T] (0..n-1 then 0), "pixel_values" B lists of
        [3,14,L*14], "tgt_sizes" B x [n_i,2], "image_bound" B x [m_i,2]}, "labels" [B,T] (-100 on padding),
        "attention_mask" [B,T] (0 on padding)}
    Packing mode (packing=True): every sample of the batch in ONE row (B=1), position_ids restarting at 0 per
    sample, no attention_mask (the LLM detects packed sequences from position_ids); pixel_values, tgt_sizes and
    image_bound keep one entry PER ORIGINAL SAMPLE (image_bound relative to the sample's start), with
    data["row_of_sample"] (all 0) and data["sample_offsets"] (start of each sample in the row). Per-sample view
    lists keep each sample's vision features equal to its features when alone (the model pads strips per entry).
    """

    def __init__(
        self,
        pad_token_id: int,
        packing: bool = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("DataCollator: empty batch")
        for item in items:
            if len(item["input_ids"]) != len(item["labels"]):
                raise ValueError(f"sample {item.get('id')}: input_ids and labels differ in length")
        return self._pack(items) if self.packing else self._pad(items)

    def _check_length(self, length: int, what: str) -> None:
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"DataCollator: {what} is {length} tokens, over max_length={self.max_length}")

    def _pad(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(item["input_ids"]) for item in items]
        for item, n in zip(items, lengths, strict=True):
            self._check_length(n, f"sample {item.get('id')}")
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            if self.max_length is not None:
                width = min(width, max(self.max_length, max(lengths)))
        batch = len(items)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.int64)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.int64)
        attention = torch.zeros((batch, width), dtype=torch.int64)
        positions = torch.zeros((batch, width), dtype=torch.int64)
        for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention[row, :n] = 1
            positions[row, :n] = torch.arange(n)
        return {
            "data": {
                "input_ids": input_ids,
                "position_ids": positions,
                "pixel_values": [list(item["pixel_values"]) for item in items],
                "tgt_sizes": [_sizes(item["tgt_sizes"]) for item in items],
                "image_bound": [_sizes(item["image_bound"]) for item in items],
            },
            "labels": labels,
            "attention_mask": attention,
        }

    def _pack(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(item["input_ids"]) for item in items]
        self._check_length(sum(lengths), "the packed row")
        offsets = torch.tensor([0] + list(np.cumsum(lengths)[:-1]), dtype=torch.int64)
        return {
            "data": {
                "input_ids": torch.cat([item["input_ids"] for item in items])[None],
                "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
                "pixel_values": [list(item["pixel_values"]) for item in items],
                "tgt_sizes": [_sizes(item["tgt_sizes"]) for item in items],
                "image_bound": [_sizes(item["image_bound"]) for item in items],
                "row_of_sample": torch.zeros(len(items), dtype=torch.int64),
                "sample_offsets": offsets,
            },
            "labels": torch.cat([item["labels"] for item in items])[None],
        }


def _sizes(value: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.int64).reshape(-1, 2)
