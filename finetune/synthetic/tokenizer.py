"""The demo tokenizer: a Llama-3-style byte-level BPE trained on a small corpus (the bundled demo texts by default).

All 256 Llama-3 / MiniCPM-Llama3-V-2.5 special tokens follow the ordinary vocabulary in the real order (as the
real tokenizer has them at 128000..128255), so code that looks special tokens up by string or by relative
position behaves as with the real tokenizer. The files written are the published ones (tokenizer.json,
tokenizer_config.json, special_tokens_map.json) and load with `AutoTokenizer` once `finetune` is imported.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from finetune.demo_data import demo_corpus
from finetune.model.tokenization import MiniCPMVTokenizerFast
from finetune.model.versions.minicpm_llama3_v2_5 import CHAT_TEMPLATE

# --- the real tokenizer's special tokens ------------------------------------------------------------------

# Llama-3 reserves ids 128000..128255; MiniCPM-Llama3-V-2.5 renamed reserved_0 to <unk> and reserved_5..16 to
# its image / grounding tags. Order = tokenizer_config.json's added_tokens_decoder (ids 128000 + k).
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<unk>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
    9: "<|eot_id|>", 10: "<image>", 11: "</image>", 12: "<ref>", 13: "</ref>", 14: "<box>", 15: "</box>",
    16: "<quad>", 17: "</quad>", 18: "<point>", 19: "</point>", 20: "<slice>", 21: "</slice>",
}  # fmt: skip
_RESERVED_NUMBER = {3: 1, 4: 2, 5: 3, 8: 4}  # ids below 10 that stay reserved; from 10 on: k - 5
SPECIAL_TOKENS: tuple[str, ...] = tuple(
    _NAMED_SPECIALS.get(k, f"<|reserved_special_token_{_RESERVED_NUMBER.get(k, k - 5)}|>") for k in range(256)
)
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "<unk>", "!"

# Llama-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3-8B), followed by byte-level mapping.
LLAMA3_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --- tokenizer ----------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map; its iteration order gives "!" first (id 0 in Llama-3)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])  # fmt: skip


def train_bpe_merges(
    corpus: Iterable[str], vocab: dict[str, int], max_vocab: int, pre_tokenizer=None
) -> list[tuple[str, str]]:
    """Plain BPE training, deterministic: most frequent adjacent pair first, ties broken by the pair itself.

    Adds each merged symbol to `vocab` (in place) until it holds `max_vocab` entries or no pair is left. Words
    come from `pre_tokenizer` (a `tokenizers` pre-tokenizer; default: Llama-3's split + byte-level mapping).
    """
    pre_tokenizer = pre_tokenizer if pre_tokenizer is not None else _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in corpus:
        for piece, _ in pre_tokenizer.pre_tokenize_str(text):
            counts[piece] += 1
    words = [[list(word), count] for word, count in sorted(counts.items())]
    merges: list[tuple[str, str]] = []
    while len(vocab) < max_vocab:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in vocab:
            vocab[merged] = len(vocab)
        for entry in words:
            symbols = entry[0]
            if len(symbols) < 2:
                continue
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            entry[0] = out
    return merges


def build_backend_tokenizer(corpus: list[str] | None = None, vocab_size: int = 1024):
    """The `tokenizers.Tokenizer`: 256 byte symbols, merges up to vocab_size - 256, then the 256 specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (256 byte symbols + 256 special tokens), got {vocab_size}")
    if corpus is None:
        corpus = demo_corpus()
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    merges = train_bpe_merges(corpus, vocab, vocab_size - len(SPECIAL_TOKENS))
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for t in SPECIAL_TOKENS
        ]
    )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    if bos_id != len(vocab):
        raise AssertionError(f"special tokens did not land right after the vocabulary ({bos_id} != {len(vocab)})")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A:0",
            pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos_id)],
        ),
    ])  # fmt: skip
    return tokenizer


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def build_tokenizer(
    out_dir: str | Path | None,
    corpus: list[str] | None = None,
    vocab_size: int = 1024,
    model_max_length: int = 8192,
    version: str = "2.5",
) -> MiniCPMVTokenizerFast:
    """Build, save (tokenizer.json, tokenizer_config.json, special_tokens_map.json) and load back the tokenizer
    of MiniCPM-V `version` ("2.5" here; "2.6": `tokenizer_v2_6.build_tokenizer_v2_6`, "2.0":
    `tokenizer_v2.build_tokenizer_v2`, which ignore model_max_length and write the published value).

    `corpus` defaults to the demo dataset's texts. With `out_dir=None` the files go to a temporary directory.
    The special tokens get ids base .. base+255, base = 256 + number of merges (at most vocab_size - 256).
    """
    if version == "2.6":
        from .tokenizer_v2_6 import build_tokenizer_v2_6

        return build_tokenizer_v2_6(out_dir, corpus, vocab_size)
    if version == "2.0":
        from .tokenizer_v2 import build_tokenizer_v2

        return build_tokenizer_v2(out_dir, corpus, vocab_size)
    if version != "2.5":
        raise ValueError(
            f"version must be '2.5', '2.6' or '2.0' (the MiniCPM-V versions with a demo tokenizer), got {version!r}"
        )
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return build_tokenizer(tmp, corpus, vocab_size, model_max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = build_backend_tokenizer(corpus, vocab_size)
    backend.save(str(out_dir / "tokenizer.json"))
    base = backend.token_to_id(BOS_TOKEN)
    tokenizer_config = {
        # As published. Without it transformers 5 maps model_type "minicpmv" to its generic TokenizersBackend
        # whenever config.json sits next to the tokenizer; with it, `import finetune` gives MiniCPMVTokenizerFast
        # (the hub code it names is absent: loading without trust_remote_code uses the native class).
        "auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]},
        "added_tokens_decoder": {
            str(base + k): dict(_token_entry(t), special=True) for k, t in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        # The published file says True; transformers 5 ignores it for BPE anyway, and False keeps decode exact.
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "padding_side": "right",
        "tokenizer_class": "MiniCPMVTokenizerFast",
        "truncation_side": "right",
        "unk_token": UNK_TOKEN,
    }
    special_tokens_map = {
        "bos_token": _token_entry(BOS_TOKEN),
        "eos_token": _token_entry(EOS_TOKEN),
        "pad_token": PAD_TOKEN,
        "unk_token": _token_entry(UNK_TOKEN),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")
    return MiniCPMVTokenizerFast.from_pretrained(str(out_dir))
