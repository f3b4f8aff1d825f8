"""Shared fixtures: the golden tiny checkpoints (copied from ../shared/golden/tiny and tiny-v2_6) and their cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden_tiny"
REFERENCE = TESTS / "reference"
GOLDEN_V2_6 = TESTS / "golden_tiny_v2_6"  # MiniCPM-V 2.6: tiny checkpoint in the published layout + cases
REFERENCE_V2_6 = TESTS / "reference_v2_6"  # the published MiniCPM-V 2.6 JSON files and tensor shapes


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the published layout, built by the project (read-only for tests)."""
    from finetune.synthetic import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def write_test_adapter(base: Path, out: Path) -> Path:
    """An adapter of BASE as training saves it (LoRA on the attention projections, resampler + vpm as
    modules_to_save), with every trained tensor moved away from its initial value, plus the trainer's verbatim
    copies of the base's files and its record of the base's identity: merge, chat and evaluate need one that
    changes the model, without a training run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from finetune.arguments import DEFAULT_LORA_TARGETS
    from finetune.base_identity import identity_for_training, write_identity
    from finetune.trainer import copy_passthrough_files

    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=DEFAULT_LORA_TARGETS, modules_to_save=["resampler", "vpm"]
    )
    peft_model = get_peft_model(AutoModel.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(out)
    copy_passthrough_files(base, out)
    write_identity(out, identity_for_training(str(base)))
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    """write_test_adapter of tiny_model. Read-only for tests (copy it to tamper with it)."""
    return write_test_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="session")
def tiny_adapter_v2_6(golden_v2_6_dir, tmp_path_factory) -> Path:
    """write_test_adapter of the golden tiny MiniCPM-V 2.6. Read-only for tests."""
    return write_test_adapter(golden_v2_6_dir, tmp_path_factory.mktemp("adapter_v2_6") / "adapter")


@pytest.fixture(scope="session")
def demo_factory(tmp_path_factory):
    """demo_factory(num_train, num_eval) -> a folder with the bundled demo data of that size (built once)."""
    from finetune.demo_data import write_demo_dataset

    built: dict[tuple[int, int], Path] = {}

    def make(num_train: int = 24, num_eval: int = 6) -> Path:
        if (num_train, num_eval) not in built:
            out = tmp_path_factory.mktemp(f"demo_{num_train}_{num_eval}")
            write_demo_dataset(out, num_train=num_train, num_eval=num_eval)
            built[num_train, num_eval] = out
        return built[num_train, num_eval]

    return make


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN / "checkpoint"


@pytest.fixture(scope="session")
def golden_cases() -> list[dict]:
    return torch.load(GOLDEN / "cases.pt", weights_only=False)["cases"]


@pytest.fixture(scope="session")
def golden_images() -> Path:
    return GOLDEN / "images"


@pytest.fixture(scope="session")
def golden_v2_6_dir() -> Path:
    return GOLDEN_V2_6 / "checkpoint"


@pytest.fixture(scope="session")
def golden_v2_6_cases() -> list[dict]:
    return torch.load(GOLDEN_V2_6 / "cases.pt", weights_only=False)["cases"]


@pytest.fixture(scope="session")
def golden_v2_6_images() -> Path:
    return GOLDEN_V2_6 / "images"


@pytest.fixture(scope="session")
def reference_v2_6() -> Path:
    return REFERENCE_V2_6


@pytest.fixture(scope="session")
def mixed_samples(golden_dir, golden_images, tmp_path_factory):
    """(tokenizer, [dataset items], pad id) for three samples of the golden checkpoint: one image, text only,
    two images over two turns. Fast paths are checked against the plain path on batches built from them."""
    import json

    from transformers import AutoTokenizer

    from finetune.dataset import DataSettings, SupervisedDataset
    from finetune.model import MiniCPMVConfig
    from finetune.model.tokenization import SpecialTokens

    samples = [
        {"id": "wide", "image": str(golden_images / "wide_260x150.png"),
         "conversations": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A wide picture of things."}]},
        {"id": "text", "conversations": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"id": "two", "image": {"<image_00>": str(golden_images / "tall_120x330.png"), "<image_01>": str(golden_images / "small_90x70.png")},
         "conversations": [{"role": "user", "content": "<image_00> and <image_01>: which is taller?"}, {"role": "assistant", "content": "The first."},
                           {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("mixed") / "data.json"
    path.write_text(json.dumps(samples))
    tokenizer = AutoTokenizer.from_pretrained(golden_dir)
    dataset = SupervisedDataset(DataSettings(str(path)), tokenizer, MiniCPMVConfig.from_pretrained(golden_dir))
    return tokenizer, [dataset[i] for i in range(len(dataset))], SpecialTokens.from_tokenizer(tokenizer).pad
