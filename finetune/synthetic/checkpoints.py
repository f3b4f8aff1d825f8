"""Tiny random-weight MiniCPM-Llama3-V-2.5 checkpoints in the published layout, sharded copies of them, and the
full-size architecture with random weights (for memory / speed runs), all without the network or the real weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from finetune.model import MiniCPMV, MiniCPMVConfig

from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_tokenizer

# The published config.json (openbmb/MiniCPM-Llama3-V-2_5), minus _name_or_path: the full-size architecture.
REFERENCE_CONFIG: dict = {
    "version": "2.5",
    "architectures": ["MiniCPMV"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    },
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


# --- configs ------------------------------------------------------------------------------------------------


def full_size_config(**overrides) -> MiniCPMVConfig:
    """The published model's config (REFERENCE_CONFIG), with optional overrides."""
    fields = json.loads(json.dumps(REFERENCE_CONFIG))
    fields.update(overrides)
    return MiniCPMVConfig.from_dict(fields)


def tiny_config(tokenizer=None, **overrides) -> MiniCPMVConfig:
    """A tiny MiniCPMVConfig like the golden one (LLM hidden 256, 2 layers; vision hidden 32, 2 layers; 16 queries;
    scale_resolution 112). Vocabulary and bos/eos/pad ids come from `tokenizer` (default: build_tokenizer(None))."""
    if tokenizer is None:
        tokenizer = _default_tokenizer()
    vocab = tokenizer.get_vocab()
    fields = json.loads(json.dumps(REFERENCE_CONFIG))
    fields.update(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        vocab_size=len(tokenizer),
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab.get(PAD_TOKEN, 0),
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
    )
    fields.update(overrides)
    config = MiniCPMVConfig.from_dict(fields)
    config.dtype = torch.float32
    return config


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

_DEFAULT_TOKENIZER = None


def _default_tokenizer():
    global _DEFAULT_TOKENIZER
    if _DEFAULT_TOKENIZER is None:
        _DEFAULT_TOKENIZER = build_tokenizer(None)
    return _DEFAULT_TOKENIZER


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
) -> Path:
    """Write a random-weight tiny checkpoint in the published layout: config.json, model.safetensors (fp32),
    tokenizer.json / tokenizer_config.json / special_tokens_map.json, preprocessor_config.json,
    generation_config.json. Deterministic in (seed, corpus, vocab_size)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, corpus=corpus, vocab_size=vocab_size)
    config = tiny_config(tokenizer, **(config_overrides or {}))
    model = build_tiny_model(config, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_sidecar_files(out_dir, config)
    return out_dir


def write_sidecar_files(out_dir: str | Path, config: MiniCPMVConfig) -> None:
    """preprocessor_config.json and generation_config.json as the published model has them."""
    out_dir = Path(out_dir)
    settings = config.slice_settings
    preprocessor = dict(
        _PREPROCESSOR_CONFIG,
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
):
    """The full-size MiniCPM-Llama3-V-2.5 (8.54 B parameters) with random weights, created directly on `device` in
    `dtype` (no CPU copy, no disk): seconds on a GPU. `device="meta"` gives shapes only. Returned in eval mode."""
    config = config if config is not None else full_size_config()
    device = torch.device(device)
    if seed is not None and device.type != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = MiniCPMV._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()
