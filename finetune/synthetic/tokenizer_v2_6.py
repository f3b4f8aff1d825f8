"""The demo tokenizer of MiniCPM-V 2.6: a Qwen2-style byte-level BPE trained on a small corpus, with 2.6's tokens.

The published tokenizer (Qwen2's vocabulary, 151,666 ids) has its 23 added tokens after the BPE vocabulary
(`<|endoftext|>` 151643 ... `<|reserved_special_token_5|>` 151665) and `<unk>`, the image feature token, as a
special token *inside* the BPE range (128244, also an entry of vocab.json). This one keeps that layout at demo
size: 256 byte symbols, the merges learnt from the corpus with `<unk>` placed among them at the same relative
position as the real one, then the 23 added tokens in the real order. Its pipeline is Qwen2's (NFC, the Qwen2
split, byte-level symbols without a prefix space, no BOS added), its template ChatML with the default system turn.
The files are the published ones (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
added_tokens.json) with the ids remapped, and load with `AutoTokenizer` once `finetune` is imported.
"""

from __future__ import annotations

import json
import tempfile
import unicodedata
from pathlib import Path

from finetune.demo_data import demo_corpus
from finetune.model.tokenization import QWEN2_SPLIT_PATTERN, MiniCPMVTokenizerFast, byte_level_bpe
from finetune.model.versions.minicpm_v2_6 import CHAT_TEMPLATE

from .tokenizer import bytes_to_unicode, train_bpe_merges

# The published added tokens in id order (151643 + k); `<unk>` is not among them: it lives in the BPE range.
ADDED_TOKENS_V2_6: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>",
    "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    *(f"<|reserved_special_token_{k}|>" for k in range(6)),
)  # fmt: skip
UNK_TOKEN = "<unk>"
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# The published tokenizer_config.json's additional_special_tokens: the added tokens after the chat ones.
ADDITIONAL_SPECIAL_TOKENS = ADDED_TOKENS_V2_6[3:]
# Where the real `<unk>` sits among the learnt merges: (128244 - 256) / (151643 - 256) of the way.
UNK_SHARE = (128244 - 256) / (151643 - 256)
# The published model_max_length (transformers' "no limit" value).
PUBLISHED_MODEL_MAX_LENGTH = int(1e30)
# The smallest tokenizer this layout allows: 256 byte symbols, <unk> and the 23 added tokens, no merges.
MIN_VOCAB_SIZE = 256 + 1 + len(ADDED_TOKENS_V2_6)


def _qwen2_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip


def bpe_vocabulary_v2_6(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(BPE vocabulary with `<unk>` inside it, merges): 256 byte symbols and up to vocab_size - 280 learnt merges
    (NFC-normalised corpus, Qwen2 split), `<unk>` inserted at 256 + round(merges x UNK_SHARE)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte symbols, <unk> and "
            f"{len(ADDED_TOKENS_V2_6)} added tokens), got {vocab_size}"
        )
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    texts = [unicodedata.normalize("NFC", text) for text in corpus]
    merges = train_bpe_merges(texts, vocab, vocab_size - 1 - len(ADDED_TOKENS_V2_6), _qwen2_pre_tokenizer())
    if UNK_TOKEN in vocab:
        raise ValueError(f"the corpus taught the BPE a {UNK_TOKEN!r} symbol: it must stay the image feature token")
    symbols = list(vocab)  # in id order
    unk_id = 256 + round((len(symbols) - 256) * UNK_SHARE)
    symbols.insert(unk_id, UNK_TOKEN)
    return {symbol: index for index, symbol in enumerate(symbols)}, merges


def build_backend_tokenizer_v2_6(corpus: list[str] | None = None, vocab_size: int = 1024):
    """The `tokenizers.Tokenizer`: Qwen2's pipeline (`byte_level_bpe`) over `bpe_vocabulary_v2_6`, `<unk>` made a
    special token at its BPE id, the 23 added tokens after the vocabulary, a byte-level post-processor (no BOS)."""
    from tokenizers import AddedToken, processors

    vocab, merges = bpe_vocabulary_v2_6(demo_corpus() if corpus is None else corpus, vocab_size)
    tokenizer = byte_level_bpe(vocab, merges)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for t in (UNK_TOKEN, *ADDED_TOKENS_V2_6)
        ]
    )
    if tokenizer.token_to_id(ADDED_TOKENS_V2_6[0]) != len(vocab):
        raise AssertionError("the added tokens did not land right after the BPE vocabulary")
    return tokenizer


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def build_tokenizer_v2_6(
    out_dir: str | Path | None, corpus: list[str] | None = None, vocab_size: int = 1024
) -> MiniCPMVTokenizerFast:
    """Build, save (tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json) and load
    back the 2.6 demo tokenizer of `vocab_size` ids at most (fewer when the corpus runs out of pairs).

    `corpus` defaults to the demo dataset's texts; with `out_dir=None` the files go to a temporary directory.
    tokenizer_config.json is the published one (ChatML template, bos <|im_start|>, eos <|im_end|>, pad
    <|endoftext|>, unk <unk>) with this tokenizer's ids."""
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return build_tokenizer_v2_6(tmp, corpus, vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = build_backend_tokenizer_v2_6(corpus, vocab_size)
    backend.save(str(out_dir / "tokenizer.json"))
    ids = {token: backend.token_to_id(token) for token in (UNK_TOKEN, *ADDED_TOKENS_V2_6)}
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): dict(_token_entry(t), special=True) for t in ids},
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": PUBLISHED_MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        # As published: names the hub's class, which `import finetune` serves natively (see tokenizer.py).
        "auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]},
        "tokenizer_class": "MiniCPMVTokenizerFast",
        "unk_token": UNK_TOKEN,
    }
    special_tokens_map = {
        "additional_special_tokens": [_token_entry(t) for t in ADDITIONAL_SPECIAL_TOKENS],
        "bos_token": _token_entry(BOS_TOKEN),
        "eos_token": _token_entry(EOS_TOKEN),
        "pad_token": _token_entry(PAD_TOKEN),
        "unk_token": _token_entry(UNK_TOKEN),
    }
    added_tokens = {token: ids[token] for token in sorted(ADDED_TOKENS_V2_6)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")
    (out_dir / "added_tokens.json").write_text(json.dumps(added_tokens, indent=2) + "\n")
    return MiniCPMVTokenizerFast.from_pretrained(str(out_dir))
