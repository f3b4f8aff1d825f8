"""trust_remote_code=True with the checkpoint's code files present uses that code; training runs on it.

(transformers 5 prefers our explicitly registered class in AutoModel even then, so finetune.model.loading
loads the remote code from the checkpoint's auto_map itself.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import case_data, path_flags
from transformers import AutoModel, AutoTokenizer, LlamaConfig

import finetune  # noqa: F401
from finetune.model import MiniCPMV, MiniCPMVConfig, SliceSettings
from finetune.model.configuration import slice_settings_from_config
from finetune.model.loading import load_pretrained
from finetune.train import train

STANDIN = Path(__file__).resolve().parent / "remote_code_standin"
REFERENCE_CONFIG = Path(__file__).resolve().parent / "reference" / "config.json"  # the real checkpoint's
# What the published MiniCPMVConfig.__init__ sets beyond LlamaConfig; config.json's other keys become attributes.
PUBLISHED_CONFIG_FIELDS = {
    "use_cache", "query_num", "image_size", "drop_vision_last_layer", "batch_vision_input", "slice_config",
    "slice_mode", "vision_config", "patch_size",
}  # fmt: skip


def checkpoint_with_code(golden_dir: Path, target: Path) -> Path:
    shutil.copytree(golden_dir, target)
    for name in ("modeling_minicpmv.py", "configuration_minicpm.py"):
        shutil.copyfile(STANDIN / name, target / name)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def test_native_without_and_hub_class_with_trust_remote_code(golden_dir, golden_cases, tmp_path):
    directory = checkpoint_with_code(golden_dir, tmp_path / "ckpt")
    native = AutoModel.from_pretrained(directory)
    remote = load_pretrained(str(directory), trust_remote_code=True)
    assert type(native) is MiniCPMV
    assert type(remote) is not MiniCPMV and getattr(remote, "is_remote_code_standin", False)
    assert type(remote).__module__.startswith("transformers_modules")
    case = golden_cases[0]
    data = case_data(case)
    with torch.no_grad():
        torch.testing.assert_close(remote.eval()(data=data).logits[0], case["logits"], atol=1e-4, rtol=0)
    # The tokenizer stays the native one over tokenizer.json (the hub class drops spaces on transformers 5).
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.decode(tokenizer("a b\nc", add_special_tokens=False)["input_ids"]) == "a b\nc"


@pytest.mark.slow
def test_training_runs_on_the_remote_code_class(golden_dir, tmp_path):
    directory = checkpoint_with_code(golden_dir, tmp_path / "ckpt")
    images = Path(golden_dir).parent / "images"
    data = tmp_path / "train.json"
    data.write_text(
        '[{"id": "a", "image": "%s", "conversations": [{"role": "user", "content": "<image>\\nWhat?"},'
        ' {"role": "assistant", "content": "A picture."}]}]' % (images / "small_90x70.png")
    )
    # Not base_args: batch size, learning rate, seed and data-loader workers stay finetune.py's defaults, as before.
    trainer = train(path_flags(directory, data, tmp_path / "out", "--trust_remote_code", "true", "--max_steps", "2", "--report_to", "none",
                              "--save_strategy", "no", "--disable_tqdm", "true"))  # fmt: skip
    assert getattr(trainer.model.get_base_model(), "is_remote_code_standin", False)
    assert trainer.state.global_step == 2 and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # The images were sliced by the checkpoint's slice_config (a MiniCPMVSliceConfig object in the hub's class).
    assert trainer.train_dataset.slice_settings == SliceSettings(
        scale_resolution=112, patch_size=14, max_slice_nums=9, query_num=16
    )


def test_the_stand_in_config_has_the_published_surface_and_no_more(golden_dir, tmp_path):
    """A stand-in with native-only fields would hide every read of them (it did: `slice_settings`)."""
    directory = checkpoint_with_code(golden_dir, tmp_path / "ckpt")
    config = load_pretrained(str(directory), trust_remote_code=True).config
    raw = json.loads((directory / "config.json").read_text())
    beyond_llama = {name for name in set(vars(config)) - set(vars(LlamaConfig())) if not name.startswith("_")}
    assert beyond_llama <= PUBLISHED_CONFIG_FIELDS | set(raw), beyond_llama - PUBLISHED_CONFIG_FIELDS - set(raw)
    assert {name for name in set(dir(type(config))) - set(dir(LlamaConfig)) if not name.startswith("_")} == {
        "default_vision_config",
        "keys_to_ignore_at_inference",
    }
    assert type(config.slice_config).__name__ == "MiniCPMVSliceConfig" and not isinstance(config.slice_config, dict)


def test_slice_settings_of_the_real_config_from_either_class():
    """The real config.json has no scale_resolution: 448, the published slice config class's default."""
    from remote_code_standin.configuration_minicpm import MiniCPMVConfig as PublishedConfig

    raw = json.loads(REFERENCE_CONFIG.read_text())
    expected = SliceSettings(scale_resolution=448, patch_size=14, max_slice_nums=9, query_num=96, slicing=True)
    assert slice_settings_from_config(PublishedConfig(**raw)) == expected
    assert (
        slice_settings_from_config(MiniCPMVConfig.from_dict(raw))
        == expected
        == MiniCPMVConfig.from_dict(raw).slice_settings
    )
