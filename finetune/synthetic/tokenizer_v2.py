"""The demo tokenizer of MiniCPM-V 2.0: a Llama-style SentencePiece-BPE with 2.0's special-token layout.

The published tokenizer is a SentencePiece model (`tokenizer.model`, 122,753 pieces) that is not available here.
This one keeps what the suite reads of it: `<unk>` 0 (the image feature token and pad), `<s>` 1 (BOS, added to
every encoding), `</s>` 2 (EOS), the image, slice and grounding tags at their published ids 101..112, and the role
markers `<用户>` / `<AI>` as whole, non-special vocabulary entries. Ids 3..100 are placeholder pieces. After them:
one piece per character (no merges: "▁" for a space and before each text run), the printable ASCII characters,
the 256 byte-fallback pieces, then the other characters of the corpus (the demo texts by default). The files
are tokenizer.json plus the published tokenizer_config.json and special_tokens_map.json as they are (the ids
are the published ones); they load with `AutoTokenizer` once `finetune` is imported (`LlamaTokenizerWrapper`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from finetune.demo_data import demo_corpus
from finetune.model.tokenization import LlamaTokenizerWrapper

# The published special tokens at their ids (tokenizer_config.json's added_tokens_decoder).
SPECIAL_IDS_V2: dict[str, int] = {
    "<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 101, "</image>": 102, "<ref>": 103, "</ref>": 104, "<box>": 105,
    "</box>": 106, "<quad>": 107, "</quad>": 108, "<point>": 109, "</point>": 110, "<slice>": 111, "</slice>": 112,
}  # fmt: skip
ROLE_MARKERS = ("<用户>", "<AI>")  # ordinary vocabulary entries of the real tokenizer, matched whole
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<s>", "</s>", "<unk>"
SPACE = "▁"  # SentencePiece's space symbol
# The pieces every 2.0 demo tokenizer has, in id order after the reserved ids: space, newline, the role markers,
# printable ASCII, the byte-fallback pieces.
BASE_PIECES: tuple[str, ...] = (
    SPACE, "\n", *ROLE_MARKERS, *(chr(c) for c in range(33, 127)), *(f"<0x{byte:02X}>" for byte in range(256)),
)  # fmt: skip
MIN_VOCAB_SIZE = max(SPECIAL_IDS_V2.values()) + 1 + len(BASE_PIECES)

_ENTRY = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
_TAGS = [token for token, index in SPECIAL_IDS_V2.items() if index > 100]
# The published tokenizer_config.json (openbmb/MiniCPM-V-2). Its auto_map and tokenizer_class name the hub's
# class (defined in the hub's modeling file, which needs timm): `import finetune` serves it natively.
PUBLISHED_TOKENIZER_CONFIG_V2: dict = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {
        str(index): {"content": token, **_ENTRY, "special": True} for token, index in SPECIAL_IDS_V2.items()
    },
    "additional_special_tokens": _TAGS,
    "auto_map": {"AutoTokenizer": ["modeling_minicpmv.LlamaTokenizerWrapper", None]},
    "bos_token": BOS_TOKEN,
    "clean_up_tokenization_spaces": False,
    "eos_token": EOS_TOKEN,
    "legacy": True,
    "model_max_length": 1000000000000000019884624838656,
    "pad_token": UNK_TOKEN,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizerWrapper",
    "truncation_side": "right",
    "unk_token": UNK_TOKEN,
    "use_default_system_prompt": False,
}  # fmt: skip
PUBLISHED_SPECIAL_TOKENS_MAP_V2: dict = {
    "additional_special_tokens": _TAGS,
    "bos_token": {"content": BOS_TOKEN, **_ENTRY},
    "eos_token": {"content": EOS_TOKEN, **_ENTRY},
    "pad_token": UNK_TOKEN,
    "unk_token": {"content": UNK_TOKEN, **_ENTRY},
}


def vocabulary_v2(corpus: list[str], vocab_size: int) -> dict[str, int]:
    """piece -> id: the special tokens at their published ids, `<reserved_k>` at the free ids below 101, then
    BASE_PIECES, then the corpus's characters that are not among them (by first appearance) while fewer than
    `vocab_size` ids are used."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (MiniCPM-V 2.0's special-token layout and "
            f"{len(BASE_PIECES)} character and byte pieces), got {vocab_size}"
        )
    vocab = dict(SPECIAL_IDS_V2)
    for index in range(3, 101):
        vocab[f"<reserved_{index}>"] = index
    for piece in BASE_PIECES:
        vocab.setdefault(piece, len(vocab))
    for text in corpus:
        for character in text.replace(" ", SPACE):
            if len(vocab) >= vocab_size:
                return vocab
            vocab.setdefault(character, len(vocab))
    return vocab


def build_backend_tokenizer_v2(corpus: list[str] | None = None, vocab_size: int = 1024):
    """The `tokenizers.Tokenizer`: a BPE without merges over `vocabulary_v2` with byte fallback, spaces written as
    "▁" and one prepended to each text run, BOS added by the post-processor; the special tokens matched as
    such, the role markers as whole non-special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = vocabulary_v2(demo_corpus() if corpus is None else corpus, vocab_size)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = SPECIAL_IDS_V2[BOS_TOKEN]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_IDS_V2])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in ROLE_MARKERS])
    return tokenizer


def build_tokenizer_v2(
    out_dir: str | Path | None, corpus: list[str] | None = None, vocab_size: int = 1024
) -> LlamaTokenizerWrapper:
    """Build, save (tokenizer.json and the published tokenizer_config.json, special_tokens_map.json) and load back
    the 2.0 demo tokenizer of at most `vocab_size` ids (fewer when the corpus has fewer characters). `corpus`
    defaults to the demo dataset's texts; with `out_dir=None` the files go to a temporary directory."""
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return build_tokenizer_v2(tmp, corpus, vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_backend_tokenizer_v2(corpus, vocab_size).save(str(out_dir / "tokenizer.json"))
    files = {
        "tokenizer_config.json": PUBLISHED_TOKENIZER_CONFIG_V2,
        "special_tokens_map.json": PUBLISHED_SPECIAL_TOKENS_MAP_V2,
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return LlamaTokenizerWrapper.from_pretrained(str(out_dir))
