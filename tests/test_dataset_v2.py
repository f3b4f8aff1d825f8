"""finetune.dataset on MiniCPM-V 2.0: the `<用户>`/`<AI>` template as its chat() writes it (BOS first, no system
turn), labels on each answer and its EOS, 2.5's placeholder layout; check_data with LLM_TYPE=minicpm; the
training batch (padded and packed) through the tiny 2.0 model (`build_tiny_checkpoint(..., version="2.0")`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import base_args
from PIL import Image
from transformers import AutoModel, AutoTokenizer

import finetune  # noqa: F401
from finetune.check_data import main as check_data
from finetune.dataset import IGNORE_INDEX, ConversationEncoder, DataCollator, DataError, DataSettings, SupervisedDataset
from finetune.model import MiniCPMVConfig
from finetune.model.attention import use_varlen_attention
from finetune.model.versions import MINICPM_V_2
from finetune.synthetic import build_tiny_checkpoint
from finetune.train import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v2"), version="2.0")


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def config(checkpoint):
    return MiniCPMVConfig.from_pretrained(checkpoint)


def write_data(folder, samples) -> str:
    Image.fromarray(np.full((70, 56, 3), 200, dtype=np.uint8)).save(folder / "small.png")
    Image.fromarray(np.full((112, 224, 3), 30, dtype=np.uint8)).save(folder / "wide.png")
    path = folder / "data.json"
    path.write_text(json.dumps(samples, ensure_ascii=False))
    return str(path)


def conv(*turns):
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)]


def test_two_turn_sample_is_encoded_with_the_2_0_template(tmp_path, tokenizer, config):
    data = write_data(
        tmp_path, [{"id": "a", "image": "small.png", "conversations": conv("What?", "red", "And?", "blue")}]
    )
    dataset = SupervisedDataset(DataSettings(data), tokenizer, config)
    assert dataset.encoder.version is MINICPM_V_2
    item = dataset[0]
    # Written out by hand: one 56 x 70 view (not sliced), 16 <unk> for it; "▁" starts each text run.
    user, answer = ["<用户>"], ["<AI>"]
    # As chat() writes a history: the first answer without </s>; </s> is the label of the <用户> that follows it.
    expected = ["<s>", *user, "<image>", *["<unk>"] * 16, "</image>", "▁", "\n", *"What?", *answer, "▁", *"red"]
    expected += [*user, "▁", *"And?", *answer, "▁", *"blue", "</s>"]
    assert tokenizer.convert_ids_to_tokens(item["input_ids"].tolist()) == expected
    labels = tokenizer.convert_ids_to_tokens([label for label in item["labels"].tolist() if label != IGNORE_INDEX])
    assert labels == ["▁", *"red", "</s>", "▁", *"blue", "</s>"]
    second_user = len(expected) - expected[::-1].index("<用户>") - 1
    assert item["labels"][second_user] == tokenizer.eos_token_id
    pairs = list(zip(item["labels"].tolist(), item["input_ids"].tolist(), strict=True))
    assert all(label in (IGNORE_INDEX, token) for i, (label, token) in enumerate(pairs) if i != second_user)
    assert item["image_bound"].tolist() == [[3, 19]]
    # Unsliced views are resized to about scale_resolution^2 in area (112 px here), in whole patches:
    # 56 x 70 -> width 112 * sqrt(0.8) = 100.2 -> 98, height 112 / sqrt(0.8) = 125.2 -> 126: 9 x 7 patches.
    assert item["tgt_sizes"].tolist() == [[9, 7]]


def test_a_truncated_multi_turn_sample_ends_its_last_kept_answer_with_eos(tmp_path, tokenizer, config):
    """Dropping the second exchange leaves what the first exchange alone encodes to, </s> included."""
    data = write_data(tmp_path, [{"id": "one", "conversations": conv("Hi", "red")},
                                 {"id": "two", "conversations": conv("Hi", "red", "And?", "blue")}])  # fmt: skip
    one = SupervisedDataset(DataSettings(data), tokenizer, config)[0]
    settings = DataSettings(data, model_max_length=len(one["input_ids"]))
    truncated = SupervisedDataset(settings, tokenizer, config)[1]
    assert truncated["input_ids"].tolist() == one["input_ids"].tolist()
    assert truncated["labels"].tolist() == one["labels"].tolist()
    assert one["input_ids"][-1] == one["labels"][-1] == tokenizer.eos_token_id


def test_training_prompt_is_what_chat_generates_from(tmp_path, tokenizer, config, checkpoint):
    """Up to the first <AI>, the training ids are the ids chat() generates from (BOS included), sliced image too."""
    data = write_data(tmp_path, [{"id": "w", "image": "wide.png", "conversations": conv("Colour?", "dark")}])
    item = SupervisedDataset(DataSettings(data), tokenizer, config)[0]
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32)
    prompt = model.prepare_inputs(
        "<用户>(<image>./</image>)\nColour?<AI>", [Image.open(tmp_path / "wide.png")], tokenizer
    )
    ids = item["input_ids"].tolist()
    prompt_ids = prompt["input_ids"][0].tolist()
    assert ids[: len(prompt_ids)] == prompt_ids
    assert len(item["pixel_values"]) == len(prompt["pixel_values"][0]) > 1
    assert torch.equal(item["image_bound"], prompt["image_bound"][0])


def test_a_system_message_is_refused_naming_the_sample(tmp_path, tokenizer, config):
    samples = [{"id": "s1", "conversations": [{"role": "system", "content": "Be brief."}, *conv("Hi", "Hello")]}]
    dataset = SupervisedDataset(DataSettings(write_data(tmp_path, samples)), tokenizer, config)
    with pytest.raises(DataError, match="sample s1: MiniCPM-V 2.0 has no system turn"):
        dataset[0]


def test_llm_type_minicpm_is_detected_and_accepted(tokenizer, config):
    encoder = ConversationEncoder(tokenizer, config.slice_settings, llm_type="minicpm")
    assert encoder.llm_type == "minicpm" and encoder.version is MINICPM_V_2
    with pytest.raises(ValueError, match="llm_type='qwen' but the tokenizer is a 'minicpm' tokenizer"):
        ConversationEncoder(tokenizer, config.slice_settings, llm_type="qwen")


def test_check_data_accepts_llm_type_minicpm(tmp_path, checkpoint, capsys):
    data = write_data(tmp_path, [{"id": "a", "image": "wide.png", "conversations": conv("What?", "dark")}])
    assert check_data(["--model", str(checkpoint), "--data", data, "--llm_type", "minicpm", "--workers", "1"]) == 0
    assert check_data(["--model", str(checkpoint), "--data", data, "--llm_type", "llama3", "--workers", "1"]) == 2


def test_check_data_show_marks_the_eos_learnt_on_the_next_turn(tmp_path, checkpoint, capsys):
    """--show of a two-exchange 2.0 sample: each answer is a trained span; the </s> after the first answer, which
    is a label but not an input token, is shown as a trained target before the <用户> that carries it."""
    data = write_data(tmp_path, [{"id": "t", "conversations": conv("Hi", "red", "And?", "blue")}])
    assert check_data(["--model", str(checkpoint), "--data", data, "--show", "t", "--workers", "1"]) == 0
    shown = capsys.readouterr().out
    assert "<AI>⟦red⟧⟦→</s>⟧<用户> And?<AI>⟦blue</s>⟧" in shown, shown


def test_padded_packed_and_varlen_batches_give_the_same_loss(tmp_path, tokenizer, config, checkpoint):
    samples = [
        {"id": "a", "image": "wide.png", "conversations": conv("What?", "dark", "Sure?", "yes")},
        {"id": "b", "image": "small.png", "conversations": conv("Colour?", "light")},
        {"id": "c", "conversations": conv("No image here", "fine")},
    ]
    items = [SupervisedDataset(DataSettings(write_data(tmp_path, samples)), tokenizer, config)[i] for i in range(3)]
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        padded = model(**DataCollator(tokenizer.pad_token_id)(items)).loss
        packed = model(**DataCollator(tokenizer.pad_token_id, packing=True)(items)).loss
        alone = [model(**DataCollator(tokenizer.pad_token_id)([item])).loss for item in items]
    counts = [int((item["labels"] != IGNORE_INDEX).sum()) for item in items]
    token_mean = sum(loss * n for loss, n in zip(alone, counts, strict=True)) / sum(counts)
    assert torch.isfinite(padded)
    torch.testing.assert_close(padded, token_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, token_mean, atol=1e-5, rtol=1e-5)
    use_varlen_attention(model)  # the LLM's packed samples attended one by one (the vision tower keeps sdpa)
    with torch.no_grad():
        varlen = model(**DataCollator(tokenizer.pad_token_id, packing=True)(items)).loss
    torch.testing.assert_close(varlen, token_mean, atol=1e-5, rtol=1e-5)


def test_lora_training_with_the_vision_tower_trained_runs_and_learns(tmp_path, checkpoint):
    """finetune.py's path on 2.0: LoRA on the LLM, resampler and vision tower trained (PEFT wraps the tower)."""
    samples = [{"id": str(i), "image": "wide.png", "conversations": conv("<image>\nColour?", "dark")} for i in range(4)]
    data = write_data(tmp_path, samples)
    args = base_args(checkpoint, data, tmp_path / "out", "--max_steps", "4", "--llm_type", "minicpm")
    trainer = train([*args, "--tune_vision", "true"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_role_marker_written_in_a_turn_is_refused(tmp_path, tokenizer, config):
    """`<AI>` and `<用户>` are ordinary vocabulary entries, not special tokens, but in a turn they would start a
    new role: refused like the other versions' control tokens."""
    samples = [{"id": "x", "conversations": conv("Say <AI>hi", "no")}]
    dataset = SupervisedDataset(DataSettings(write_data(tmp_path, samples)), tokenizer, config)
    with pytest.raises(DataError, match="sample x: .*<AI>"):
        dataset.record(0)
