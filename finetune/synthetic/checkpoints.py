"""Tiny random-weight MiniCPM-V checkpoints in the published layout, sharded copies of them, and the full-size
architecture with random weights (for memory / speed runs), all without the network or the real weights.

Every builder takes the version ("2.5": MiniCPM-Llama3-V-2.5, the default; "2.6": MiniCPM-V 2.6; "2.0":
MiniCPM-V 2.0): its published config.json (REFERENCE_CONFIGS), its demo tokenizer, its preprocessor_config.json
(2.0 has none). The tiny sizes are the same for 2.5 and 2.6; 2.0's keep its own shape (MHA, a vision block more,
as the last one is dropped) at the same widths, and its config.json keeps the published flat layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from finetune.model import MiniCPMV, MiniCPMVConfig
from finetune.model.configuration import PUBLISHED_AUTO_MAP
from finetune.model.versions import version_of

from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_tokenizer

# The published config.json (openbmb/MiniCPM-Llama3-V-2_5), minus _name_or_path: the full-size architecture.
REFERENCE_CONFIG: dict = {
    "version": "2.5",
    "architectures": ["MiniCPMV"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": dict(PUBLISHED_AUTO_MAP),
    "batch_vision_input": True,
    "bos_token_id": 128000,
    "drop_vision_last_layer": False,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_size": 448,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "mm_use_im_start_end": True,
    "model_type": "minicpmv",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "patch_size": 14,
    "pretraining_tp": 1,
    "query_num": 96,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
    "slice_mode": True,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.40.0",
    "use_cache": False,
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "model_type": "idefics2",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
    "vocab_size": 128256,
}

# The published config.json of openbmb/MiniCPM-V-2_6, minus _name_or_path: the full-size 2.6 architecture
# (Qwen2-7B with q/k/v biases, the same SigLIP tower, 64 resampler queries; 8,099,175,152 parameters).
REFERENCE_CONFIG_V2_6: dict = {
    "version": 2.6,
    "architectures": ["MiniCPMV"],
    "auto_map": dict(PUBLISHED_AUTO_MAP),
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151666,
    "batch_vision_input": True,
    "drop_vision_last_layer": False,
    "image_size": 448,
    "model_type": "minicpmv",
    "patch_size": 14,
    "query_num": 64,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
    "slice_mode": True,
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "model_type": "siglip",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}

# The published config.json of openbmb/MiniCPM-V-2, minus _name_or_path: the full-size 2.0 architecture (MiniCPM-2.4B
# with its muP scalings, the timm SigLIP tower named by vision_encoder, 64 queries; 3,434,965,792 parameters). It
# has no "version" field and no nested vision or slice config: its own fields tell it apart.
REFERENCE_CONFIG_V2: dict = {
    "architectures": ["MiniCPMV"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": dict(PUBLISHED_AUTO_MAP),
    "bos_token_id": 1,
    "dim_model_base": 256,
    "drop_vision_last_layer": True,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2304,
    "image_size": 448,
    "initializer_range": 0.1,
    "intermediate_size": 5760,
    "max_position_embeddings": 4096,
    "max_slice_nums": 9,
    "mm_use_im_start_end": True,
    "model_type": "minicpmv",
    "num_attention_heads": 36,
    "num_hidden_layers": 40,
    "num_key_value_heads": 36,
    "patch_size": 14,
    "pretraining_tp": 1,
    "query_num": 64,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "scale_depth": 1.4,
    "scale_emb": 12,
    "scale_resolution": 448,
    "slice_mode": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
    "vocab_size": 122753,
}

# Every version the builders make, by config.json's "version" name (2.0's config.json names none).
REFERENCE_CONFIGS: dict[str, dict] = {"2.5": REFERENCE_CONFIG, "2.6": REFERENCE_CONFIG_V2_6, "2.0": REFERENCE_CONFIG_V2}
# The tokens the published config.json's bos_token_id / eos_token_id name (2.6's bos_token_id is <|endoftext|>,
# not the tokenizer's bos_token <|im_start|>), and whether it has a pad_token_id (the 2.6 one has none).
_CONFIG_TOKENS: dict[str, tuple[str, str, str | None]] = {
    "2.5": (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN),
    "2.6": ("<|endoftext|>", "<|im_end|>", None),
    "2.0": ("<s>", "</s>", None),
}
# MiniCPM-V 2.0's tiny sizes, in its flat layout: the 2.5 / 2.6 tiny widths with 2.0's own shape (MHA, 4 heads of
# 64; three vision blocks built, the last dropped as drop_vision_last_layer says; 6 x 6 learned positions).
TINY_FIELDS_V2: dict = {
    "hidden_size": 256, "intermediate_size": 320, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "query_num": 16, "scale_resolution": 112, "max_position_embeddings": 2048,
    "torch_dtype": "float32",
    "vision_config": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 3,
                      "image_size": 84},
}  # fmt: skip
# The slicing fields 2.0's config.json keeps at the top level (the other versions nest them in slice_config).
_FLAT_SLICE_FIELDS = ("max_slice_nums", "scale_resolution", "patch_size")

# preprocessor_config.json of the published model; scale_resolution / image_feature_size follow the config.
_PREPROCESSOR_CONFIG: dict = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "auto_map": {
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
    },
    "processor_class": "MiniCPMVProcessor",
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "image_feature_size": 96,
    "im_start": "<image>",
    "im_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "unk": "<unk>",
    "norm_mean": [0.5, 0.5, 0.5],
    "norm_std": [0.5, 0.5, 0.5],
    "version": 2.5,
}
# MiniCPM-V 2.6's preprocessor_config.json: 2.5's fields plus the image id tags, use_image_id and slice_mode.
_PREPROCESSOR_CONFIG_V2_6: dict = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "auto_map": _PREPROCESSOR_CONFIG["auto_map"],
    "processor_class": "MiniCPMVProcessor",
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "use_image_id": True,
    "image_feature_size": 64,
    "im_start": "<image>",
    "im_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "unk": "<unk>",
    "im_id_start": "<image_id>",
    "im_id_end": "</image_id>",
    "slice_mode": True,
    "norm_mean": [0.5, 0.5, 0.5],
    "norm_std": [0.5, 0.5, 0.5],
    "version": 2.6,
}
_PREPROCESSOR_CONFIGS: dict[str, dict] = {"2.5": _PREPROCESSOR_CONFIG, "2.6": _PREPROCESSOR_CONFIG_V2_6}


def _check_version(version: str) -> str:
    if version not in REFERENCE_CONFIGS:
        raise ValueError(f"version must be one of {', '.join(REFERENCE_CONFIGS)} (MiniCPM-V), got {version!r}")
    return version


# --- configs ------------------------------------------------------------------------------------------------


def full_size_config(version: str = "2.5", **overrides) -> MiniCPMVConfig:
    """The published config of MiniCPM-V `version` (REFERENCE_CONFIGS), with optional overrides; an instance of
    that version's config class."""
    fields = json.loads(json.dumps(REFERENCE_CONFIGS[_check_version(version)]))
    fields.update(overrides)
    return MiniCPMVConfig.from_dict(fields)


def tiny_config(tokenizer=None, version: str = "2.5", **overrides) -> MiniCPMVConfig:
    """A tiny config of MiniCPM-V `version` like the golden one (2.5 / 2.6: LLM hidden 256, 2 layers; vision
    hidden 32, 2 layers; 16 queries; scale_resolution 112; 2.0: TINY_FIELDS_V2), every other field the published
    one. Vocabulary and the bos/eos(/pad) ids the published config names come from `tokenizer` (default: the
    version's demo tokenizer)."""
    return _fp32_config(tiny_config_fields(tokenizer, version, **overrides))


def _fp32_config(fields: dict) -> MiniCPMVConfig:
    """The config (of the version `fields` describe) of a model built in fp32."""
    config = MiniCPMVConfig.from_dict(fields)
    config.dtype = torch.float32
    return config


def tiny_config_fields(tokenizer=None, version: str = "2.5", **overrides) -> dict:
    """`tiny_config`'s fields as config.json holds them (for 2.0: the published flat layout, a `slice_config`
    override spread over its top-level slicing fields, `vision_config` the tower's tiny dimensions)."""
    _check_version(version)
    if tokenizer is None:
        tokenizer = _default_tokenizer(version)
    vocab = tokenizer.get_vocab()
    bos, eos, pad = _CONFIG_TOKENS[version]
    fields = json.loads(json.dumps(REFERENCE_CONFIGS[version]))
    token_fields = {"vocab_size": len(tokenizer), "bos_token_id": vocab[bos], "eos_token_id": vocab[eos]}
    if version == "2.0":
        overrides = dict(overrides)
        fields.update(TINY_FIELDS_V2, **token_fields)
        fields.update({k: v for k, v in overrides.pop("slice_config", {}).items() if k in _FLAT_SLICE_FIELDS})
        fields.update(overrides)
        return fields
    if pad is not None:
        fields["pad_token_id"] = vocab.get(pad, 0)
    if "max_window_layers" in fields:  # Qwen2: sliding window (off) from this layer on; published: all layers
        fields["max_window_layers"] = 2
    fields.update(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        query_num=16,
        torch_dtype="float32",
        slice_config={"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 112},
        vision_config={
            "hidden_size": 32,
            "image_size": 980,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "patch_size": 14,
        },
        **token_fields,
    )
    fields.update(overrides)
    return fields


# `make demo`'s tiny model (`python -m finetune.build_tiny --demo`): the tiny config with a wider vision tower and
# 28 px patches (a 112 px picture is 4 x 4 patches), so that a few minutes of CPU fine-tuning can tell shapes apart,
# not only colours. Same published layout, only sizes differ. Measured on the colour-shape demo data: at vision
# hidden 32 / patch 14 and at 64 / 7 a 150..200-step run learnt every colour and guessed the shape; 64 / 28 got
# 0.39 held-out exact match after 400 steps, 128 / 28 0.83 after 800 (lr 1e-3).
DEMO_PATCH_SIZE = 28
DEMO_CONFIG_OVERRIDES: dict = {
    "patch_size": DEMO_PATCH_SIZE,
    "slice_config": {"max_slice_nums": 9, "patch_size": DEMO_PATCH_SIZE, "scale_resolution": 112},
    "vision_config": {
        "hidden_size": 128,
        "image_size": 980,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "patch_size": DEMO_PATCH_SIZE,
    },
}

_DEFAULT_TOKENIZERS: dict = {}


def _default_tokenizer(version: str = "2.5"):
    """The version's demo tokenizer, built once per process."""
    if version not in _DEFAULT_TOKENIZERS:
        _DEFAULT_TOKENIZERS[version] = build_tokenizer(None, version=version)
    return _DEFAULT_TOKENIZERS[version]


# --- tiny checkpoints ---------------------------------------------------------------------------------------


@torch.no_grad()
def _make_non_trivial(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights (all ones after init) and biases (all zeros) get small random values, so that a test would
    notice a norm or bias that is dropped, transposed or mis-loaded."""
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        elif param.dim() == 1 and ("norm" in name or name.split(".")[-2].startswith("ln_")):
            param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)


def build_tiny_model(config: MiniCPMVConfig | None = None, seed: int = 0):
    """A random-weight tiny MiniCPMV in fp32 (the model's own init under torch.manual_seed(seed), then norms and
    biases perturbed deterministically), in eval mode."""
    config = config if config is not None else tiny_config()
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = MiniCPMV._from_config(config, dtype=torch.float32)
    _make_non_trivial(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def build_tiny_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    corpus: list[str] | None = None,
    vocab_size: int = 1024,
    config_overrides: dict | None = None,
    version: str = "2.5",
) -> Path:
    """Write a random-weight tiny MiniCPM-V `version` checkpoint in the published layout: config.json,
    model.safetensors (fp32), the tokenizer files (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json; 2.6 also added_tokens.json), preprocessor_config.json (not 2.0, whose published
    checkpoint has none), generation_config.json. 2.0's config.json holds the published fields only (its flat
    layout, no "version"), with the tiny sizes and a `vision_config` of the tower's tiny dimensions.
    Deterministic in (seed, corpus, vocab_size, config_overrides, version)."""
    _check_version(version)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, corpus=corpus, vocab_size=vocab_size, version=version)
    fields = tiny_config_fields(tokenizer, version, **(config_overrides or {}))
    config = _fp32_config(fields)
    model = build_tiny_model(config, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    if version == "2.0":  # save_pretrained adds transformers' defaults: keep the published file's fields only
        (out_dir / "config.json").write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")
    write_sidecar_files(out_dir, config)
    return out_dir


def write_sidecar_files(out_dir: str | Path, config: MiniCPMVConfig) -> None:
    """preprocessor_config.json and generation_config.json as the published model of the config's version has
    them, with the config's slicing sizes and token ids (2.0: generation_config.json only, as published)."""
    out_dir = Path(out_dir)
    if version_of(config).name == "2.0":
        generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                      "eos_token_id": config.eos_token_id, "transformers_version": "4.36.0"}  # fmt: skip
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        return
    settings = config.slice_settings
    preprocessor = dict(
        _PREPROCESSOR_CONFIGS[version_of(config).name],
        max_slice_nums=settings.max_slice_nums,
        scale_resolution=settings.scale_resolution,
        patch_size=settings.patch_size,
        image_feature_size=settings.query_num,
    )
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=4) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# --- the published sharded layout ---------------------------------------------------------------------------


def write_published_shards(src_dir: str | Path, out_dir: str | Path, num_shards: int) -> Path:
    """Copy a single-file checkpoint into `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`
    (metadata.total_size = bytes of tensor data, weight_map), with every other file of src_dir copied as is."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    source = src_dir / "model.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: write_published_shards needs a single-file checkpoint")
    with safe_open(str(source), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    names = list(tensors)
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must be between 1 and {len(names)} (the number of tensors), got {num_shards}")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)

    # Contiguous groups of roughly total / num_shards bytes, none empty.
    groups: list[list[str]] = [[]]
    filled = 0
    for index, (name, size) in enumerate(zip(names, sizes, strict=True)):
        shards_left = num_shards - len(groups)
        tensors_left = len(names) - index
        if (
            groups[-1]
            and shards_left > 0
            and (filled >= total * len(groups) / num_shards or tensors_left <= shards_left)
        ):
            groups.append([])
        groups[-1].append(name)
        filled += size

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in src_dir.iterdir():
        if path.is_file() and path.name != "model.safetensors" and not path.name.startswith("model-"):
            shutil.copy2(path, out_dir / path.name)
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(out_dir / shard), metadata={"format": "pt"})
        (out_dir / shard).chmod(0o644)
        weight_map.update({n: shard for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


# --- the full-size architecture -----------------------------------------------------------------------------


def build_full_size_random(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    config: MiniCPMVConfig | None = None,
    attn_implementation: str = "sdpa",
    seed: int | None = 0,
    version: str = "2.5",
):
    """The full-size MiniCPM-V `version` (MiniCPM-Llama3-V-2.5: 8.54 B parameters; MiniCPM-V 2.6: 8.10 B; MiniCPM-V
    2.0: 3.43 B), or the architecture `config` describes, with random weights, created directly on `device` in
    `dtype` (no CPU copy, no disk): seconds on a GPU. `device="meta"` gives shapes only. Returned in eval mode."""
    config = config if config is not None else full_size_config(version)
    device = torch.device(device)
    if seed is not None and device.type != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = MiniCPMV._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()
