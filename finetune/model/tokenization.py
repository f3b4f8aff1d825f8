"""The MiniCPM-V tokenizer: tokenizer.json loaded as it is, special tokens looked up by their strings.

The hub's tokenizer class defines `__init__`, which makes transformers 5 rebuild the backend without
tokenizer.json's pre-tokenizer and decoder (every space and newline vanishes). Ours defines no `__init__`, so
the file is used unchanged. A checkpoint without tokenizer.json but with vocab.json + merges.txt (the published
MiniCPM-V 2.6) gets the byte-level BPE Qwen2 builds from those two files (`byte_level_bpe`), its special tokens
then added at the ids tokenizer_config.json gives them. Everything else in the project reads special tokens
through `SpecialTokens`, which works on this class, on the hub class and on a plain PreTrainedTokenizerFast over
the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.utils import cached_file

from .versions import VERSIONS, ModelVersion

# Qwen2's pre-tokenization split (contractions, letter runs, single digits, punctuation, newlines, spaces).
QWEN2_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """merges.txt -> its merge pairs in rank order (a leading `#version` line and blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    pairs = []
    for line in lines:
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        pairs.append((left, right))
    return pairs


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """Qwen2's tokenizer pipeline over the given BPE vocabulary and merges: NFC, the Qwen2 regex split, byte-level
    symbols (no prefix space), byte-level decoding; no special tokens and no BOS post-processing."""
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )  # fmt: skip
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    """Same name and string attributes as the hub class (`im_start`, `slice_start`, ...), no `__init__`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """PreTrainedTokenizerFast.from_pretrained; where the checkpoint has no tokenizer.json but vocab.json and
        merges.txt, the backend is `byte_level_bpe` over those files."""
        if "tokenizer_object" not in kwargs and "tokenizer_file" not in kwargs:
            backend = _bpe_from_vocab_files(pretrained_model_name_or_path, kwargs)
            if backend is not None:
                kwargs["tokenizer_object"] = backend
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    im_start, im_end = "<image>", "</image>"
    ref_start, ref_end = "<ref>", "</ref>"
    box_start, box_end = "<box>", "</box>"
    quad_start, quad_end = "<quad>", "</quad>"
    point_start, point_end = "<point>", "</point>"
    slice_start, slice_end = "<slice>", "</slice>"
    eot_token = "<|eot_id|>"

    @property
    def im_start_id(self) -> int:
        return self.convert_tokens_to_ids(self.im_start)

    @property
    def im_end_id(self) -> int:
        return self.convert_tokens_to_ids(self.im_end)

    @property
    def slice_start_id(self) -> int:
        return self.convert_tokens_to_ids(self.slice_start)

    @property
    def slice_end_id(self) -> int:
        return self.convert_tokens_to_ids(self.slice_end)

    @property
    def eot_id(self) -> int:
        return self.convert_tokens_to_ids(self.eot_token)


class LlamaTokenizerWrapper(MiniCPMVTokenizerFast):
    """MiniCPM-V 2.0's tokenizer under the name its tokenizer_config.json gives (`tokenizer_class`): registered
    with AutoTokenizer under that name, so a 2.0 directory, also one without config.json (an adapter), loads
    tokenizer.json natively instead of asking for the hub's remote code (which imports timm and torchvision)."""


def _bpe_from_vocab_files(path, kwargs: dict) -> Tokenizer | None:
    """`byte_level_bpe` over the checkpoint's vocab.json + merges.txt when it has those and no tokenizer.json."""
    lookup = {
        key: kwargs[key]
        for key in ("cache_dir", "revision", "subfolder", "local_files_only", "token", "force_download")
        if key in kwargs
    }

    def find(name: str) -> str | None:
        return cached_file(
            path, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
            **lookup,
        )  # fmt: skip

    if find("tokenizer.json") is not None:
        return None
    vocab_file, merges_file = find("vocab.json"), find("merges.txt")
    if vocab_file is None or merges_file is None:
        return None
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    return byte_level_bpe(vocab, read_merges(merges_file))


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the data path and generation need, resolved from a tokenizer by string."""

    bos: int
    eos: int
    unk: int
    pad: int
    start_header: int | None
    end_header: int | None
    eot: int | None
    image_start: int
    image_end: int
    slice_start: int
    slice_end: int
    end_of_text: int | None = None  # Qwen2's <|endoftext|> (MiniCPM-V 2.6's pad; generation stops on it too)
    image_id_start: int | None = None  # <image_id> (MiniCPM-V 2.6)
    image_id_end: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        vocab = tokenizer.get_vocab()

        def required(token: str) -> int:
            if token not in vocab:
                raise ValueError(f"tokenizer has no {token!r} token: not a MiniCPM-V tokenizer")
            return vocab[token]

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab.get("!", 0)
        return cls(
            bos=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else required("<|begin_of_text|>"),
            eos=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else required("<|end_of_text|>"),
            unk=required("<unk>"),
            pad=pad_id,
            start_header=vocab.get("<|start_header_id|>"),
            end_header=vocab.get("<|end_header_id|>"),
            eot=vocab.get("<|eot_id|>"),
            image_start=required("<image>"),
            image_end=required("</image>"),
            slice_start=required("<slice>"),
            slice_end=required("</slice>"),
            end_of_text=vocab.get("<|endoftext|>"),
            image_id_start=vocab.get("<image_id>"),
            image_id_end=vocab.get("</image_id>"),
        )

    @property
    def stop_ids(self) -> list[int]:
        """The ids generation stops on: eos, and <|eot_id|> (2.5) or <|endoftext|> (2.6) where the vocabulary
        has them."""
        extra = [token for token in (self.eot, self.end_of_text) if token is not None and token != self.eos]
        return [self.eos] + extra

    def feature_block_ids(self, version: ModelVersion) -> tuple[list[int], list[int]]:
        """(opening ids, closing ids) of the version's image-feature blocks (`ModelVersion.feature_blocks`), for
        `image_processing.image_bounds`."""
        ids = {"<image>": self.image_start, "</image>": self.image_end}
        ids.update({"<slice>": self.slice_start, "</slice>": self.slice_end})
        return [ids[start] for start, _ in version.feature_blocks], [ids[end] for _, end in version.feature_blocks]


def detect_llm_type(tokenizer) -> str:
    """The upstream finetune's llm_type of the version whose chat tokens the tokenizer has ('llama3': the Llama-3
    header tokens of MiniCPM-Llama3-V-2.5; 'qwen': ChatML's <|im_start|> of MiniCPM-V 2.6), else 'minicpm'
    (MiniCPM-V 2.0, whose `<用户>` marker is its `chat_token`; the fallback for a vocabulary with none of them)."""
    vocab = tokenizer.get_vocab()
    return next((version.llm_type for version in VERSIONS.values() if version.chat_token in vocab), "minicpm")
