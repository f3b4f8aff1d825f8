"""Every feature of the suite on MiniCPM-V 2.6, on CPU with the golden tiny 2.6 checkpoint (copied to a temporary
directory): the launcher and its LLM_TYPE check, LoRA targets on Qwen2's biased projections, QLoRA, DeepSpeed ZeRO-2
and ZeRO-3, merge, chat, evaluate, the planner and the tuner. What the 2.6 model and data path compute is checked
against the published code in test_model_v2_6.py and test_dataset_v2_6.py; here each feature runs the way a user
runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.arguments import UsageError
from finetune.preflight import preflight

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "finetune" / "finetune_lora.sh"
PYTHON_BIN = Path(sys.executable).parent


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


def launcher_env(model: Path, data: Path, out: Path, **settings: str) -> dict:
    """The launcher's environment for a quick CPU run: one process, no DeepSpeed, 2 steps; LLM_TYPE only if given."""
    env = {name: value for name, value in os.environ.items() if name != "LLM_TYPE"}
    env.update(MODEL=str(model), DATA=str(data), OUTPUT_DIR=str(out), MAX_STEPS="2", REPORT_TO="none",
               SAVE_STEPS="100", GPUS_PER_NODE="1", DS_CONFIG="", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PATH=f"{PYTHON_BIN}:{os.environ['PATH']}", **settings)  # fmt: skip
    return env


# --- 1. launcher and preflight --------------------------------------------------------------------------------


@pytest.mark.slow
def test_launcher_trains_2_6_with_llm_type_qwen(model_v2_6, data_v2_6, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    out = tmp_path / "out"
    env = launcher_env(model_v2_6, data_v2_6, out, LLM_TYPE="qwen")
    result = subprocess.run(["sh", str(LAUNCHER), "--dataloader_num_workers", "0"], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "[data]   samples: 4  kept: 4" in result.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    tuned = PeftModel.from_pretrained(AutoModel.from_pretrained(model_v2_6), out)
    assert any(".lora_A." in name for name, _ in tuned.named_parameters())


@pytest.mark.parametrize(("llm_type", "version"), [("llama3", "2.6"), ("qwen", "2.5")])
def test_launcher_refuses_an_llm_type_of_another_version_before_torchrun(
    model_v2_6, tiny_model, data_v2_6, tmp_path, llm_type, version
):
    model = model_v2_6 if version == "2.6" else tiny_model
    env = launcher_env(model, data_v2_6, tmp_path / "out", LLM_TYPE=llm_type)
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
    with pytest.raises(UsageError, match="--llm_type mistral: choose one of llama3, qwen, minicpm"):
        preflight(["--model_name_or_path", str(model_v2_6), "--data_path", str(data_v2_6),
                   "--output_dir", str(tmp_path / "out"), "--llm_type", "mistral"])  # fmt: skip


@pytest.mark.parametrize("version", [2.0, 4.0, 4.5])
def test_preflight_refuses_a_version_the_suite_does_not_implement(model_v2_6, data_v2_6, tmp_path, version):
    model = with_version(model_v2_6, tmp_path / "model", version)
    for extra in ([], ["--trust_remote_code", "true"]):  # also where the weights are not checked
        with pytest.raises(UsageError) as raised:
            preflight(["--model_name_or_path", str(model), "--data_path", str(data_v2_6),
                       "--output_dir", str(tmp_path / "out"), *extra])  # fmt: skip
        message = str(raised.value)
        assert "\n" not in message and f"version {version}" in message and "not" in message
