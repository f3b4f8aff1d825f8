"""Every feature of the suite on MiniCPM-V 2.6, on CPU with the golden tiny 2.6 checkpoint (copied to a temporary
directory): the launcher and its LLM_TYPE check, LoRA targets on Qwen2's biased projections, QLoRA, DeepSpeed ZeRO-2
and ZeRO-3, merge, chat, evaluate, the planner and the tuner. What the 2.6 model and data path compute is checked
against the published code in test_model_v2_6.py and test_dataset_v2_6.py; here each feature runs the way a user
runs it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import LAUNCHER, PYTHON_BIN, ROOT, base_args, deepspeed_two_process_run, quick_launcher_env
from safetensors.torch import load_file, save_file

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.arguments import DEFAULT_LORA_TARGETS, UsageError
from finetune.dataset import DataCollator, DataSettings, SupervisedDataset
from finetune.model.tokenization import SpecialTokens
from finetune.model_setup import lora_targets
from finetune.preflight import preflight
from finetune.train import train


@pytest.fixture(scope="module")
def model_v2_6(golden_v2_6_dir, tmp_path_factory) -> Path:
    """The golden tiny 2.6 checkpoint, copied (read-only for tests: copy it again to change it)."""
    return Path(shutil.copytree(golden_v2_6_dir, tmp_path_factory.mktemp("v2_6") / "model"))


@pytest.fixture(scope="module")
def data_v2_6(golden_v2_6_images, tmp_path_factory) -> Path:
    """Four samples in the training format: a sliced image, two images with markers, a multi-turn text sample with
    a system turn, and a short text sample."""
    samples = [
        {"id": "wide", "image": str(golden_v2_6_images / "wide_260x150.png"),
         "conversations": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A wide picture."}]},
        {"id": "two", "image": {"<image_00>": str(golden_v2_6_images / "tall_120x330.png"), "<image_01>": str(golden_v2_6_images / "small_90x70.png")},
         "conversations": [{"role": "user", "content": "<image_00> and <image_01>: which is taller?"}, {"role": "assistant", "content": "The first."}]},
        {"id": "system", "conversations": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": " Say hi "},
                                           {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again"}, {"role": "assistant", "content": "hi again"}]},
        {"id": "text", "conversations": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "red"}]},
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("data_v2_6") / "train.json"
    path.write_text(json.dumps(samples))
    return path


def with_version(model: Path, target: Path, version) -> Path:
    """A copy of MODEL whose config.json names another version."""
    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(dict(config, version=version)))
    return target


# --- 1. launcher and preflight --------------------------------------------------------------------------------


@pytest.mark.slow
def test_launcher_trains_2_6_with_llm_type_qwen(model_v2_6, data_v2_6, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    out = tmp_path / "out"
    env = quick_launcher_env(model_v2_6, data_v2_6, out, LLM_TYPE="qwen")
    result = subprocess.run(["sh", str(LAUNCHER), "--dataloader_num_workers", "0"], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "[data]   samples: 4  kept: 4" in result.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    tuned = PeftModel.from_pretrained(AutoModel.from_pretrained(model_v2_6), out)
    assert any(".lora_A." in name for name, _ in tuned.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize(("llm_type", "version"), [("llama3", "2.6"), ("qwen", "2.5")])
def test_launcher_refuses_an_llm_type_of_another_version_before_torchrun(
    model_v2_6, tiny_model, data_v2_6, tmp_path, llm_type, version
):
    model = model_v2_6 if version == "2.6" else tiny_model
    env = quick_launcher_env(model, data_v2_6, tmp_path / "out", LLM_TYPE=llm_type)
    result = subprocess.run(["sh", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    error = result.stderr.strip()
    assert "\n" not in error and "Traceback" not in error, error
    assert f"--llm_type {llm_type}" in error and f"MiniCPM-V {version} checkpoint" in error
    assert "[launch] model=" not in result.stdout  # torchrun never started


def test_llm_type_unset_or_empty_is_taken_from_the_checkpoint(model_v2_6, data_v2_6, tmp_path):
    """The launcher's default LLM_TYPE is empty and passes no --llm_type; finetune.py's empty value means the same."""
    header = LAUNCHER.read_text()
    assert 'LLM_TYPE=${LLM_TYPE:-""}' in header
    for extra in ([], ["--llm_type", ""], ["--llm_type", "qwen"]):
        preflight(["--model_name_or_path", str(model_v2_6), "--data_path", str(data_v2_6),
                   "--output_dir", str(tmp_path / "out"), *extra])  # fmt: skip
    # a published hub id names its version without a download (tests run offline)
    with pytest.raises(UsageError, match="--llm_type llama3 .* openbmb/MiniCPM-V-2_6, a MiniCPM-V 2.6 checkpoint"):
        preflight(["--model_name_or_path", "openbmb/MiniCPM-V-2_6", "--data_path", str(data_v2_6),
                   "--output_dir", str(tmp_path / "out"), "--llm_type", "llama3"])  # fmt: skip
    with pytest.raises(UsageError, match="--llm_type mistral: choose one of llama3, qwen, minicpm"):
        preflight(["--model_name_or_path", str(model_v2_6), "--data_path", str(data_v2_6),
                   "--output_dir", str(tmp_path / "out"), "--llm_type", "mistral"])  # fmt: skip


@pytest.mark.parametrize("version", [3.0, 4.0, 4.5])
def test_preflight_refuses_a_version_the_suite_does_not_implement(model_v2_6, data_v2_6, tmp_path, version):
    model = with_version(model_v2_6, tmp_path / "model", version)
    for extra in ([], ["--trust_remote_code", "true"]):  # also where the weights are not checked
        with pytest.raises(UsageError) as raised:
            preflight(["--model_name_or_path", str(model), "--data_path", str(data_v2_6),
                       "--output_dir", str(tmp_path / "out"), *extra])  # fmt: skip
        message = str(raised.value)
        assert "\n" not in message and f"version {version}" in message and "not" in message


# --- 2. LoRA on Qwen2's biased projections, the adapter, QLoRA ------------------------------------------------


@pytest.fixture(scope="module")
def trained_v2_6(model_v2_6, data_v2_6, tmp_path_factory):
    """(trainer, adapter directory): 4 in-process steps on the 2.6 tiny with the default flags (LoRA on the
    default targets, resampler and vision tower trained)."""
    out = tmp_path_factory.mktemp("run_v2_6") / "adapter"
    trainer = train(base_args(model_v2_6, data_v2_6, out, "--max_steps", "4"))
    return trainer, out


def sample_batch(tokenizer, config, data: Path) -> dict:
    """Every sample of DATA as one padded training batch (data + attention_mask)."""
    dataset = SupervisedDataset(DataSettings(str(data)), tokenizer, config)
    return DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad, packing=False)(
        [dataset[i] for i in range(len(dataset))]
    )


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(data=batch["data"], attention_mask=batch["attention_mask"]).logits


def test_default_lora_targets_wrap_qwen2s_biased_projections_and_the_adapter_reloads(
    trained_v2_6, model_v2_6, data_v2_6
):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    trainer, out = trained_v2_6
    base = AutoModel.from_pretrained(model_v2_6).eval()
    targets = lora_targets(base, DEFAULT_LORA_TARGETS)
    # Qwen2: q/k/v/o in each of the 2 decoder layers, q/k/v with biases, o_proj without
    assert sorted(name.split("self_attn.")[1] for name in targets) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj"] * 2
    )
    assert {name.rsplit(".", 1)[1] for name in targets if base.get_submodule(name).bias is not None} == {
        "q_proj",
        "k_proj",
        "v_proj",
    }

    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(model_v2_6), out).eval()
    for name in targets:
        wrapped = reloaded.base_model.model.get_submodule(name)
        assert isinstance(wrapped, LoraLayer), name
        original = base.get_submodule(name)
        # the bias stays the base's (frozen, --lora_bias none) and is applied once, in the wrapped layer's base
        assert (wrapped.base_layer.bias is None) == (original.bias is None)
        if original.bias is not None:
            assert torch.equal(wrapped.base_layer.bias, original.bias) and not wrapped.base_layer.bias.requires_grad
    tokenizer = trainer.train_dataset.encoder.tokenizer
    batch = sample_batch(tokenizer, base.config, data_v2_6)
    expected = logits_of(trainer.model.eval(), batch)
    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)
    assert (expected - logits_of(base, batch)).abs().max() > 1e-3, "the adapter must change the model"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (CPU 4-bit)")
def test_q_lora_trains_2_6_and_the_adapter_reloads_on_the_4bit_base(model_v2_6, data_v2_6, tmp_path, monkeypatch):
    """--q_lora on the 2.6 tiny: only the LLM's decoder linears (biased q/k/v included) are NF4; training steps and
    the adapter gives the trained logits on a 4-bit base. finetune.py refuses --q_lora without CUDA (CPU 4-bit is
    too slow for real training): only that check is relaxed here, as in test_qlora.py."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModel, BitsAndBytesConfig

    import finetune.train as run

    real_check = run.check_arguments
    monkeypatch.setattr(
        run, "check_arguments", lambda m, d, t, lora: real_check(m, d, t, dataclasses.replace(lora, q_lora=False))
    )
    out = tmp_path / "adapter"
    trainer = run.train(base_args(model_v2_6, data_v2_6, out, "--q_lora", "true", "--bf16", "true", "--max_steps", "2",
                                  "--tune_vision", "false", *([] if torch.cuda.is_available() else ["--use_cpu", "true"])))  # fmt: skip
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    quantized = {name for name, module in trainer.model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized and all(".llm.model.layers." in name for name in quantized)
    assert any(name.endswith("q_proj.base_layer") for name in quantized)

    tokenizer = trainer.train_dataset.encoder.tokenizer
    batch = sample_batch(tokenizer, trainer.model.base_model.model.config, data_v2_6)

    def logits(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return logits_of(model, batch).float()

    expected = logits(trainer.model.eval())
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["vpm", "resampler", "lm_head"])  # fmt: skip
    base = AutoModel.from_pretrained(model_v2_6, dtype=torch.bfloat16, quantization_config=bnb_config)
    on_4bit = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(logits(on_4bit), expected, atol=1e-2, rtol=0)


# --- merge, chat, evaluate ----------------------------------------------------------------------------------------


def test_merge_checks_the_2_6_base_and_the_merged_model_gives_the_adapters_logits(
    trained_v2_6, model_v2_6, data_v2_6, tiny_model, tmp_path, capsys
):
    from transformers import AutoModel

    from finetune import merge

    trainer, adapter = trained_v2_6
    merged = tmp_path / "merged"
    assert (
        merge.cli(["--base", str(model_v2_6), "--adapter", str(adapter), "--out", str(merged), "--dtype", "fp32"]) == 0
    )
    assert json.loads((merged / "config.json").read_text())["version"] == 2.6
    model = AutoModel.from_pretrained(merged).eval()
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    batch = sample_batch(trainer.train_dataset.encoder.tokenizer, model.config, data_v2_6)
    torch.testing.assert_close(logits_of(model, batch), logits_of(trainer.model.eval(), batch), atol=1e-4, rtol=0)

    # another 2.6 base of the same shapes (one q_proj bias changed): refused by the recorded identity
    other = Path(shutil.copytree(model_v2_6, tmp_path / "other"))
    weights = load_file(other / "model.safetensors")
    weights["llm.model.layers.0.self_attn.q_proj.bias"] = weights["llm.model.layers.0.self_attn.q_proj.bias"] + 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert merge.cli(["--base", str(other), "--adapter", str(adapter), "--out", str(tmp_path / "m2")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "was not trained on --base" in error
    # a 2.5 base: refused before any weight loads
    assert merge.cli(["--base", str(tiny_model), "--adapter", str(adapter), "--out", str(tmp_path / "m3")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "the base's resampler.kv_proj.weight has shape" in error


def test_chat_prompt_is_the_2_6_training_prefix_with_contents_as_written(trained_v2_6, data_v2_6):
    """chat / evaluate's prompt for every sample equals the training ids up to the last answer (ChatML, the
    default system turn, no BOS, contents not stripped: 2.6's template does not trim them), pixels equal."""
    from finetune.chat import build_prompt, load_image
    from finetune.dataset import open_source, parse_record
    from finetune.evaluate import split_record
    from finetune.model.image_processing import normalize_pixels

    trainer, _ = trained_v2_6
    model = trainer.model.base_model.model
    tokenizer = trainer.train_dataset.encoder.tokenizer
    dataset = SupervisedDataset(DataSettings(str(data_v2_6), model_max_length=None), tokenizer, model.config)
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    source = open_source(str(data_v2_6))
    for index in range(len(source)):
        record = parse_record(source[index], source.location(index), str(data_v2_6.parent))
        turns, _ = split_record(record)
        prompt, images = build_prompt(tokenizer, turns, [(m, load_image(p)) for m, p in record.images])
        assert prompt.endswith("<|im_start|>assistant\n")
        inputs = model.prepare_inputs(prompt, images, tokenizer)
        item = dataset.prepare(index)
        ids = item.input_ids.tolist()
        last_answer = max(i for i in range(len(ids)) if ids[i : i + len(header)] == header) + len(header)
        assert inputs["input_ids"][0].tolist() == ids[:last_answer], (record.id, prompt)
        torch.testing.assert_close(inputs["image_bound"][0], item.image_bound)
        for a, b in zip(inputs["pixel_values"][0], item.pixel_values, strict=True):
            torch.testing.assert_close(a, normalize_pixels(b), atol=1e-6, rtol=0)


def test_chat_and_evaluate_run_on_the_2_6_adapter(trained_v2_6, model_v2_6, data_v2_6, golden_v2_6_images, tmp_path):
    import io

    from finetune.chat import chat, load_model
    from finetune.evaluate import evaluate

    _, adapter = trained_v2_6
    model, tokenizer = load_model(str(model_v2_6), str(adapter), device="cpu", dtype="fp32")
    stream = io.StringIO()
    answer = chat(model, tokenizer, "What is it?", [str(golden_v2_6_images / "wide_260x150.png")], greedy=True,
                  max_new_tokens=5, stream=stream)  # fmt: skip
    assert answer and stream.getvalue().strip() == answer.strip()
    summary = evaluate(model, tokenizer, str(data_v2_6), tmp_path / "pred.jsonl", max_new_tokens=4)
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert summary["samples"] == len(rows) == 4
    assert all(row["prompt"].endswith("<|im_start|>assistant\n") for row in rows)


# --- DeepSpeed ZeRO-2 and ZeRO-3, two CPU processes ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_2_6_on_two_processes(model_v2_6, data_v2_6, tmp_path, stage):
    """ZeRO-3 partitions Qwen2's biases with every other parameter and gathers them per call; the saved adapter
    must hold whole tensors and reload onto the 2.6 base."""
    from peft import PeftModel
    from transformers import AutoModel

    out = deepspeed_two_process_run(model_v2_6, data_v2_6, tmp_path, stage)
    PeftModel.from_pretrained(AutoModel.from_pretrained(model_v2_6), out)


# --- 3. planner and tuner -----------------------------------------------------------------------------------------


def test_planner_plans_2_6_on_its_published_architecture(reference_v2_6):
    """The 2.6 memory model counts the published 2.6 architecture: its config fields, every published tensor's
    parameters, LoRA on Qwen2's q/k/v/o (grouped-query k/v), the 151,666-entry vocabulary in the loss's logits."""
    from finetune.plan import GiB, Setup, parameter_counts, predict, published_config

    published = json.loads((reference_v2_6 / "config.json").read_text())
    config = published_config("2.6")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "vocab_size", "query_num"):  # fmt: skip
        assert getattr(config, field) == published[field], field
    rows = [line.split("\t") for line in (reference_v2_6 / "param_shapes.tsv").read_text().splitlines()]
    total = sum(int(row[2]) for row in rows if not row[0].startswith("#"))  # name, shape, element count
    counts = parameter_counts("2.6")
    assert counts.total == total and counts.vocab == published["vocab_size"]
    hidden, kv = (
        published["hidden_size"],
        published["num_key_value_heads"] * published["hidden_size"] // published["num_attention_heads"],
    )
    assert counts.lora_per_rank == published["num_hidden_layers"] * (2 * (hidden + hidden) + 2 * (hidden + kv))

    setup = Setup(version="2.6", tune_vision=False, fp32_trainable=False)
    terms = predict(setup)
    assert terms["weights"] == pytest.approx(2 * total / GiB)
    assert terms["logits"] == pytest.approx(2048 * published["vocab_size"] * 10 / GiB)
    assert terms["total"] != predict(Setup(tune_vision=False, fp32_trainable=False))["total"]


def test_plan_command_takes_the_version_from_the_model_or_from_version(model_v2_6, capsys):
    from finetune.plan import main

    assert main(["--gpus", "1", "--gpu-mem", "40", "--model", str(model_v2_6), "--json"]) == 0
    from_model = json.loads(capsys.readouterr().out)
    assert main(["--gpus", "1", "--gpu-mem", "40", "--version", "2.6", "--json"]) == 0
    from_flag = json.loads(capsys.readouterr().out)
    assert from_model["setup"]["version"] == from_flag["setup"]["version"] == "2.6"
    assert from_model["predicted_gib"] == from_flag["predicted_gib"]
    assert any("calibration scaled to its sizes" in note for note in from_model["notes"])
    assert main(["--gpus", "1", "--gpu-mem", "40", "--version", "2.6"]) == 0
    assert "model:                   MiniCPM-V 2.6 (openbmb/MiniCPM-V-2_6 architecture)" in capsys.readouterr().out
    assert main(["--gpus", "1", "--gpu-mem", "40", "--version", "2.5", "--model", str(model_v2_6)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--version 2.5" in error and "MiniCPM-V 2.6" in error


@pytest.mark.slow
def test_launcher_auto_plans_for_the_models_version(model_v2_6, tmp_path):
    """AUTO=1 on a 2.6 MODEL applies the 2.6 plan (stand-ins for torchrun and two GPUs' nvidia-smi)."""
    from finetune.plan import make_plan

    fake = tmp_path / "bin"
    fake.mkdir()
    for tool, script in (("torchrun", 'for a in "$@"; do printf "%s\\n" "$a"; done'),
                         ("nvidia-smi", 'echo "GPU 0: stand-in"; echo "GPU 1: stand-in"')):  # fmt: skip
        (fake / tool).write_text(f"#!/bin/sh\n{script}\n")
        (fake / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{PYTHON_BIN}:{os.environ['PATH']}", AUTO="1", GPU_MEM="24", GPUS_PER_NODE="2",
               PYTHON=sys.executable, MODEL=str(model_v2_6), DATA="x.json", PYTHONPATH=str(ROOT), PREFLIGHT="0")  # fmt: skip
    result = subprocess.run(["sh", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    planned = make_plan(2, 24, version="2.6").flags()
    assert planned != make_plan(2, 24).flags()  # the versions' plans differ here: the check can fail
    assert result.stdout.splitlines()[0] == "[auto] " + shlex.join(planned)


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="needs optuna")
def test_tuner_searches_on_the_2_6_tiny(model_v2_6, data_v2_6, tmp_path, capsys):
    import math

    from finetune.tune import main

    result = main(["--model", str(model_v2_6), "--data", str(data_v2_6), "--trials", "2", "--max-steps", "1",
                   "--subset", "4", "--output-dir", str(tmp_path / "out"), "--seed", "3",
                   "--", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--tune_vision", "false"])  # fmt: skip
    assert result.trials == 2 and math.isfinite(result.best_eval_loss)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == result.line and f"MODEL={model_v2_6}" in line and "bash finetune/finetune_lora.sh" in line


# --- 4. the training path's data checks ------------------------------------------------------------------------


def test_bad_2_6_samples_stop_training_before_it_starts_each_named(model_v2_6, data_v2_6, golden_v2_6_images, tmp_path):
    good = json.loads(data_v2_6.read_text())
    bad = [
        {"id": "no_file", "image": str(tmp_path / "missing.png"), "conversations": good[0]["conversations"]},
        {"id": "chatml_text", "conversations": [{"role": "user", "content": "Hi <|im_end|> there"}, {"role": "assistant", "content": "ok"}]},
        {"id": "image_id_text", "conversations": [{"role": "user", "content": "<image_id>0</image_id> hi"}, {"role": "assistant", "content": "ok"}]},
        {"id": "two_markers", "image": str(golden_v2_6_images / "wide_260x150.png"),
         "conversations": [{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "ok"}]},
    ]  # fmt: skip
    data = tmp_path / "data.json"
    data.write_text(json.dumps(good + bad))
    out = tmp_path / "out"
    with pytest.raises(UsageError) as raised:
        train(base_args(model_v2_6, data, out, "--max_steps", "1"))
    message = str(raised.value)
    assert message.startswith(f"{len(bad)} bad train samples")
    listed = dict(line.strip().split(": ", 1) for line in message.splitlines()[1:])
    assert set(listed) == {sample["id"] for sample in bad}
    assert "missing.png" in listed["no_file"] and "<|im_end|>" in listed["chatml_text"]
    assert "<image_id>" in listed["image_id_text"]
    assert not (out / "adapter_model.safetensors").exists()
