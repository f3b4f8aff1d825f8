"""Export a MiniCPM-Llama3-V-2.5 checkpoint (merged or base) as the two GGUF files llama.cpp runs it from.

    python -m finetune.export --gguf --model merged/ --output gguf/ [--type f16|q8_0] [--overwrite]
    llama-mtmd-cli -m gguf/model-F16.gguf --mmproj gguf/mmproj-model-f16.gguf --image x.jpg -p "What is this?"

Two files, in the layout llama.cpp's MiniCPM-V 2.5 support reads (its conversion scripts for Llama and for the
MiniCPM-V image encoder state it; this module writes the same layout itself):

- `model-<TYPE>.gguf`: the language model as architecture "llama". Tensor names are llama.cpp's (token_embd,
  blk.N.attn_q, ..., output); q_proj / k_proj rows of every head are reordered from transformers' rotate-half
  pairs (i, i + d/2) to llama.cpp's interleaved pairs (2i, 2i + 1); 1-D tensors stay F32, matrices are F16 or
  quantised. The tokenizer goes in as byte-level BPE ("gpt2", pre-tokenizer "llama-bpe") with its merges, token
  types, special ids and the checkpoint's chat template.
- `mmproj-model-f16.gguf`: vision tower + resampler as architecture "clip", projector type "resampler",
  minicpmv version 2. Vision tensors are v.*, with the MLP's fc1 named ffn_down and fc2 ffn_up as the reference
  converter names them (llama.cpp recognises those by shape and swaps them back); the resampler's in_proj is
  split into q / k / v, its `proj` (applied as x @ proj) stored transposed as a weight, and the fixed 70 x 70
  sin-cos key position table added as resampler.pos_embed_k. Matrices F16, the rest F32, always: llama.cpp's clip
  loader expects that, whatever the LLM's type.

Quantisation uses the gguf package's own quantisers: Q8_0 (and F16). The package has no Q4_K / Q6_K quantiser,
so Q4_K_M is made from the F16 file with llama.cpp's `llama-quantize` (the refusal says how).

Weights are read one tensor at a time from the safetensors files and written straight to the output, so the
export needs about one tensor of memory beyond the Python process, not the model. Order of work, so that a
mistake costs nothing: the gguf package, the model directory (version, config, every tensor's name and shape
from the headers), the quantisation type and the output directory are checked first; the files are written as
`*.tmp-<pid>` and renamed at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LLM_ARCH = "llama"
CLIP_ARCH = "clip"
LLAMA3_PRE_TOKENIZER = "llama-bpe"  # llama.cpp's name for the Llama-3 pre-tokenizer (tokenizer.ggml.pre)
MINICPMV_VERSION = 2  # llama.cpp's number for MiniCPM-Llama3-V-2.5 (clip.minicpmv_version)
SUPPORTED_MODEL_VERSION = "2.5"
POSITION_TABLE_SIDE = 70  # the resampler's key position table, 70 x 70 as llama.cpp's loader expects it
MMPROJ_FILE = "mmproj-model-f16.gguf"
# --type -> (ggml type of the LLM's matrices, file type recorded in general.file_type)
QUANT_TYPES = {"f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# Named in the refusal: the gguf package cannot make them, llama.cpp's llama-quantize can, from the F16 file.
LLAMA_QUANTIZE_TYPES = ("q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0")


class GGUFExportError(ValueError):
    """The export cannot be done faithfully; the message names the argument or file and the problem."""


def import_gguf():
    """The gguf package, or GGUFExportError naming the install command (it is an optional extra)."""
    try:
        import gguf
    except ImportError as error:
        raise GGUFExportError(
            "GGUF export needs the gguf package: pip install gguf (see requirements-extras.txt)"
        ) from error
    return gguf


# --- pure layout transforms -------------------------------------------------------------------------------------


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """[heads * d, in] q/k projection rows from transformers' rotate-half order to llama.cpp's interleaved order.

    transformers rotates the pair (i, i + d/2) of a head; llama.cpp's normal RoPE rotates (2i, 2i + 1). Row
    i + k * d/2 (k = 0, 1) of a head moves to row 2i + k, so the same rotation meets the same numbers."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def key_position_table(hidden: int) -> np.ndarray:
    """[70 * 70, hidden] float32: the resampler's sin-cos table, row-major over (row, column), as the model adds
    it to the keys (entry (r, c) = concat(E(c), E(r)))."""
    from finetune.model.resampler import sincos_2d_table

    side = POSITION_TABLE_SIDE
    return sincos_2d_table(hidden, side, side).reshape(side * side, hidden).numpy()


# Llama: checkpoint name inside llm.model.layers.N -> llama.cpp name inside blk.N
_LLM_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LLM_NAMES = {
    "llm.model.embed_tokens.weight": "token_embd.weight",
    "llm.model.norm.weight": "output_norm.weight",
    "llm.lm_head.weight": "output.weight",
}
# SigLIP (Idefics2) encoder layer module -> llama.cpp clip name; fc1 / fc2 as the reference converter names them.
_VISION_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down",
    "mlp.fc2": "ffn_up",
}
_VISION_NAMES = {
    "vpm.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "vpm.embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "vpm.embeddings.position_embedding.weight": "v.position_embd.weight",
    "vpm.post_layernorm.weight": "v.post_ln.weight",
    "vpm.post_layernorm.bias": "v.post_ln.bias",
}
_RESAMPLER_NAMES = {
    "resampler.query": "resampler.query",
    "resampler.kv_proj.weight": "resampler.kv.weight",
    "resampler.attn.out_proj.weight": "resampler.attn.out.weight",
    "resampler.attn.out_proj.bias": "resampler.attn.out.bias",
    **{f"resampler.ln_{n}.{p}": f"resampler.ln_{n}.{p}" for n in ("q", "kv", "post") for p in ("weight", "bias")},
}

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its name, the checkpoint tensor it comes from, how it is transformed and its shape after."""

    name: str
    source: str | None  # None: computed (the resampler's position table)
    transform: Transform
    shape: tuple[int, ...]


def _same(array: np.ndarray) -> np.ndarray:
    return array


def plan_llm(shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> list[Planned]:
    """The LLM file's tensors from the checkpoint's `llm.*` tensors; GGUFExportError for one it cannot place."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    plan = []
    for source, shape in shapes.items():
        if not source.startswith("llm."):
            continue
        transform: Transform = _same
        if source in _LLM_NAMES:
            name = _LLM_NAMES[source]
        elif source.startswith("llm.model.layers."):
            layer, rest = source[len("llm.model.layers.") :].split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            if module not in _LLM_LAYER_NAMES:
                raise GGUFExportError(f"tensor {source}: not part of a Llama decoder layer; cannot place it in GGUF")
            name = f"blk.{layer}.{_LLM_LAYER_NAMES[module]}.{suffix}"
            if module == "self_attn.q_proj":
                transform = lambda w, h=heads: permute_for_rope(w, h)  # noqa: E731
            elif module == "self_attn.k_proj":
                transform = lambda w, h=kv_heads: permute_for_rope(w, h)  # noqa: E731
        else:
            raise GGUFExportError(f"tensor {source}: not part of the Llama LLM; cannot place it in GGUF")
        plan.append(Planned(name, source, transform, shape))
    return plan


def plan_mmproj(shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> list[Planned]:
    """The projector file's tensors from the checkpoint's `vpm.*` and `resampler.*` tensors plus the position table.

    A vision layer the model does not run (drop_vision_last_layer) is left out, as the model leaves it out."""
    layers_used = config["vision_config"]["num_hidden_layers"] - bool(config.get("drop_vision_last_layer"))
    plan = []
    for source, shape in shapes.items():
        if source.startswith("vpm.encoder.layers."):
            layer, rest = source[len("vpm.encoder.layers.") :].split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            if int(layer) >= layers_used:
                continue
            if module not in _VISION_LAYER_NAMES:
                raise GGUFExportError(f"tensor {source}: not part of a SigLIP encoder layer; cannot place it in GGUF")
            plan.append(Planned(f"v.blk.{layer}.{_VISION_LAYER_NAMES[module]}.{suffix}", source, _same, shape))
        elif source in _VISION_NAMES:
            plan.append(Planned(_VISION_NAMES[source], source, _same, shape))
        elif source in _RESAMPLER_NAMES:
            plan.append(Planned(_RESAMPLER_NAMES[source], source, _same, shape))
        elif source in ("resampler.attn.in_proj_weight", "resampler.attn.in_proj_bias"):
            kind = source.rsplit("_", 1)[1]
            part_shape = (shape[0] // 3, *shape[1:])
            for index, part in enumerate("qkv"):
                take = lambda w, i=index: np.split(w, 3)[i]  # noqa: E731
                plan.append(Planned(f"resampler.attn.{part}.{kind}", source, take, part_shape))
        elif source == "resampler.proj":
            plan.append(Planned("resampler.proj.weight", source, lambda w: w.T, shape[::-1]))
        elif source.startswith(("vpm.", "resampler.")):
            raise GGUFExportError(f"tensor {source}: not part of the vision tower or resampler llama.cpp reads")
    hidden = config["hidden_size"]
    plan.append(
        Planned(
            "resampler.pos_embed_k",
            None,
            lambda _: key_position_table(hidden),
            (POSITION_TABLE_SIDE**2, hidden),
        )
    )
    return plan


def storage_type(gguf, planned: Planned, matrix_type: str, file: str) -> Any:
    """The ggml type a tensor is stored in: 1-D (norms, biases) and the resampler's query / position table F32;
    the 4-D patch embedding F16; other matrices `matrix_type`, or F16 where a row does not fill whole blocks."""
    types = gguf.GGMLQuantizationType
    if len(planned.shape) == 1:
        return types.F32
    if file == "mmproj":
        return types.F16 if planned.name.endswith(".weight") else types.F32
    wanted = types[matrix_type]
    block_size = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if planned.shape[-1] % block_size == 0 else types.F16


# --- the checkpoint --------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What the export reads from a model directory, checked: config.json, tensor shapes and their files."""

    directory: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    files: dict[str, str]

    def tensor(self, name: str, handles: dict[str, Any]) -> np.ndarray:
        """One tensor as float32 numpy (bf16 / fp16 / fp32 on disk)."""
        import torch
        from safetensors import safe_open

        file = self.files[name]
        if file not in handles:
            handles[file] = safe_open(str(self.directory / file), framework="pt")
        return handles[file].get_tensor(name).to(torch.float32).numpy()

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.directory / name
        return json.loads(path.read_text()) if path.is_file() else {}


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Check the model directory from config.json and the safetensors headers (no weights read): MiniCPM-Llama3-V-2.5
    in the published layout with every tensor of its architecture at its shape, and its tokenizer.json."""
    from finetune.model.checkpoint import CheckpointError, validate_checkpoint_dir
    from finetune.model.modeling import MiniCPMV
    from finetune.model.versions import version_of_dict

    directory = Path(model_dir)
    if not directory.is_dir():
        raise GGUFExportError(f"--model {model_dir}: no such directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise GGUFExportError(f"--model {model_dir}: no config.json: not a MiniCPM-V checkpoint directory")
    config = json.loads(config_path.read_text())
    # (2.0's config.json has no "version": version_of_dict tells it by its own fields, not as 2.5.)
    version = version_of_dict(config).name if "version" not in config else str(config["version"])
    if config.get("model_type") != "minicpmv" or version != SUPPORTED_MODEL_VERSION:
        raise GGUFExportError(
            f"--model {model_dir}: model_type {config.get('model_type')!r} version {version}: GGUF export is "
            f"implemented for MiniCPM-Llama3-V-2.5 only (model_type 'minicpmv', version {SUPPORTED_MODEL_VERSION})"
        )
    if config.get("rope_scaling"):
        raise GGUFExportError(
            f"--model {model_dir}: config.json has rope_scaling {config['rope_scaling']}; 2.5 has none"
        )
    vision_act = (config.get("vision_config") or {}).get("hidden_act", "gelu_pytorch_tanh")
    if "gelu" not in vision_act:
        raise GGUFExportError(f"--model {model_dir}: vision hidden_act {vision_act!r}; llama.cpp's MiniCPM-V uses gelu")
    if not (directory / "tokenizer.json").is_file():
        raise GGUFExportError(f"--model {model_dir}: no tokenizer.json (the GGUF file carries the tokenizer)")
    try:
        stored = validate_checkpoint_dir(directory, MiniCPMV)
    except CheckpointError as error:
        raise GGUFExportError(f"--model: {error}") from error
    return Checkpoint(
        directory,
        config,
        {name: shape for name, (shape, _) in stored.items()},
        {name: file for name, (_, file) in stored.items()},
    )


# --- metadata ----------------------------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """The tokenizer as llama.cpp's byte-level BPE reads it: tokens by id (padded to the model's vocabulary), their
    types, the merges, and whether the tokenizer adds BOS itself."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    adds_bos: bool


def read_vocabulary(tokenizer_json: dict[str, Any], vocab_size: int, token_type_enum: Any) -> Vocabulary:
    """Tokens of ids 0..vocab_size-1: the BPE vocabulary (NORMAL), added special tokens (CONTROL), other added
    tokens (USER_DEFINED) and `[PAD<id>]` for ids the tokenizer does not use (UNUSED)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"tokenizer.json: model type {model.get('type')!r}; llama.cpp's Llama-3 vocabulary is BPE"
        )
    by_id: dict[int, tuple[str, int]] = {
        index: (token, token_type_enum.NORMAL) for token, index in model["vocab"].items()
    }
    for added in tokenizer_json.get("added_tokens", []):
        kind = token_type_enum.CONTROL if added.get("special") else token_type_enum.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"tokenizer.json: token id {max(by_id)} is outside the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for index in range(vocab_size):
        token, kind = by_id.get(index, (f"[PAD{index}]", token_type_enum.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    if not merges:  # the gguf package writes no empty array, and llama.cpp refuses a BPE vocabulary without the key
        raise GGUFExportError("tokenizer.json has no BPE merges: llama.cpp cannot load a GGUF vocabulary without them")
    return Vocabulary(tokens, types, merges, _adds_bos(tokenizer_json))


def _adds_bos(tokenizer_json: dict[str, Any]) -> bool:
    """Whether tokenizer.json's post-processor puts <|begin_of_text|> before a single sequence (the Llama-3 one does)."""
    processor = tokenizer_json.get("post_processor") or {}
    processors = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for step in processors:
        if step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            return "SpecialToken" in first
    return False


def add_llm_metadata(writer, gguf, checkpoint: Checkpoint, file_type: Any) -> None:
    """general.*, llama.* hyper-parameters and tokenizer.* keys llama.cpp reads for a Llama-3 model."""
    config = checkpoint.config
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    writer.add_name(f"MiniCPM-Llama3-V-2.5 LLM ({checkpoint.directory.name})")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 500000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])

    tokenizer_json = checkpoint.read_json("tokenizer.json")
    vocabulary = read_vocabulary(tokenizer_json, config["vocab_size"], gguf.TokenType)
    token_ids = {token: index for index, token in enumerate(vocabulary.tokens)}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(LLAMA3_PRE_TOKENIZER)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    writer.add_token_merges(vocabulary.merges)
    writer.add_bos_token_id(token_ids.get("<|begin_of_text|>", config.get("bos_token_id")))
    eos = config.get("eos_token_id")
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    for token, add in (("<|eot_id|>", writer.add_eot_token_id), ("<unk>", writer.add_unk_token_id)):
        if token in token_ids:
            add(token_ids[token])
    tokenizer_config = checkpoint.read_json("tokenizer_config.json")
    pad = tokenizer_config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad in token_ids:
        writer.add_pad_token_id(token_ids[pad])
    writer.add_add_bos_token(vocabulary.adds_bos)
    writer.add_add_eos_token(False)
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])


def add_mmproj_metadata(writer, checkpoint: Checkpoint) -> None:
    """The clip.* keys llama.cpp's MiniCPM-V image encoder loader reads (projector "resampler", version 2)."""
    from finetune.model.configuration import slice_settings_from_config, vision_config_from
    from finetune.model.versions.minicpm_llama3_v2_5 import MiniCPMVConfig

    config = checkpoint.config
    vision = vision_config_from(config.get("vision_config"))
    settings = slice_settings_from_config(MiniCPMVConfig.from_dict(config))
    preprocessor = checkpoint.read_json("preprocessor_config.json")
    layers_used = vision.num_hidden_layers - bool(config.get("drop_vision_last_layer"))
    writer.add_name(f"MiniCPM-Llama3-V-2.5 image encoder ({checkpoint.directory.name})")
    writer.add_description("image encoder for MiniCPM-V")
    writer.add_file_type(1)  # F16 matrices
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_minicpmv_projector", True)
    writer.add_string("clip.projector_type", "resampler")
    writer.add_int32("clip.minicpmv_version", MINICPMV_VERSION)
    writer.add_uint32("clip.minicpmv_query_num", settings.query_num)
    # llama.cpp slices images with image_size as the scale resolution (448 for the published model)
    writer.add_uint32("clip.vision.image_size", settings.scale_resolution)
    writer.add_uint32("clip.vision.patch_size", vision.patch_size)
    writer.add_uint32("clip.vision.embedding_length", vision.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", vision.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", 0)
    writer.add_uint32("clip.vision.attention.head_count", vision.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(vision.layer_norm_eps))
    writer.add_uint32("clip.vision.block_count", layers_used)
    writer.add_array("clip.vision.image_mean", [float(x) for x in preprocessor.get("norm_mean", [0.5, 0.5, 0.5])])
    writer.add_array("clip.vision.image_std", [float(x) for x in preprocessor.get("norm_std", [0.5, 0.5, 0.5])])
    writer.add_bool("clip.use_gelu", True)


# --- writing ----------------------------------------------------------------------------------------------------


def _stored(gguf, array: np.ndarray, ggml_type: Any) -> np.ndarray:
    """The bytes of a tensor in `ggml_type`: F32 / F16 as numpy floats, quantised types as gguf's uint8 blocks."""
    types = gguf.GGMLQuantizationType
    if ggml_type == types.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if ggml_type == types.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), ggml_type)


def _byte_shape(gguf, shape: tuple[int, ...], ggml_type: Any) -> tuple[int, ...]:
    types = gguf.GGMLQuantizationType
    if ggml_type in (types.F32, types.F16):
        return shape
    return gguf.quant_shape_to_byte_shape(shape, ggml_type)


def write_gguf(
    path: Path,
    arch: str,
    plan: list[Planned],
    types: list[Any],
    checkpoint: Checkpoint,
    add_metadata: Callable[[Any], None],
) -> None:
    """Write one GGUF file, streaming: the header and tensor table first, then each tensor read, transformed,
    converted and written in turn (one tensor in memory at a time)."""
    gguf = import_gguf()
    writer = gguf.GGUFWriter(path=None, arch=arch)
    add_metadata(writer)
    for planned, ggml_type in zip(plan, types, strict=True):
        shape = _byte_shape(gguf, planned.shape, ggml_type)
        if ggml_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            item, raw = np.dtype(np.float16 if ggml_type == gguf.GGMLQuantizationType.F16 else np.float32), None
        else:
            item, raw = np.dtype(np.uint8), ggml_type
        nbytes = int(np.prod(shape)) * item.itemsize
        writer.add_tensor_info(planned.name, shape, item, nbytes, raw_dtype=raw)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handles: dict[str, Any] = {}
    for planned, ggml_type in zip(plan, types, strict=True):
        source = checkpoint.tensor(planned.source, handles) if planned.source else np.empty(0, np.float32)
        array = planned.transform(source)
        if tuple(array.shape) != planned.shape:  # a transform that disagrees with its plan: a bug, never a file
            raise AssertionError(f"{planned.name}: shape {array.shape}, planned {planned.shape}")
        writer.write_tensor_data(_stored(gguf, array, ggml_type))
    writer.close()


def check_quant_type(quant_type: str) -> str:
    """The --type, normalised; GGUFExportError listing the supported types (and llama-quantize for the K-quants)."""
    key = quant_type.lower()
    if key in QUANT_TYPES:
        return key
    hint = ""
    if key in LLAMA_QUANTIZE_TYPES:
        hint = (
            f" (the gguf package has no quantiser for it: export --type f16 and run llama.cpp's "
            f"`llama-quantize model-F16.gguf model-{key.upper()}.gguf {key.upper()}`)"
        )
    raise GGUFExportError(f"--type {quant_type}: not supported{hint}; supported: {', '.join(QUANT_TYPES)}")


def output_paths(output_dir: Path, quant_type: str) -> tuple[Path, Path]:
    """(LLM file, projector file) inside output_dir for this type."""
    return output_dir / f"model-{QUANT_TYPES[quant_type][0]}.gguf", output_dir / MMPROJ_FILE


def export_gguf(
    model_dir: str | Path, output_dir: str | Path, quant_type: str = "f16", overwrite: bool = False
) -> tuple[Path, Path]:
    """Write `model-<TYPE>.gguf` (LLM) and `mmproj-model-f16.gguf` (vision tower + resampler) of the checkpoint in
    `model_dir` (a merged or base MiniCPM-Llama3-V-2.5 in the published layout) into `output_dir`; returns their
    paths. Raises GGUFExportError, before any weight is read, for a missing gguf package, another model version,
    an incomplete checkpoint, an unsupported type or existing output files without `overwrite`."""
    gguf = import_gguf()
    quant_type = check_quant_type(quant_type)
    checkpoint = open_checkpoint(model_dir)
    output_dir = Path(output_dir)
    llm_path, mmproj_path = output_paths(output_dir, quant_type)
    existing = [p.name for p in (llm_path, mmproj_path) if p.exists()]
    if existing and not overwrite:
        raise GGUFExportError(f"--output {output_dir}: {', '.join(existing)} exists; pass --overwrite to replace it")

    matrix_type, file_type = QUANT_TYPES[quant_type]
    llm_plan = plan_llm(checkpoint.shapes, checkpoint.config)
    mmproj_plan = plan_mmproj(checkpoint.shapes, checkpoint.config)
    llm_types = [storage_type(gguf, p, matrix_type, "llm") for p in llm_plan]
    mmproj_types = [storage_type(gguf, p, "F16", "mmproj") for p in mmproj_plan]

    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    written = []
    try:
        for path, arch, plan, types, metadata in (
            (
                llm_path,
                LLM_ARCH,
                llm_plan,
                llm_types,
                lambda w: add_llm_metadata(w, gguf, checkpoint, gguf.LlamaFileType[file_type]),
            ),
            (mmproj_path, CLIP_ARCH, mmproj_plan, mmproj_types, lambda w: add_mmproj_metadata(w, checkpoint)),
        ):
            tmp = path.with_name(path.name + suffix)
            written.append(tmp)
            write_gguf(tmp, arch, plan, types, checkpoint, metadata)
        for tmp, path in zip(written, (llm_path, mmproj_path), strict=True):
            tmp.replace(path)
    finally:
        for tmp in written:
            tmp.unlink(missing_ok=True)
    return llm_path, mmproj_path
