"""A tiny MiniCPM-V 2.0 checkpoint in the published layout, for tests: the published config.json, tokenizer
config, special-tokens map and generation config (tests/reference_v2) with the dimensions shrunk, random
weights under the published names, and a tiny tokenizer.json standing in for the real SentencePiece model
(not available here) with the published special-token layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

REFERENCE = Path(__file__).parent / "reference_v2"
# The published special tokens and their ids (tokenizer_config.json's added_tokens_decoder).
SPECIAL_IDS = {
    "<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 101, "</image>": 102, "<ref>": 103, "</ref>": 104, "<box>": 105,
    "</box>": 106, "<quad>": 107, "</quad>": 108, "<point>": 109, "</point>": 110, "<slice>": 111, "</slice>": 112,
}  # fmt: skip
ROLE_MARKERS = ("<用户>", "<AI>")  # ordinary vocabulary entries of the real tokenizer, matched whole
TINY_DIMENSIONS = {
    "hidden_size": 256, "intermediate_size": 320, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "query_num": 16, "scale_resolution": 112, "max_position_embeddings": 2048,
    "vision_config": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 3,
                      "image_size": 84},
}  # fmt: skip


def tiny_tokenizer() -> Tokenizer:
    """A Llama-style SentencePiece-BPE tokenizer.json: one piece per character (no merges) with byte fallback,
    "▁" for spaces and before each text run, BOS added by its post-processor; the published special tokens at
    their ids, and the role markers as non-special added tokens. Ids 3..100 are placeholder pieces."""
    vocab: dict[str, int] = dict(SPECIAL_IDS)
    for index in range(3, 101):
        vocab[f"<reserved_{index}>"] = index
    pieces = ["▁", "\n", *ROLE_MARKERS, *(chr(c) for c in range(33, 127))]
    pieces += [f"<0x{byte:02X}>" for byte in range(256)]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_IDS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in ROLE_MARKERS])
    return tokenizer


def tiny_config() -> dict:
    """The published config.json with tiny dimensions (and the tiny tokenizer's vocabulary size)."""
    config = json.loads((REFERENCE / "config.json").read_text())
    config.update(TINY_DIMENSIONS)
    config["vocab_size"] = tiny_tokenizer().get_vocab_size()
    return config


def build_tiny_v2(directory: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into `directory` (created): config, tokenizer files, random fp32 weights."""
    from finetune.model import MiniCPMV
    from finetune.model.versions import MiniCPMV2Config

    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(REFERENCE / name, directory / name)
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    torch.manual_seed(seed)
    model = MiniCPMV(MiniCPMV2Config.from_dict(config))
    with torch.no_grad():  # LayerNorm / RMSNorm weights away from 1 so that a wrong norm shows
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in name:
                parameter.uniform_(0.5, 1.5)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
