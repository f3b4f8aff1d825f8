"""Builders: demo tokenizer, tiny checkpoints (single file and sharded), full-size architecture, demo data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import finetune  # noqa: F401  (registers the native classes)
from finetune.demo_data import demo_corpus, write_demo_dataset
from finetune.model import MiniCPMV, MiniCPMVTokenizerFast, SpecialTokens, detect_llm_type
from finetune.model.checkpoint import validate_checkpoint_dir
from finetune.synthetic import (
    DEMO_CONFIG_OVERRIDES,
    REFERENCE_CONFIG,
    SPECIAL_TOKENS,
    build_full_size_random,
    build_tiny_checkpoint,
    build_tokenizer,
    full_size_config,
    tiny_config,
    write_published_shards,
)

REFERENCE = Path(__file__).resolve().parent / "reference"
GOLDEN_CHECKPOINT = Path(__file__).resolve().parent / "golden_tiny" / "checkpoint"
ROUND_TRIP_TEXTS = [
    "Hello  world\n\n  x",
    "你好，世界",
    "emoji 🙂👍🏽 and a flag 🇫🇷",
    " leading space, trailing space ",
    "\ttabs\tand\r\nwindows newlines\n",
    "A red circle. What shape is in the picture?",
    "naïve café — “quotes” 'single' it's 12345.678",
    "",
]


def reference_tokenizer_config() -> dict:
    return json.loads((REFERENCE / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_auto_tokenizer_is_native_class(tiny_dir, tmp_path):
    assert type(AutoTokenizer.from_pretrained(tiny_dir)) is MiniCPMVTokenizerFast
    # a tokenizer-only directory (no config.json) too
    tok_dir = tmp_path / "tok"
    built = build_tokenizer(tok_dir, corpus=["hello world"], vocab_size=600)
    assert type(built) is MiniCPMVTokenizerFast
    assert type(AutoTokenizer.from_pretrained(tok_dir)) is MiniCPMVTokenizerFast
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # the post-processor prepends <|begin_of_text|>, like Llama-3
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_merges_are_trained_and_used(tokenizer):
    vocab = tokenizer.get_vocab()
    assert vocab["!"] == 0 and vocab['"'] == 1
    golden = json.loads((GOLDEN_CHECKPOINT / "tokenizer.json").read_text())["model"]["vocab"]
    assert {t: i for t, i in vocab.items() if i < 256} == golden  # the 256 byte symbols in GPT-2 order
    assert tokenizer.convert_ids_to_tokens([0, 220, 255]) == ["!", "Ġ", "Ń"]
    ids = tokenizer("What shape is in the picture?", add_special_tokens=False)["input_ids"]
    assert len(ids) < 10  # merges from the demo corpus shorten common text (vs 29 bytes)
    assert max(ids) >= 256
    # "Ġ" + letters: byte-level with a leading-space symbol, Llama-3 style split keeps spaces attached
    assert any(t.startswith("Ġ") for t in tokenizer.convert_ids_to_tokens(ids))


def test_special_tokens_real_order_contiguous(tokenizer):
    reference = reference_tokenizer_config()["added_tokens_decoder"]
    real = [reference[k]["content"] for k in sorted(reference, key=int)]
    assert list(SPECIAL_TOKENS) == real and len(real) == 256
    vocab = tokenizer.get_vocab()
    base = vocab["<|begin_of_text|>"]
    assert [vocab[t] for t in real] == list(range(base, base + 256))
    assert len(tokenizer) == base + 256 == max(vocab.values()) + 1
    # each special token encodes to one id, inside text too
    for token in ("<image>", "</image>", "<slice>", "<unk>", "<|eot_id|>", "<|reserved_special_token_250|>"):
        assert tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"][1] == vocab[token]
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    assert (tokens.bos, tokens.eos, tokens.unk, tokens.pad) == (base, base + 1, base + 2, 0)
    assert (tokens.start_header, tokens.end_header, tokens.eot) == (base + 6, base + 7, base + 9)
    assert (tokens.image_start, tokens.image_end, tokens.slice_start, tokens.slice_end) == (
        base + 10, base + 11, base + 20, base + 21
    )  # fmt: skip
    assert tokenizer.im_start_id == base + 10 and tokenizer.eot_id == base + 9
    assert detect_llm_type(tokenizer) == "llama3"


def test_tokenizer_config_matches_reference(tiny_dir, tokenizer):
    reference = reference_tokenizer_config()
    saved = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == reference["chat_template"]
    assert tokenizer.chat_template == reference["chat_template"]
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "tokenizer_class"):
        assert saved[key] == reference[key], key
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    assert tokenizer.unk_token == "<unk>"
    special_map = json.loads((tiny_dir / "special_tokens_map.json").read_text())
    assert special_map == json.loads((REFERENCE / "special_tokens_map.json").read_text())
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": " hi "}], tokenize=False)
    assert (
        rendered
        == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_tokenizer_is_deterministic(tmp_path):
    corpus = demo_corpus()
    build_tokenizer(tmp_path / "a", corpus=corpus)
    build_tokenizer(tmp_path / "b", corpus=corpus)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_vocab_size_cap(tmp_path):
    corpus = demo_corpus() * 2
    small = build_tokenizer(tmp_path / "s", corpus=corpus, vocab_size=600)
    assert len(small) == 600  # 256 bytes + 88 merges + 256 specials
    with pytest.raises(ValueError):
        build_tokenizer(tmp_path / "x", corpus=corpus, vocab_size=500)


# --- tiny checkpoint ----------------------------------------------------------------------------------------


def test_tiny_checkpoint_published_layout(tiny_dir, tokenizer):
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "minicpmv" and config["architectures"] == ["MiniCPMV"]
    assert config["rope_theta"] == 500000.0 and "rope_parameters" not in config and config["rope_scaling"] is None
    assert config["auto_map"] == REFERENCE_CONFIG["auto_map"]
    assert config["vision_config"]["hidden_size"] == 32 and config["vision_config"]["num_attention_heads"] == 4
    assert config["slice_config"]["scale_resolution"] == 112 and config["query_num"] == 16
    assert config["vocab_size"] == len(tokenizer)
    assert config["bos_token_id"] == tokenizer.bos_token_id and config["eos_token_id"] == tokenizer.eos_token_id
    assert config["pad_token_id"] == 0 and config["torch_dtype"] == "float32"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (256, 2, 4)
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (2, 512)
    preprocessor = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    reference_pre = json.loads((REFERENCE / "preprocessor_config.json").read_text())
    assert set(preprocessor) == set(reference_pre)
    assert preprocessor["scale_resolution"] == 112 and preprocessor["image_feature_size"] == 16
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}
    validate_checkpoint_dir(tiny_dir, MiniCPMV)


def test_tiny_weights_are_non_trivial_and_deterministic(tiny_dir, tmp_path):
    weights = load_file(str(tiny_dir / "model.safetensors"))
    assert weights["resampler.query"].std() > 0.005
    assert weights["resampler.proj"].abs().sum() > 0
    for name, tensor in weights.items():
        assert tensor.abs().sum() > 0, f"{name} is all zero"
        if tensor.dim() == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight"):
            assert not torch.allclose(tensor, torch.ones_like(tensor)), f"{name} is all ones"
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    other = load_file(str(build_tiny_checkpoint(tmp_path / "seed1", seed=1) / "model.safetensors"))
    assert not torch.equal(other["llm.lm_head.weight"], weights["llm.lm_head.weight"])


def test_tiny_checkpoint_loads_bit_exact(tiny_dir, tokenizer):
    stored = load_file(str(tiny_dir / "model.safetensors"))
    model = AutoModel.from_pretrained(tiny_dir)
    assert type(model) is MiniCPMV
    state = model.state_dict()
    assert state.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    # and it runs: a text-only forward gives finite logits over the whole vocabulary
    ids = tokenizer("<|start_header_id|>user<|end_header_id|>\n\nhi", return_tensors="pt")["input_ids"]
    data = {
        "input_ids": ids,
        "pixel_values": [[]],
        "tgt_sizes": [torch.zeros(0, 2, dtype=torch.int64)],
        "image_bound": [torch.zeros(0, 2, dtype=torch.int64)],
    }
    with torch.no_grad():
        logits = model(data=data).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_tiny_checkpoint_runs_an_image(tiny_dir, tokenizer):
    model = AutoModel.from_pretrained(tiny_dir)
    image = Image.new("RGB", (260, 150), (200, 30, 30))
    prompt = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n(<image>./</image>)\nWhat?<|eot_id|>"
    data = model.prepare_inputs(prompt, [image], tokenizer)
    assert len(data["image_bound"][0]) > 1  # 260x150 at scale_resolution 112 is sliced
    with torch.no_grad():
        logits = model(data=data).logits
    assert torch.isfinite(logits).all()


def test_tiny_config_defaults():
    config = tiny_config()
    assert (
        config.hidden_size == 256 and config.vision_config.hidden_size % config.vision_config.num_attention_heads == 0
    )
    assert config.max_position_embeddings == 2048 and config.slice_settings.scale_resolution == 112
    assert tiny_config(num_hidden_layers=1).num_hidden_layers == 1


# --- sharded layout -----------------------------------------------------------------------------------------


def test_sharded_copy_loads_identical_weights(tiny_dir, tmp_path):
    sharded = write_published_shards(tiny_dir, tmp_path / "sharded", num_shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (sharded / "model.safetensors").exists()
    stored = load_file(str(tiny_dir / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in stored.values())
    assert set(index["weight_map"]) == set(stored)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (sharded / name).read_bytes() == (tiny_dir / name).read_bytes()
    validate_checkpoint_dir(sharded, MiniCPMV)
    model = AutoModel.from_pretrained(sharded)
    state = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    assert type(AutoTokenizer.from_pretrained(sharded)) is MiniCPMVTokenizerFast
    with pytest.raises(ValueError):
        write_published_shards(tiny_dir, tmp_path / "bad", num_shards=0)


# --- full size ----------------------------------------------------------------------------------------------


def read_param_shapes() -> list[tuple[str, tuple[int, ...], int]]:
    rows = []
    for line in (REFERENCE / "param_shapes.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, count = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        rows.append((name, dims, int(count)))
    return rows


def test_full_size_on_meta_matches_published_parameters():
    expected = read_param_shapes()
    assert len(expected) == 741
    model = build_full_size_random(device="meta")
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert params == {name: shape for name, shape, _ in expected}
    assert set(model.state_dict()) == set(params)  # no persistent buffers beyond the checkpoint's tensors
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(count for _, _, count in expected) == 8_537_092_336
    assert model.dtype == torch.bfloat16 and all(p.device.type == "meta" for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    index = json.loads((REFERENCE / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params)


def test_full_size_config_equals_reference():
    config = full_size_config().to_dict()
    reference = json.loads((REFERENCE / "config.json").read_text())
    for key, value in reference.items():
        if key in ("_name_or_path", "transformers_version", "torch_dtype", "vision_config", "slice_config"):
            continue
        assert config[key] == value, key
    for key, value in reference["vision_config"].items():
        assert config["vision_config"][key] == value, key
    assert config["slice_config"]["scale_resolution"] == 448


# --- demo data ----------------------------------------------------------------------------------------------


def test_demo_data(tmp_path):
    paths = write_demo_dataset(tmp_path / "demo")
    train = json.loads(paths["train"].read_text())
    evaluation = json.loads(paths["eval"].read_text())
    assert len(train) == 64 and len(evaluation) == 16
    ids = [s["id"] for s in train + evaluation]
    assert len(ids) == len(set(ids))
    sizes, multi, text_only, multi_turn = [], 0, 0, 0
    for sample in train + evaluation:
        turns = sample["conversations"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) and len(turns) % 2 == 0
        assert all(isinstance(t["content"], str) and t["content"] for t in turns)
        multi_turn += len(turns) > 2
        text = "".join(t["content"] for t in turns)
        if "image" not in sample:
            text_only += 1
            assert "<image" not in text
        elif isinstance(sample["image"], dict):
            multi += 1
            assert list(sample["image"]) == ["<image_00>", "<image_01>"]
            for marker, rel in sample["image"].items():
                assert text.count(marker) == 1 and (tmp_path / "demo" / rel).is_file()
        else:
            assert text.count("<image>") == 1
            path = tmp_path / "demo" / sample["image"]
            with Image.open(path) as image:
                sizes.append(image.size)
                assert image.mode == "RGB"
    assert multi == 1 and text_only >= 4 and multi_turn >= 10
    assert all(60 <= min(s) and max(s) <= 400 for s in sizes)
    area = 112 * 112
    assert any(w * h <= area for w, h in sizes) and any(w * h > area for w, h in sizes)  # some sliced, some not
    assert any(w >= 3 * h for w, h in sizes) and any(h >= 3 * w for w, h in sizes)  # wide and tall ones
    # deterministic
    again = write_demo_dataset(tmp_path / "again")
    assert again["train"].read_bytes() == paths["train"].read_bytes()
    first = sorted((tmp_path / "demo" / "images").iterdir())
    assert [p.read_bytes() for p in first] == [(tmp_path / "again" / "images" / p.name).read_bytes() for p in first]
    corpus = demo_corpus()
    assert "A red circle." in corpus or any("circle" in t for t in corpus)


@pytest.mark.slow
def test_command_line_tools(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "finetune.demo_data", str(tmp_path / "d"), "--num", "8"],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "train.json" in out.stdout
    assert len(json.loads((tmp_path / "d" / "train.json").read_text())) == 8
    out = subprocess.run(
        [sys.executable, "-m", "finetune.build_tiny", str(tmp_path / "t"), "--seed", "3"],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "model.safetensors" in out.stdout and (tmp_path / "t" / "config.json").is_file()


# --- MiniCPM-V 2.6 ------------------------------------------------------------------------------------------

REFERENCE_V2_6 = Path(__file__).resolve().parent / "reference_v2_6"


def reference_v2_6(name: str) -> dict:
    return json.loads((REFERENCE_V2_6 / name).read_text())


@pytest.fixture(scope="module")
def tiny_v2_6_dir(tmp_path_factory) -> Path:
    """`python -m finetune.build_tiny --version 2.6 OUT`, run in this process."""
    from finetune.build_tiny import main as build_tiny_main

    out = tmp_path_factory.mktemp("tiny_v2_6") / "ckpt"
    build_tiny_main([str(out), "--version", "2.6"])
    return out


@pytest.fixture(scope="module")
def tokenizer_v2_6(tiny_v2_6_dir):
    return AutoTokenizer.from_pretrained(tiny_v2_6_dir)


def test_tiny_v2_6_checkpoint_has_the_published_layout_and_fields(tiny_v2_6_dir, tokenizer_v2_6):
    assert sorted(p.name for p in tiny_v2_6_dir.iterdir()) == [
        "added_tokens.json", "config.json", "generation_config.json", "model.safetensors",
        "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    config = json.loads((tiny_v2_6_dir / "config.json").read_text())
    reference = reference_v2_6("config.json")
    assert set(reference) - {"_name_or_path"} <= set(config)
    sizes = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings", "max_window_layers", "vocab_size", "bos_token_id", "eos_token_id", "query_num",
             "slice_config", "vision_config", "torch_dtype", "transformers_version", "_name_or_path"}  # fmt: skip
    # (sliding_window: the model's Qwen2 config writes null while use_sliding_window is false)
    differing = {k for k in reference if k not in sizes | {"sliding_window"} and config[k] != reference[k]}
    assert not differing, {k: (config[k], reference[k]) for k in differing}
    assert config["version"] == 2.6 and config["vision_config"]["model_type"] == "siglip"
    assert "pad_token_id" not in config or config["pad_token_id"] is None  # the published config has none
    vocab = tokenizer_v2_6.get_vocab()
    assert config["vocab_size"] == len(tokenizer_v2_6) and config["query_num"] == 16
    # as published: bos_token_id names <|endoftext|> (the tokenizer's bos_token is <|im_start|>), eos <|im_end|>
    assert (config["bos_token_id"], config["eos_token_id"]) == (vocab["<|endoftext|>"], vocab["<|im_end|>"])
    generation = json.loads((tiny_v2_6_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (config["bos_token_id"], config["eos_token_id"])
    preprocessor = json.loads((tiny_v2_6_dir / "preprocessor_config.json").read_text())
    reference_pre = reference_v2_6("preprocessor_config.json")
    assert list(preprocessor) == list(reference_pre)
    assert {k: v for k, v in preprocessor.items() if k not in ("scale_resolution", "image_feature_size")} == {
        k: v for k, v in reference_pre.items() if k not in ("scale_resolution", "image_feature_size")
    }
    assert (preprocessor["scale_resolution"], preprocessor["image_feature_size"]) == (112, 16)
    validate_checkpoint_dir(tiny_v2_6_dir, MiniCPMV)


def test_tiny_v2_6_loads_with_the_auto_classes_as_a_2_6_model(tiny_v2_6_dir, tokenizer_v2_6):
    from finetune.model.versions import MINICPM_V_2_6, version_of

    model = AutoModel.from_pretrained(tiny_v2_6_dir)
    assert type(model) is MiniCPMV and version_of(model.config) is MINICPM_V_2_6
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    stored = load_file(str(tiny_v2_6_dir / "model.safetensors"))
    state = model.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[k], t) for k, t in stored.items())
    biases = [name for name in stored if name.startswith("llm.") and name.endswith("_proj.bias")]
    assert sorted({name.split(".")[-2] for name in biases}) == ["k_proj", "q_proj", "v_proj"] and len(biases) == 6
    assert all(stored[name].abs().sum() > 0 for name in biases)
    assert type(tokenizer_v2_6) is MiniCPMVTokenizerFast and detect_llm_type(tokenizer_v2_6) == "qwen"
    image = Image.new("RGB", (260, 150), (200, 30, 30))
    prompt = tokenizer_v2_6.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\nWhat?"}], tokenize=False, add_generation_prompt=True
    )
    data = model.prepare_inputs(prompt, [image], tokenizer_v2_6)
    ids = data["input_ids"][0].tolist()
    assert ids.count(tokenizer_v2_6.convert_tokens_to_ids("<image_id>")) == 1  # 2.6's placeholder
    assert len(data["image_bound"][0]) > 1  # 260x150 at scale_resolution 112 is sliced
    with torch.no_grad():
        logits = model(data=data).logits
    assert logits.shape == (1, len(ids), len(tokenizer_v2_6)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_v2_6_tokenizer_round_trips_text_and_adds_no_bos(tokenizer_v2_6, text):
    ids = tokenizer_v2_6(text)["input_ids"]
    assert tokenizer_v2_6.decode(ids) == text
    assert ids == tokenizer_v2_6(text, add_special_tokens=False)["input_ids"]  # no BOS, as the published one
    assert all(i < tokenizer_v2_6.convert_tokens_to_ids("<|endoftext|>") for i in ids)


def test_v2_6_tokenizer_has_the_published_special_token_layout(tiny_v2_6_dir, tokenizer_v2_6):
    vocab = tokenizer_v2_6.get_vocab()
    published = reference_v2_6("added_tokens.json")
    added = sorted(published, key=published.get)  # the published order: <|endoftext|> 151643 .. reserved_5 151665
    base = vocab["<|endoftext|>"]
    assert [vocab[t] for t in added] == list(range(base, base + len(added)))
    assert len(tokenizer_v2_6) == base + len(added) == max(vocab.values()) + 1
    assert json.loads((tiny_v2_6_dir / "added_tokens.json").read_text()) == {t: vocab[t] for t in published}
    # <unk>, the image feature token, inside the BPE range among the merges and in the BPE vocabulary, as the real one
    bpe_vocab = json.loads((tiny_v2_6_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert 256 < vocab["<unk>"] < base - 1 and bpe_vocab["<unk>"] == vocab["<unk>"] and len(bpe_vocab) == base
    assert tokenizer_v2_6.unk_token == "<unk>"
    for token in ("<unk>", "<image>", "</slice>", "<image_id>", "<|im_end|>", "<|reserved_special_token_5|>"):
        assert tokenizer_v2_6(f"a{token}b")["input_ids"][1] == vocab[token]
    tokens = SpecialTokens.from_tokenizer(tokenizer_v2_6)
    assert (tokens.bos, tokens.eos, tokens.pad, tokens.unk) == (base + 1, base + 2, base, vocab["<unk>"])
    assert (tokens.image_id_start, tokens.image_id_end, tokens.eot) == (vocab["<image_id>"], vocab["</image_id>"], None)
    assert tokens.stop_ids == [base + 2, base]


def test_v2_6_tokenizer_files_are_the_published_ones_with_its_ids(tiny_v2_6_dir, tokenizer_v2_6):
    saved = json.loads((tiny_v2_6_dir / "tokenizer_config.json").read_text())
    reference = reference_v2_6("tokenizer_config.json")
    assert list(saved) != [] and set(saved) == set(reference)
    assert {k: v for k, v in saved.items() if k != "added_tokens_decoder"} == {
        k: v for k, v in reference.items() if k != "added_tokens_decoder"
    }
    vocab = tokenizer_v2_6.get_vocab()
    assert {entry["content"]: int(i) for i, entry in saved["added_tokens_decoder"].items()} == {
        entry["content"]: vocab[entry["content"]] for entry in reference["added_tokens_decoder"].values()
    }
    special_map = json.loads((tiny_v2_6_dir / "special_tokens_map.json").read_text())
    assert special_map == reference_v2_6("special_tokens_map.json")
    rendered = tokenizer_v2_6.apply_chat_template([{"role": "user", "content": " hi "}], tokenize=False)
    assert rendered == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n hi <|im_end|>\n"


def test_v2_6_tokenizer_is_deterministic_and_refuses_a_size_without_room(tmp_path):
    build_tokenizer(tmp_path / "a", version="2.6")
    build_tokenizer(tmp_path / "b", version="2.6")
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(build_tokenizer(tmp_path / "s", version="2.6", vocab_size=300)) == 300
    with pytest.raises(ValueError, match="vocab_size must be at least 280"):
        build_tokenizer(tmp_path / "x", version="2.6", vocab_size=279)
    with pytest.raises(ValueError, match="'4.0'"):
        build_tokenizer(tmp_path / "y", version="4.0")


@pytest.mark.parametrize("version, llm_type", [("2.6", "qwen"), ("2.0", "minicpm")])
def test_tiny_checkpoint_of_a_version_trains_one_step_on_the_demo_data(
    version, llm_type, request, demo_factory, tmp_path
):
    from helpers import base_args

    from finetune.train import train

    checkpoint = request.getfixturevalue({"2.6": "tiny_v2_6_dir", "2.0": "tiny_v2_dir"}[version])
    demo = demo_factory(24, 6)
    out = tmp_path / "adapter"
    trainer = train(base_args(checkpoint, demo / "train.json", out, "--max_steps", "1", "--llm_type", llm_type))
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 1 and len(logged) == 1 and math.isfinite(logged[0])
    assert (out / "adapter_model.safetensors").is_file()
    assert trainer.train_dataset.encoder.version.name == version


@pytest.mark.parametrize("version, name", [("2.6", "MiniCPM-V-2_6"), ("2.0", "MiniCPM-V-2")])
def test_build_tiny_demo_sizes_take_a_version(version, name, tmp_path, capsys):
    from finetune.build_tiny import main as build_tiny_main
    from finetune.model.versions import version_of_dict

    build_tiny_main([str(tmp_path / "demo"), "--demo", "--version", version])
    assert capsys.readouterr().out.startswith(f"wrote tiny {name} checkpoint to {tmp_path / 'demo'}")
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert version_of_dict(config).name == version and config["patch_size"] == DEMO_CONFIG_OVERRIDES["patch_size"]
    assert config["vision_config"]["hidden_size"] == DEMO_CONFIG_OVERRIDES["vision_config"]["hidden_size"]
    validate_checkpoint_dir(tmp_path / "demo", MiniCPMV)
    model = AutoModel.from_pretrained(tmp_path / "demo")
    assert model.config.slice_settings.patch_size == DEMO_CONFIG_OVERRIDES["patch_size"]


def test_full_size_v2_6_on_meta_matches_published_parameters():
    expected = []
    for line in (REFERENCE_V2_6 / "param_shapes.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape, count = line.split("\t")
            expected.append((name, tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), int(count)))
    assert len(expected) == 789
    model = build_full_size_random(device="meta", version="2.6")
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert params == [(name, shape) for name, shape, _ in expected]  # names, shapes and order
    assert set(model.state_dict()) == {name for name, _ in params}
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(count for *_, count in expected) == 8_099_175_152
    assert model.dtype == torch.bfloat16 and all(p.device.type == "meta" for p in model.parameters())
    index = reference_v2_6("model.safetensors.index.json")
    assert set(index["weight_map"]) == {name for name, _ in params}


def test_full_size_v2_6_config_equals_reference():
    config = full_size_config("2.6").to_dict()
    reference = reference_v2_6("config.json")
    skipped = (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "vision_config",
        "slice_config",
        "sliding_window",
    )
    assert {k: config[k] for k in reference if k not in skipped} == {
        k: v for k, v in reference.items() if k not in skipped
    }
    assert {k: config["vision_config"][k] for k in reference["vision_config"]} == reference["vision_config"]
    assert config["slice_config"]["max_slice_nums"] == 9 and config["query_num"] == 64


# --- MiniCPM-V 2.0 --------------------------------------------------------------------------------------------

REFERENCE_V2 = Path(__file__).resolve().parent / "reference_v2"


def reference_v2(name: str) -> dict:
    return json.loads((REFERENCE_V2 / name).read_text())


@pytest.fixture(scope="module")
def tiny_v2_dir(tmp_path_factory) -> Path:
    """`python -m finetune.build_tiny --version 2.0 OUT`, run in this process."""
    from finetune.build_tiny import main as build_tiny_main

    out = tmp_path_factory.mktemp("tiny_v2") / "ckpt"
    build_tiny_main([str(out), "--version", "2.0"])
    return out


@pytest.fixture(scope="module")
def tokenizer_v2(tiny_v2_dir):
    return AutoTokenizer.from_pretrained(tiny_v2_dir)


def test_tiny_v2_checkpoint_has_the_published_layout_and_fields(tiny_v2_dir, tokenizer_v2):
    """The published 2.0 files (no preprocessor_config.json on the hub's main), config.json in its flat layout
    with no "version" (told apart by its fields), the sizes tiny, the tokenizer files as published."""
    from finetune.model.versions import MINICPM_V_2, version_of_dict

    assert sorted(p.name for p in tiny_v2_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    config = json.loads((tiny_v2_dir / "config.json").read_text())
    reference = reference_v2("config.json")
    sizes = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings", "vocab_size", "query_num", "scale_resolution", "torch_dtype"}  # fmt: skip
    assert set(config) == set(reference) - {"_name_or_path"} | {"vision_config"}
    assert {k: config[k] for k in config if k not in sizes | {"vision_config"}} == {
        k: reference[k] for k in config if k not in sizes | {"vision_config"}
    }
    assert "version" not in config and version_of_dict(config) is MINICPM_V_2
    assert config["num_key_value_heads"] == config["num_attention_heads"]  # MHA, as published
    assert config["vocab_size"] == len(tokenizer_v2) and (config["query_num"], config["scale_resolution"]) == (16, 112)
    assert json.loads((tiny_v2_dir / "generation_config.json").read_text()) == reference_v2("generation_config.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((tiny_v2_dir / name).read_text()) == reference_v2(name), name
    validate_checkpoint_dir(tiny_v2_dir, MiniCPMV)


def test_v2_tokenizer_has_the_published_special_token_ids_and_role_markers(tokenizer_v2):
    from finetune.model.tokenization import LlamaTokenizerWrapper

    assert type(tokenizer_v2) is LlamaTokenizerWrapper and detect_llm_type(tokenizer_v2) == "minicpm"
    published = {
        int(i): entry["content"] for i, entry in reference_v2("tokenizer_config.json")["added_tokens_decoder"].items()
    }
    assert {i: tokenizer_v2.convert_ids_to_tokens(i) for i in published} == published
    tokens = SpecialTokens.from_tokenizer(tokenizer_v2)
    assert (tokens.unk, tokens.bos, tokens.eos, tokens.pad) == (0, 1, 2, 0) and tokens.stop_ids == [2]
    # <用户> / <AI> are matched whole but are not special tokens (decoding keeps them)
    user, assistant = tokenizer_v2.convert_tokens_to_ids(["<用户>", "<AI>"])
    ids = tokenizer_v2("<用户>hi<AI>ok")["input_ids"]
    assert ids[:2] == [1, user] and assistant in ids
    decoded = tokenizer_v2.decode(ids, skip_special_tokens=True)
    assert decoded.startswith("<用户>") and "<AI>" in decoded and "<s>" not in decoded


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_v2_tokenizer_round_trips_text_and_adds_bos(tokenizer_v2, text):
    ids = tokenizer_v2(text)["input_ids"]
    assert ids[0] == 1 and ids[1:] == tokenizer_v2(text, add_special_tokens=False)["input_ids"]
    assert tokenizer_v2.decode(ids, skip_special_tokens=True) == text


def test_v2_tokenizer_is_deterministic_and_refuses_a_size_without_room(tmp_path):
    build_tokenizer(tmp_path / "a", version="2.0")
    build_tokenizer(tmp_path / "b", version="2.0")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    smallest = len(build_tokenizer(tmp_path / "c", version="2.0", corpus=["plain ascii"]))
    with pytest.raises(ValueError, match=f"vocab_size must be at least {smallest}"):
        build_tokenizer(tmp_path / "x", version="2.0", vocab_size=smallest - 1)


def test_tiny_v2_loads_with_the_auto_classes_and_runs_forward(tiny_v2_dir, tokenizer_v2):
    from finetune.model.versions import MINICPM_V_2, version_of

    model = AutoModel.from_pretrained(tiny_v2_dir)
    assert type(model) is MiniCPMV and version_of(model.config) is MINICPM_V_2
    assert type(model.llm).__name__ == "MiniCPMForCausalLM"
    stored = load_file(str(tiny_v2_dir / "model.safetensors"))
    state = model.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[k], t) for k, t in stored.items())
    image = Image.new("RGB", (260, 150), (200, 30, 30))
    data = model.prepare_inputs("<用户>(<image>./</image>)\nWhat?<AI>", [image], tokenizer_v2)
    ids = data["input_ids"][0].tolist()
    assert len(data["image_bound"][0]) > 1  # 260x150 at scale_resolution 112 is sliced
    with torch.no_grad():
        logits = model(data=data).logits
    assert logits.shape == (1, len(ids), len(tokenizer_v2)) and torch.isfinite(logits).all()


def test_full_size_v2_on_meta_matches_published_parameters():
    expected = []
    for line in (REFERENCE_V2 / "param_shapes.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape, count = line.split("\t")
            expected.append((name, tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), int(count)))
    model = build_full_size_random(device="meta", version="2.0")
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes == {name: shape for name, shape, _ in expected}
    assert sum(p.numel() for p in model.state_dict().values()) == sum(count for *_, count in expected)
    index = reference_v2("model.safetensors.index.json")
    assert set(index["weight_map"]) == set(shapes)


def test_full_size_v2_config_is_the_published_one():
    from finetune.synthetic import REFERENCE_CONFIGS

    reference = reference_v2("config.json")
    assert REFERENCE_CONFIGS["2.0"] == {k: v for k, v in reference.items() if k != "_name_or_path"}
    config = full_size_config("2.0").to_dict()
    skipped = ("_name_or_path", "transformers_version", "torch_dtype")
    assert {k: config[k] for k in reference if k not in skipped} == {
        k: v for k, v in reference.items() if k not in skipped
    }
    assert "vision_config" not in config and "slice_config" not in config
