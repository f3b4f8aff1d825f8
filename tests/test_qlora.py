"""--q_lora true: the BitsAndBytesConfig, what is quantized, training and adapter reloads (bitsandbytes' CPU backend).

bitsandbytes >= 0.45 quantizes and runs NF4 Linear4bit on the CPU, so the real loader path runs here with the tiny
model; finetune.py itself still refuses --q_lora without CUDA (CPU 4-bit is far too slow for real training), so
the end-to-end test relaxes only that one check. GPU numbers: bench/README.md (the qlora suite).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, base_args, path_flags

import finetune.model_setup as model_setup
import finetune.train as run
from finetune.arguments import LoraArguments, ModelArguments, UsageError
from finetune.model_setup import configure_trainable, load_model_and_tokenizer

try:
    import bitsandbytes as bnb

    HAVE_BNB = True
except Exception:  # noqa: BLE001 - missing, or no backend for this machine
    HAVE_BNB = False
needs_bnb = pytest.mark.skipif(
    not HAVE_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes>=0.45: CPU 4-bit)"
)


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(8, 4)


def test_bnb_config_is_nf4_double_quant_and_skips_vision_resampler_lm_head(tiny_model, monkeypatch):
    captured = {}

    def fake_from_pretrained(path, **kwargs):
        captured.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(model_setup, "load_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError, match="stop"):
        load_model_and_tokenizer(
            ModelArguments(model_name_or_path=str(tiny_model)),
            SimpleNamespace(bf16=True, fp16=False, loss_chunk_size=2048),
            LoraArguments(q_lora=True),
        )
    config = captured["quantization_config"]
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert set(config.llm_int8_skip_modules) == {"vpm", "resampler", "lm_head"}
    if torch.cuda.is_available():
        assert captured["device_map"] == {"": 0}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_q_lora_without_cuda_is_refused_in_one_line(tiny_model, demo, tmp_path):
    args = path_flags(tiny_model, demo / "train.json", tmp_path, "--q_lora", "true")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        run.train(args)
    result = subprocess.run(
        [sys.executable, str(ROOT / "finetune" / "finetune.py"), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("finetune.py: error:")]
    assert errors == ["finetune.py: error: --q_lora true needs a CUDA GPU (bitsandbytes 4-bit kernels)"]


@needs_bnb
def test_only_llm_decoder_linears_are_4bit(tiny_model):
    model, _ = load_model_and_tokenizer(
        ModelArguments(model_name_or_path=str(tiny_model)),
        SimpleNamespace(bf16=True, fp16=False, loss_chunk_size=2048),
        LoraArguments(q_lora=True),
    )
    four_bit = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert four_bit and all(name.startswith("llm.model.layers.") for name in four_bit)
    assert {n for n in linears if n.startswith("llm.model.layers.")} == four_bit
    assert "llm.lm_head" in linears - four_bit
    for prefix in ("vpm.", "resampler.", "llm.lm_head", "llm.model.embed_tokens"):
        dtypes = {p.dtype for n, p in model.named_parameters() if n.startswith(prefix)}
        assert dtypes == {torch.bfloat16}, (prefix, dtypes)
    weight = model.llm.model.layers[0].self_attn.q_proj.weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested, "double quantisation"


@needs_bnb
def test_configure_trainable_keeps_frozen_modules_bf16(tiny_model):
    model, _ = load_model_and_tokenizer(
        ModelArguments(model_name_or_path=str(tiny_model)),
        SimpleNamespace(bf16=True, fp16=False, loss_chunk_size=2048),
        LoraArguments(q_lora=True),
    )
    args = SimpleNamespace(
        tune_llm=False, tune_vision=False, use_lora=True, tune_embeddings=False, gradient_checkpointing=True
    )
    peft_model = configure_trainable(model, args, LoraArguments(q_lora=True))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("resampler" in n for n in trainable)
    assert not any(".vpm." in n for n in trainable)
    # no fp32 upcast of frozen weights (peft's prepare_model_for_kbit_training would double them)
    assert {p.dtype for n, p in peft_model.named_parameters() if ".vpm." in n or "embed_tokens" in n} == {
        torch.bfloat16
    }


@pytest.mark.slow
@needs_bnb
def test_q_lora_trains_and_the_adapter_reloads_on_both_bases(tiny_model, demo, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModel, BitsAndBytesConfig

    from finetune.dataset import DataCollator, DataSettings, SupervisedDataset
    from finetune.model.tokenization import SpecialTokens

    real_check = run.check_arguments
    monkeypatch.setattr(
        run, "check_arguments", lambda m, d, t, lora: real_check(m, d, t, dataclasses.replace(lora, q_lora=False))
    )
    out = tmp_path / "adapter"
    # --seed 42 (TrainingArguments' default) is the seed the reload tolerances below were set with.
    trainer = run.train(base_args(tiny_model, demo / "train.json", out, "--q_lora", "true", "--bf16", "true", "--max_steps", "4",
                                "--tune_vision", "false", "--seed", "42", *([] if torch.cuda.is_available() else ["--use_cpu", "true"])))  # fmt: skip
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "adapter_model.safetensors").is_file()

    tokenizer = trainer.train_dataset.encoder.tokenizer
    config = trainer.model.base_model.model.config
    dataset = SupervisedDataset(DataSettings(str(demo / "eval.json")), tokenizer, config)
    batch = DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad)([dataset[i] for i in range(2)])
    trained = trainer.model.eval()

    def logits(model):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(data=batch["data"], attention_mask=batch["attention_mask"]).logits.float()

    expected = logits(trained)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["vpm", "resampler", "lm_head"])  # fmt: skip
    on_4bit = PeftModel.from_pretrained(
        AutoModel.from_pretrained(tiny_model, dtype=torch.bfloat16, quantization_config=bnb_config), out
    ).eval()
    torch.testing.assert_close(logits(on_4bit), expected, atol=1e-2, rtol=0)
    on_bf16 = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model, dtype=torch.bfloat16), out).eval()
    assert (
        sum("lora_A" in n for n, _ in on_bf16.named_parameters())
        == sum("lora_A" in n for n, _ in on_4bit.named_parameters())
        > 0
    )
    # the bf16 base differs from the NF4 one only by quantisation error
    assert (logits(on_bf16) - expected).abs().mean() < 0.1 * expected.abs().mean()
