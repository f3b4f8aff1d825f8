"""The MiniCPM-V tokenizer: tokenizer.json loaded as it is, special tokens looked up by their strings.

The hub's tokenizer class defines `__init__`, which makes transformers 5 rebuild the backend without
tokenizer.json's pre-tokenizer and decoder (every space and newline vanishes). Ours defines no `__init__`, so
the file is used unchanged. Everything else in the project reads special tokens through `SpecialTokens`, which
works on this class, on the hub class and on a plain PreTrainedTokenizerFast over the same files.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

from .versions import VERSIONS


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    """Same name and string attributes as the hub class (`im_start`, `slice_start`, ...), no `__init__`."""

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
        )

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos] + ([self.eot] if self.eot is not None else [])


def detect_llm_type(tokenizer) -> str:
    """The upstream finetune's llm_type of the version whose chat tokens the tokenizer has ('llama3': the Llama-3
    header tokens of MiniCPM-Llama3-V-2.5), else 'minicpm' (MiniCPM-V 2.0, which finetune.model does not implement)."""
    vocab = tokenizer.get_vocab()
    return next((version.llm_type for version in VERSIONS.values() if version.chat_token in vocab), "minicpm")
