"""Every feature of the suite on MiniCPM-V 2.0, on CPU with the tiny 2.0 checkpoint (finetune.synthetic): the
launcher and its LLM_TYPE check, the default LoRA targets on MiniCPM's LLM, QLoRA, DeepSpeed ZeRO-2 and ZeRO-3,
merge and its base check, the merged model loading without this package, chat and evaluate. What the 2.0 model and
data path compute is checked in test_model_v2.py and test_dataset_v2.py; here each feature runs the way a user
runs it. (The planner's 2.0 model: tests/test_plan.py.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LAUNCHER, ROOT, base_args, deepspeed_two_process_run, quick_launcher_env
from PIL import Image
from safetensors.torch import load_file, save_file

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.arguments import DEFAULT_LORA_TARGETS, UsageError
from finetune.dataset import DataCollator, DataSettings, SupervisedDataset
from finetune.model.tokenization import SpecialTokens
from finetune.model.versions import MINICPM_V_2, version_of_dict
from finetune.model_setup import lora_targets
from finetune.preflight import preflight
from finetune.synthetic import build_tiny_checkpoint
from finetune.train import train

TESTS = ROOT / "tests"


@pytest.fixture(scope="module")
def model_v2(tmp_path_factory) -> Path:
    """The tiny 2.0 checkpoint (read-only for tests: copy it to change it), fp32 weights."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("v2") / "model", version="2.0")


@pytest.fixture(scope="module")
def images_v2(tmp_path_factory) -> Path:
    """Two pictures: one wide enough to be sliced at the tiny's 112-pixel scale resolution, one small."""
    folder = tmp_path_factory.mktemp("images_v2")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (112, 250, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (70, 56, 3), dtype=np.uint8)).save(folder / "small.png")
    return folder


@pytest.fixture(scope="module")
def data_v2(images_v2, tmp_path_factory) -> Path:
    """Four samples in the training format: a sliced image, two images with markers, a multi-turn text sample and
    a short text sample."""
    samples = [
        {"id": "wide", "image": str(images_v2 / "wide.png"),
         "conversations": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A wide picture."}]},
        {"id": "two", "image": {"<image_00>": str(images_v2 / "small.png"), "<image_01>": str(images_v2 / "wide.png")},
         "conversations": [{"role": "user", "content": "<image_00> and <image_01>: which is wider?"}, {"role": "assistant", "content": "The second."}]},
        {"id": "turns", "conversations": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"},
                                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": "hi again"}]},
        {"id": "text", "conversations": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "red"}]},
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("data_v2") / "train.json"
    path.write_text(json.dumps(samples))
    return path


def sample_batch(tokenizer, config, data: Path) -> dict:
    """Every sample of DATA as one padded training batch (data + attention_mask)."""
    dataset = SupervisedDataset(DataSettings(str(data)), tokenizer, config)
    return DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad, packing=False)(
        [dataset[i] for i in range(len(dataset))]
    )


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(data=batch["data"], attention_mask=batch["attention_mask"]).logits


# --- 1. launcher and preflight --------------------------------------------------------------------------------


@pytest.mark.slow
def test_launcher_trains_2_0_with_llm_type_minicpm(model_v2, data_v2, tmp_path):
    """(LLM_TYPE unset: the preflight test below takes the version from the checkpoint, and the launcher passes
    no --llm_type then, as in every 2.5 launcher test.)"""
    from peft import PeftModel
    from transformers import AutoModel

    out = tmp_path / "out"
    env = quick_launcher_env(model_v2, data_v2, out, LLM_TYPE="minicpm")
    result = subprocess.run(["sh", str(LAUNCHER), "--dataloader_num_workers", "0"], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "[data]   samples: 4  kept: 4" in result.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    tuned = PeftModel.from_pretrained(AutoModel.from_pretrained(model_v2, dtype=torch.float32), out)
    assert any(".lora_A." in name for name, _ in tuned.named_parameters())


@pytest.mark.slow
def test_launcher_refuses_an_llm_type_of_another_version_before_torchrun(model_v2, data_v2, tmp_path):
    env = quick_launcher_env(model_v2, data_v2, tmp_path / "out", LLM_TYPE="qwen")
    result = subprocess.run(["sh", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    error = result.stderr.strip()
    assert "\n" not in error and "Traceback" not in error, error
    assert "--llm_type qwen" in error and "MiniCPM-V 2.0 checkpoint" in error and "--llm_type minicpm" in error
    assert "[launch] model=" not in result.stdout  # torchrun never started


def test_preflight_takes_2_0_from_the_checkpoint_and_refuses_another_versions_llm_type(model_v2, data_v2, tmp_path):
    paths = ["--model_name_or_path", str(model_v2), "--data_path", str(data_v2), "--output_dir", str(tmp_path / "o")]
    for extra in ([], ["--llm_type", ""], ["--llm_type", "minicpm"]):
        preflight([*paths, *extra])
    for llm_type, version in (("llama3", "2.5"), ("qwen", "2.6")):
        with pytest.raises(UsageError) as raised:
            preflight([*paths, "--llm_type", llm_type])
        message = str(raised.value)
        assert "\n" not in message and f"--llm_type {llm_type} (MiniCPM-V {version})" in message
        assert "a MiniCPM-V 2.0 checkpoint" in message
    # the published hub id names its version without a download (tests run offline)
    with pytest.raises(UsageError, match="--llm_type qwen .* openbmb/MiniCPM-V-2, a MiniCPM-V 2.0 checkpoint"):
        preflight(["--model_name_or_path", "openbmb/MiniCPM-V-2", "--data_path", str(data_v2),
                   "--output_dir", str(tmp_path / "o"), "--llm_type", "qwen"])  # fmt: skip


# --- 2. LoRA on MiniCPM's LLM, the adapter, QLoRA ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_v2(model_v2, data_v2, tmp_path_factory):
    """(trainer, adapter directory): 4 in-process steps on the 2.0 tiny with the default flags (LoRA on the
    default targets, resampler and vision tower trained)."""
    out = tmp_path_factory.mktemp("run_v2") / "adapter"
    trainer = train(base_args(model_v2, data_v2, out, "--max_steps", "4"))
    return trainer, out


def test_default_lora_targets_wrap_minicpms_attention_and_the_adapter_reloads(trained_v2, model_v2, data_v2):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    trainer, out = trained_v2
    base = AutoModel.from_pretrained(model_v2, dtype=torch.float32).eval()
    targets = lora_targets(base, DEFAULT_LORA_TARGETS)
    layers = base.config.num_hidden_layers
    # MiniCPM: q/k/v/o of each decoder layer of the LLM; none of the vision tower's (timm-style fused qkv) linears
    assert all(name.startswith("llm.") for name in targets), targets
    assert sorted(name.split("self_attn.")[1] for name in targets) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj"] * layers
    )
    wrapped_in_training = {name for name, module in trainer.model.named_modules() if isinstance(module, LoraLayer)}
    assert not any(".vpm." in name for name in wrapped_in_training)

    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(model_v2, dtype=torch.float32), out).eval()
    for name in targets:
        assert isinstance(reloaded.base_model.model.get_submodule(name), LoraLayer), name
    tokenizer = trainer.train_dataset.encoder.tokenizer
    batch = sample_batch(tokenizer, base.config, data_v2)
    expected = logits_of(trainer.model.eval(), batch)
    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)
    assert (expected - logits_of(base, batch)).abs().max() > 1e-3, "the adapter must change the model"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (CPU 4-bit)")
def test_q_lora_trains_2_0_and_the_adapter_reloads_on_the_4bit_base(model_v2, data_v2, tmp_path, monkeypatch):
    """--q_lora on the 2.0 tiny: only the LLM's decoder linears are NF4; training steps and the adapter gives the
    trained logits on a 4-bit base. finetune.py refuses --q_lora without CUDA: only that check is relaxed here."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModel, BitsAndBytesConfig

    import finetune.train as run

    real_check = run.check_arguments
    monkeypatch.setattr(
        run, "check_arguments", lambda m, d, t, lora: real_check(m, d, t, dataclasses.replace(lora, q_lora=False))
    )
    out = tmp_path / "adapter"
    trainer = run.train(base_args(model_v2, data_v2, out, "--q_lora", "true", "--bf16", "true", "--max_steps", "2",
                                  "--tune_vision", "false", *([] if torch.cuda.is_available() else ["--use_cpu", "true"])))  # fmt: skip
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    quantized = {name for name, module in trainer.model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized and all(".llm.model.layers." in name for name in quantized)
    assert any(name.endswith("q_proj.base_layer") for name in quantized)

    batch = sample_batch(trainer.train_dataset.encoder.tokenizer, trainer.model.base_model.model.config, data_v2)

    def logits(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return logits_of(model, batch).float()

    expected = logits(trainer.model.eval())
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["vpm", "resampler", "lm_head"])  # fmt: skip
    base = AutoModel.from_pretrained(model_v2, dtype=torch.bfloat16, quantization_config=bnb_config)
    # Training keeps the trained resampler in fp32 on the bf16 base, and the adapter saves it so: on a bf16
    # resampler its weights would be rounded to bf16, which alone moves the 2.0 tiny's logits by ~0.1.
    base.resampler.float()
    on_4bit = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(logits(on_4bit), expected, atol=1e-2, rtol=0)


# --- merge, the merged model without this package, chat, evaluate ------------------------------------------------


def test_merge_checks_the_2_0_base_and_the_merged_model_gives_the_adapters_logits(
    trained_v2, model_v2, data_v2, tmp_path, capsys
):
    from transformers import AutoModel

    from finetune import merge

    trainer, adapter = trained_v2
    merged = tmp_path / "merged"
    assert merge.cli(["--base", str(model_v2), "--adapter", str(adapter), "--out", str(merged), "--dtype", "fp32"]) == 0
    # the published 2.0 config names no "version": the merged one is told apart by 2.0's own fields, as the base is
    assert version_of_dict(json.loads((merged / "config.json").read_text())) is MINICPM_V_2
    model = AutoModel.from_pretrained(merged, dtype=torch.float32).eval()
    assert type(model.llm).__name__ == "MiniCPMForCausalLM"
    batch = sample_batch(trainer.train_dataset.encoder.tokenizer, model.config, data_v2)
    torch.testing.assert_close(logits_of(model, batch), logits_of(trainer.model.eval(), batch), atol=1e-4, rtol=0)

    # another 2.0 base of the same shapes (one q_proj weight changed): refused by the recorded identity
    other = Path(shutil.copytree(model_v2, tmp_path / "other"))
    weights = load_file(other / "model.safetensors")
    name = "llm.model.layers.0.self_attn.q_proj.weight"
    weights[name] = weights[name] + 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert merge.cli(["--base", str(other), "--adapter", str(adapter), "--out", str(tmp_path / "m2")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "was not trained on --base" in error


@pytest.mark.slow
def test_merged_2_0_loads_and_chats_without_this_package(trained_v2, model_v2, images_v2, tmp_path):
    """tests/load_without_finetune.py on the merged 2.0 in `python -I` outside the repository: the checkpoint's
    own code computes the project's logits and greedy answer."""
    from transformers import AutoModel, AutoTokenizer

    from finetune import merge
    from finetune.model.chat_prompt import render_chat_prompt

    _, adapter = trained_v2
    merged = tmp_path / "merged"
    assert merge.cli(["--base", str(model_v2), "--adapter", str(adapter), "--out", str(merged), "--dtype", "fp32"]) == 0
    greedy = {"sampling": False, "num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 6}
    image, question = Image.open(images_v2 / "wide.png").convert("RGB"), "What is in the image?"
    model, tokenizer = (
        AutoModel.from_pretrained(merged, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(merged),
    )
    prompt, images = render_chat_prompt(image, [{"role": "user", "content": question}], tokenizer)
    data = model.prepare_inputs(prompt, images, tokenizer)
    with torch.no_grad():
        logits = model(data=data).logits[0]
    answer, _, _ = model.chat(image=image, msgs=[{"role": "user", "content": question}], context=None,
                              tokenizer=tokenizer, **greedy)  # fmt: skip
    torch.save(data, tmp_path / "data.pt")

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    script = shutil.copy(TESTS / "load_without_finetune.py", workdir / "load.py")
    job = {"name": "merged_v2", "checkpoint": str(merged), "data": str(tmp_path / "data.pt"), "greedy": greedy,
           "image": str(images_v2 / "wide.png"), "question": question, "resave": str(workdir / "resaved"),
           "chat_returns_context": True}  # fmt: skip
    (workdir / "jobs.json").write_text(json.dumps([job]))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"))
    run = subprocess.run([sys.executable, "-I", str(script), str(workdir / "jobs.json"), str(workdir / "results.pt")],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(workdir / "results.pt", weights_only=True)
    assert results["finetune_modules"] == []
    elsewhere = results["merged_v2"]
    assert [".".join(c.split(".")[-2:]) for c in elsewhere["classes"]][0] == "modeling_minicpmv.MiniCPMV"
    torch.testing.assert_close(elsewhere["logits"], logits)
    torch.testing.assert_close(elsewhere["resaved_logits"], logits)
    assert answer and elsewhere["greedy"] == answer
    # The README's `res, context, _ = model.chat(image=..., msgs=..., context=None, tokenizer=..., sampling=True, ...)`
    assert len(elsewhere["snippet"]) == 1 and isinstance(elsewhere["snippet"][0], str)


def test_chat_and_evaluate_run_on_a_2_0_adapter(trained_v2, model_v2, data_v2, images_v2, tmp_path):
    import io

    from finetune.chat import chat, load_model
    from finetune.evaluate import evaluate

    _, adapter = trained_v2
    model, tokenizer = load_model(str(model_v2), str(adapter), device="cpu", dtype="fp32")
    stream = io.StringIO()
    answer = chat(model, tokenizer, "What is it?", [str(images_v2 / "wide.png")], greedy=True, max_new_tokens=5,
                  stream=stream)  # fmt: skip
    assert answer and stream.getvalue().strip() == answer.strip()
    summary = evaluate(model, tokenizer, str(data_v2), tmp_path / "pred.jsonl", max_new_tokens=4)
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert summary["samples"] == len(rows) == 4
    assert all(row["prompt"].startswith("<用户>") and row["prompt"].endswith("<AI>") for row in rows)


def chat_prompt_and_training_item(trainer, data: Path, sample_id: str):
    """(chat / evaluate's model inputs for the sample's turns up to its last answer, the training item, the
    tokenizer) for sample `sample_id` of DATA."""
    from finetune.chat import build_prompt, load_image
    from finetune.dataset import open_source, parse_record
    from finetune.evaluate import split_record

    model = trainer.model.base_model.model
    tokenizer = trainer.train_dataset.encoder.tokenizer
    dataset = SupervisedDataset(DataSettings(str(data), model_max_length=None), tokenizer, model.config)
    source = open_source(str(data))
    index = next(i for i in range(len(source)) if source[i]["id"] == sample_id)
    record = parse_record(source[index], source.location(index), str(data.parent))
    turns, _ = split_record(record)
    prompt, images = build_prompt(tokenizer, turns, [(m, load_image(p)) for m, p in record.images])
    return model.prepare_inputs(prompt, images, tokenizer), dataset.prepare(index), tokenizer


def training_prefix(item, tokenizer) -> list[int]:
    """The training ids up to and including the last `<AI>` (the prompt the last answer is trained after)."""
    ids = item.input_ids.tolist()
    assistant = tokenizer.convert_tokens_to_ids("<AI>")
    return ids[: max(i for i, token in enumerate(ids) if token == assistant) + 1]


@pytest.mark.parametrize("sample_id", ["wide", "two", "turns", "text"])
def test_chat_prompt_is_the_2_0_training_prefix(trained_v2, data_v2, sample_id):
    """chat / evaluate's prompt ids for every sample equal the training ids up to its last answer (BOS, `<用户>` /
    `<AI>` turns, an earlier answer without `</s>` as 2.0's chat() writes a history), with the same image bounds
    and pixels (2.0's normalization)."""
    from finetune.model.image_processing import normalize_pixels

    trainer, _ = trained_v2
    inputs, item, tokenizer = chat_prompt_and_training_item(trainer, data_v2, sample_id)
    assert item.input_ids[0] == tokenizer.bos_token_id
    assert inputs["input_ids"][0].tolist() == training_prefix(item, tokenizer)
    torch.testing.assert_close(inputs["image_bound"][0], item.image_bound)
    for got, stored in zip(inputs["pixel_values"][0], item.pixel_values, strict=True):
        torch.testing.assert_close(got, normalize_pixels(stored), atol=1e-6, rtol=0)  # the batch stores 0..255


# --- DeepSpeed ZeRO-2 and ZeRO-3, two CPU processes ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_2_0_on_two_processes(model_v2, data_v2, tmp_path, stage):
    """ZeRO-3 partitions MiniCPM's parameters (the tied embedding too) and gathers them per call; the saved adapter
    must hold whole tensors and reload onto the 2.0 base."""
    from peft import PeftModel
    from transformers import AutoModel

    out = deepspeed_two_process_run(model_v2, data_v2, tmp_path, stage)
    PeftModel.from_pretrained(AutoModel.from_pretrained(model_v2, dtype=torch.float32), out)


# --- tuner and the training path's data checks ----------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="needs optuna")
def test_tuner_searches_on_the_2_0_tiny(model_v2, data_v2, tmp_path, capsys):
    import math

    from finetune.tune import main

    result = main(["--model", str(model_v2), "--data", str(data_v2), "--trials", "2", "--max-steps", "1",
                   "--subset", "4", "--output-dir", str(tmp_path / "out"), "--seed", "3",
                   "--", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--tune_vision", "false"])  # fmt: skip
    assert result.trials == 2 and math.isfinite(result.best_eval_loss)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == result.line and f"MODEL={model_v2}" in line and "bash finetune/finetune_lora.sh" in line


def test_bad_2_0_samples_stop_training_before_it_starts_each_named(model_v2, data_v2, images_v2, tmp_path):
    good = json.loads(data_v2.read_text())
    bad = [
        {"id": "no_file", "image": str(tmp_path / "missing.png"), "conversations": good[0]["conversations"]},
        {"id": "role_text", "conversations": [{"role": "user", "content": "Hi <AI> there"}, {"role": "assistant", "content": "ok"}]},
        {"id": "system", "conversations": [{"role": "system", "content": "Be brief."}, *good[3]["conversations"]]},
        {"id": "two_markers", "image": str(images_v2 / "wide.png"),
         "conversations": [{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "ok"}]},
    ]  # fmt: skip
    data = tmp_path / "data.json"
    data.write_text(json.dumps(good + bad))
    out = tmp_path / "out"
    with pytest.raises(UsageError) as raised:
        train(base_args(model_v2, data, out, "--max_steps", "1"))
    message = str(raised.value)
    assert message.startswith(f"{len(bad)} bad train samples")
    listed = dict(line.strip().split(": ", 1) for line in message.splitlines()[1:])
    assert set(listed) == {sample["id"] for sample in bad}
    assert "missing.png" in listed["no_file"] and "<AI>" in listed["role_text"]
    assert "MiniCPM-V 2.0 has no system turn" in listed["system"]
    assert not (out / "adapter_model.safetensors").exists()
