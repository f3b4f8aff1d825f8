"""finetune.export --gguf (finetune.gguf_export) on CPU with the tiny model: the two GGUF files llama.cpp's MiniCPM-V 2.5 support reads.

The files are read back with the gguf package's reader and compared with the merged checkpoint they came from.
The layout facts the comparison undoes are llama.cpp's (its conversion scripts for Llama and for the MiniCPM-V
image encoder), written out here on their own rather than taken from the module under test:
- LLM: Llama names; q_proj / k_proj rows of each head reordered from rotate-half pairs (i, i + d/2) to
  interleaved pairs (2i, 2i + 1); 1-D tensors F32, matrices F16 (or quantised).
- mmproj: vision tower as v.*, the MLP's fc1 under the name ffn_down and fc2 under ffn_up (the converter's
  legacy names, which llama.cpp detects and swaps back); resampler in_proj split into q / k / v, proj stored
  transposed, the 70 x 70 sin-cos key position table as resampler.pos_embed_k; matrices F16, the rest F32,
  the patch embedding (4-D) F16.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from finetune.export import cli  # noqa: E402
from finetune.gguf_export import GGUFExportError, export_gguf  # noqa: E402
from finetune.merge import merge  # noqa: E402
from finetune.model.resampler import sincos_2d_table  # noqa: E402


@pytest.fixture(scope="module")
def merged(tiny_model, tiny_adapter, tmp_path_factory) -> Path:
    return merge(tiny_model, tiny_adapter, tmp_path_factory.mktemp("merged") / "out", dtype="fp32")


@pytest.fixture(scope="module")
def exported_f16(merged, tmp_path_factory) -> tuple[Path, Path]:
    return export_gguf(merged, tmp_path_factory.mktemp("gguf") / "f16", "f16")


@pytest.fixture(scope="module")
def weights(merged) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(merged.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def config(merged) -> dict:
    return json.loads((merged / "config.json").read_text())


def field(reader, key: str):
    """A metadata value as Python (a string, number, bool or list)."""
    assert key in reader.fields, f"metadata key {key} missing"
    return reader.fields[key].contents()


def tensors_of(path: Path) -> dict:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


def undo_rope_permutation(weight: np.ndarray, heads: int) -> np.ndarray:
    """GGUF's interleaved rotary pairs back to transformers' halves, head by head."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llm_source(name: str) -> str:
    """The merged checkpoint's tensor a GGUF LLM tensor name stands for (llama.cpp's Llama names)."""
    fixed = {"token_embd.weight": "llm.model.embed_tokens.weight", "output_norm.weight": "llm.model.norm.weight"}
    fixed["output.weight"] = "llm.lm_head.weight"
    if name in fixed:
        return fixed[name]
    _, layer, part, suffix = name.split(".")
    parts = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    return f"llm.model.layers.{layer}.{parts[part]}.{suffix}"


def as_stored(tensor: torch.Tensor, ggml_type) -> np.ndarray:
    """The merged fp32 value in the type the GGUF file stores it in (F16 rounding or F32 as is)."""
    dtype = np.float16 if ggml_type == gguf.GGMLQuantizationType.F16 else np.float32
    return tensor.numpy().astype(dtype)


# --- the language model ------------------------------------------------------------------------------------------


def test_llm_f16_gives_the_merged_weights_exactly(exported_f16, weights, config):
    llm_path, _ = exported_f16
    tensors = tensors_of(llm_path)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name, tensor in tensors.items():
        source = weights[llm_source(name)]
        data = np.asarray(tensor.data)
        expected_type = gguf.GGMLQuantizationType.F32 if source.dim() == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == expected_type, name
        if ".attn_q." in name:
            data = undo_rope_permutation(data, heads)
        elif ".attn_k." in name:
            data = undo_rope_permutation(data, kv_heads)
        np.testing.assert_array_equal(data, as_stored(source, tensor.tensor_type), err_msg=name)
    # every weight of the LLM is in the file, and nothing else
    assert sorted(llm_source(name) for name in tensors) == sorted(n for n in weights if n.startswith("llm."))


def test_llm_metadata_is_what_llama_cpp_reads(exported_f16, config, merged):
    reader = gguf.GGUFReader(exported_f16[0])
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field(reader, "llama.context_length") == config["max_position_embeddings"]
    assert field(reader, "llama.embedding_length") == config["hidden_size"]
    assert field(reader, "llama.block_count") == config["num_hidden_layers"]
    assert field(reader, "llama.feed_forward_length") == config["intermediate_size"]
    assert field(reader, "llama.attention.head_count") == config["num_attention_heads"]
    assert field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(reader, "llama.rope.dimension_count") == config["hidden_size"] // config["num_attention_heads"]
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, "llama.vocab_size") == config["vocab_size"]


def test_llm_tokenizer_is_the_checkpoints(exported_f16, merged, config):
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(exported_f16[0])
    tokenizer_json = json.loads((merged / "tokenizer.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(merged)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}

    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]
    for index, token in enumerate(tokens):
        assert token == by_id.get(index, f"[PAD{index}]"), index
    types = field(reader, "tokenizer.ggml.token_type")
    specials = {a["id"] for a in tokenizer_json["added_tokens"] if a["special"]}
    for index, token_type in enumerate(types):
        if index in specials:
            assert token_type == gguf.TokenType.CONTROL, tokens[index]
        elif index in by_id:
            assert token_type == gguf.TokenType.NORMAL, tokens[index]
        else:
            assert token_type == gguf.TokenType.UNUSED, tokens[index]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    assert merges and field(reader, "tokenizer.ggml.merges") == merges
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert field(reader, "tokenizer.ggml.unknown_token_id") == tokenizer.convert_tokens_to_ids("<unk>")
    assert field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.convert_tokens_to_ids("!")
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    chat_template = json.loads((merged / "tokenizer_config.json").read_text())["chat_template"]
    assert field(reader, "tokenizer.chat_template") == chat_template


# --- the vision projector (mmproj) ------------------------------------------------------------------------------


def mmproj_expected(weights: dict[str, torch.Tensor], config: dict) -> dict[str, np.ndarray]:
    """The mmproj tensors from the merged weights by llama.cpp's MiniCPM-V image encoder layout."""
    vision_names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
        "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up",
    }  # fmt: skip
    out: dict[str, np.ndarray] = {}
    for name, tensor in weights.items():
        value = tensor.numpy()
        if name.startswith("vpm.encoder.layers."):
            layer, rest = name[len("vpm.encoder.layers.") :].split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            out[f"v.blk.{layer}.{vision_names[module]}.{suffix}"] = value
        elif name.startswith("vpm."):
            short = {
                "vpm.embeddings.patch_embedding.weight": "v.patch_embd.weight",
                "vpm.embeddings.patch_embedding.bias": "v.patch_embd.bias",
                "vpm.embeddings.position_embedding.weight": "v.position_embd.weight",
                "vpm.post_layernorm.weight": "v.post_ln.weight",
                "vpm.post_layernorm.bias": "v.post_ln.bias",
            }
            out[short[name]] = value
        elif name.startswith("resampler.attn.in_proj_"):
            kind = name.rsplit("_", 1)[1]
            for part, chunk in zip("qkv", np.split(value, 3), strict=True):
                out[f"resampler.attn.{part}.{kind}"] = chunk
        elif name.startswith("resampler.attn.out_proj."):
            out["resampler.attn.out." + name.rsplit(".", 1)[1]] = value
        elif name == "resampler.kv_proj.weight":
            out["resampler.kv.weight"] = value
        elif name == "resampler.proj":
            out["resampler.proj.weight"] = value.T
        elif name.startswith("resampler."):
            out[name] = value
    hidden = config["hidden_size"]
    out["resampler.pos_embed_k"] = sincos_2d_table(hidden, 70, 70).reshape(70 * 70, hidden).numpy()
    return out


def test_mmproj_gives_the_merged_vision_tower_and_resampler_exactly(exported_f16, weights, config):
    _, mmproj_path = exported_f16
    tensors = tensors_of(mmproj_path)
    expected = mmproj_expected(weights, config)
    assert sorted(tensors) == sorted(expected)  # nothing dropped, nothing extra
    for name, tensor in tensors.items():
        matrix = name.endswith(".weight") and expected[name].ndim >= 2
        wanted = gguf.GGMLQuantizationType.F16 if matrix else gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == wanted, name
        data = np.asarray(tensor.data)
        assert data.shape == expected[name].shape, name
        np.testing.assert_array_equal(data, expected[name].astype(data.dtype), err_msg=name)


def test_mmproj_metadata_is_what_llama_cpp_reads(exported_f16, config, merged):
    reader = gguf.GGUFReader(exported_f16[1])
    vision = config["vision_config"]
    preprocessor = json.loads((merged / "preprocessor_config.json").read_text())
    assert field(reader, "general.architecture") == "clip"
    assert field(reader, "clip.projector_type") == "resampler"
    assert field(reader, "clip.minicpmv_version") == 2
    assert field(reader, "clip.minicpmv_query_num") == config["query_num"]
    assert field(reader, "clip.has_vision_encoder") is True
    assert field(reader, "clip.has_text_encoder") is False
    assert field(reader, "clip.has_minicpmv_projector") is True
    assert field(reader, "clip.use_gelu") is True
    assert field(reader, "clip.vision.image_size") == config["slice_config"]["scale_resolution"]
    assert field(reader, "clip.vision.patch_size") == vision["patch_size"]
    assert field(reader, "clip.vision.embedding_length") == vision["hidden_size"]
    assert field(reader, "clip.vision.feed_forward_length") == vision["intermediate_size"]
    assert field(reader, "clip.vision.attention.head_count") == vision["num_attention_heads"]
    assert field(reader, "clip.vision.block_count") == vision["num_hidden_layers"]
    assert field(reader, "clip.vision.projection_dim") == 0
    assert field(reader, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    assert field(reader, "clip.vision.image_mean") == pytest.approx(preprocessor["norm_mean"])
    assert field(reader, "clip.vision.image_std") == pytest.approx(preprocessor["norm_std"])


# --- quantisation ----------------------------------------------------------------------------------------------


def test_q8_0_dequantises_within_q8_0_error(merged, weights, config, tmp_path):
    llm_path, mmproj_path = export_gguf(merged, tmp_path / "q8", "q8_0")
    assert llm_path.name == "model-Q8_0.gguf"
    reader = gguf.GGUFReader(llm_path)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    quantised = 0
    for tensor in reader.tensors:
        source = weights[llm_source(tensor.name)].numpy()
        if source.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, tensor.name
        quantised += 1
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(source.shape)
        if ".attn_q." in tensor.name:
            data = undo_rope_permutation(data, heads)
        elif ".attn_k." in tensor.name:
            data = undo_rope_permutation(data, kv_heads)
        # Q8_0: blocks of 32 along a row, one scale amax / 127 each; a value is off by at most half a step
        # (plus the scale's own fp16 rounding, well within a full step).
        blocks = source.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        error = np.abs(data.reshape(-1, 32) - blocks)
        assert (error <= step).all(), tensor.name
        assert error.max() > 0  # really quantised, not stored exactly
    assert quantised == 2 + 7 * config["num_hidden_layers"]
    # the projector is never quantised: llama.cpp's clip loader expects F16 / F32
    types = {t.tensor_type for t in gguf.GGUFReader(mmproj_path).tensors}
    assert types <= {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}


# --- refusals, in one line, before any weight is read ------------------------------------------------------------


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = cli(["--gguf", *argv])
    return code, capsys.readouterr().err.strip()


def test_unsupported_type_lists_the_supported_ones(merged, tmp_path, capsys):
    code, err = run_main(["--model", str(merged), "--output", str(tmp_path / "o"), "--type", "q4_k_m"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "q4_k_m" in err and "f16" in err and "q8_0" in err and "llama-quantize" in err
    assert not (tmp_path / "o").exists()


def test_another_version_is_refused(merged, tmp_path, capsys):
    other = tmp_path / "v26"
    other.mkdir()
    config = json.loads((merged / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, version="2.6")))
    code, err = run_main(["--model", str(other), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "2.6" in err and "2.5" in err


def test_a_2_0_checkpoint_without_a_version_field_is_refused(tmp_path, capsys):
    """MiniCPM-V 2.0's config.json has no "version": it is told apart by its own fields, not taken for 2.5."""
    other = tmp_path / "v2"
    other.mkdir()
    shutil.copy(Path(__file__).parent / "reference_v2" / "config.json", other / "config.json")
    code, err = run_main(["--model", str(other), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "version 2.0" in err and "2.5" in err


def test_missing_model_directory(tmp_path, capsys):
    code, err = run_main(["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--model" in err


def test_missing_gguf_package_names_the_install(merged, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(GGUFExportError, match="pip install gguf"):
        export_gguf(merged, tmp_path / "o", "f16")


def test_existing_output_needs_overwrite(merged, exported_f16, capsys):
    out = exported_f16[0].parent
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, err = run_main(["--model", str(merged), "--output", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_command_line_writes_both_files(tiny_model, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "finetune.export", "--gguf", "--model", str(tiny_model), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mmproj-model-f16.gguf", "model-F16.gguf"]
    assert "llama-mtmd-cli" in result.stdout


def test_a_tokenizer_without_merges_is_refused_before_anything_is_written(golden_dir, tmp_path):
    """llama.cpp refuses a BPE vocabulary without `tokenizer.ggml.merges` ("cannot find tokenizer merges", seen with
    llama.cpp's llama-simple on this export), and the gguf package writes no empty array: the golden tiny tokenizer,
    which has no merges, is refused in one line instead of giving files llama.cpp cannot load."""
    assert json.loads((golden_dir / "tokenizer.json").read_text())["model"]["merges"] == []
    with pytest.raises(GGUFExportError, match="no BPE merges"):
        export_gguf(golden_dir, tmp_path / "out", "f16")
    assert not list((tmp_path / "out").glob("*.gguf*"))


def llama_cpp_tool(name: str) -> str | None:
    """A llama.cpp program from LLAMA_CPP_BIN (its build's bin/ folder) or PATH; None where there is no build."""
    folder = os.environ.get("LLAMA_CPP_BIN")
    found = Path(folder, name) if folder else None
    return str(found) if found and found.is_file() else shutil.which(name)


@pytest.mark.slow
@pytest.mark.skipif(llama_cpp_tool("llama-simple") is None, reason="no llama.cpp build (set LLAMA_CPP_BIN)")
def test_llama_cpp_continues_a_prompt_with_the_models_greedy_tokens(tiny_model, tmp_path):
    """The exported language model in llama.cpp itself: its greedy continuation of a prompt (llama-simple: BOS +
    the prompt, argmax sampling) is, as text, the project's model's greedy continuation of the same tokens."""
    from transformers import AutoModel, AutoTokenizer

    llm_path, _ = export_gguf(tiny_model, tmp_path / "gguf", "f16")
    prompt, new_tokens = "The red star is", 12
    result = subprocess.run([llama_cpp_tool("llama-simple"), "-m", str(llm_path), "-n", str(new_tokens), prompt],
                            capture_output=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    model = AutoModel.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    output = model.llm.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = tokenizer.decode(output[0])
    assert result.stdout.decode("utf-8", errors="replace").strip("\n") == ours
