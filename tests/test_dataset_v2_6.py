"""finetune.dataset on MiniCPM-V 2.6: ChatML with the default system turn, image ids for every image, image
bounds over <image> and <slice> blocks; checked against what the published 2.6 processor computed for the golden
tiny checkpoint (tests/golden_tiny_v2_6, CPU)."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

import finetune  # noqa: F401
from finetune.dataset import (
    IGNORE_INDEX,
    DataCollator,
    DataError,
    DataSettings,
    SampleTooLong,
    SupervisedDataset,
)
from finetune.model import MiniCPMVConfig
from finetune.model.image_processing import normalize_pixels, plan_slices
from finetune.model.tokenization import SpecialTokens
from finetune.model.versions import MINICPM_V_2_6

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_tiny_v2_6")
CHECKPOINT = os.path.join(GOLDEN, "checkpoint")
IMAGES = os.path.join(GOLDEN, "images")
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def config():
    config = MiniCPMVConfig.from_pretrained(CHECKPOINT)  # the class of the version config.json names
    assert config.model_version is MINICPM_V_2_6
    return config


@pytest.fixture(scope="module")
def cases():
    return {case["name"]: case for case in torch.load(os.path.join(GOLDEN, "cases.pt"), weights_only=False)["cases"]}


def image(name: str) -> str:
    return os.path.join(IMAGES, f"{name}.png")


def conv(*turns):
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)]


def dataset(folder, samples, tokenizer, config, **kwargs):
    path = os.path.join(folder, "data.json")
    with open(path, "w") as handle:
        json.dump(samples, handle)
    return SupervisedDataset(DataSettings(path, **kwargs), tokenizer, config)


def labeled_text(tokenizer, item):
    labels = item["labels"]
    return tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())


def assert_matches_golden(item, case, length=None):
    """input_ids (the first `length`), labels, image_bound and tgt_sizes exact; pixels within 1e-6."""
    length = len(case["input_ids"]) if length is None else length
    assert item["input_ids"][:length].tolist() == case["input_ids"].tolist()[:length]
    if "labels" in case:
        assert item["labels"].tolist() == case["labels"].tolist()
    assert torch.equal(item["image_bound"], case["image_bound"].to(torch.int64))
    assert torch.equal(item["tgt_sizes"], case["tgt_sizes"].to(torch.int64))
    assert len(item["pixel_values"]) == len(case["pixel_values"])
    for ours, theirs in zip(item["pixel_values"], case["pixel_values"], strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(normalize_pixels(ours), theirs.float(), atol=1e-6, rtol=0)


# --- the published processor's encoding --------------------------------------------------------------------


@pytest.mark.parametrize("question", ["What colour dominates?", "<image>\nWhat colour dominates?"])
def test_two_turn_train_case_encodes_as_the_published_code(tmp_path, tokenizer, config, cases, question):
    """Image without marker (goes first, then "\\n", as chat() does) or with the <image> marker: the same ids,
    labels (answers and their <|im_end|>), image bounds, view sizes and pixels as the golden training case."""
    samples = [
        {"id": "t", "image": image("wide_260x150"),
         "conversations": conv(question, "Mostly noise, no single colour.", "Are you sure?", "Yes, it is random noise.")}
    ]  # fmt: skip
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    assert_matches_golden(item, cases["two_turn_train"])
    assert len(item["input_ids"]) == len(cases["two_turn_train"]["input_ids"])
    assert (
        labeled_text(tokenizer, item) == "Mostly noise, no single colour.<|im_end|>Yes, it is random noise.<|im_end|>"
    )


def test_text_only_train_case_and_padding_mask(tmp_path, tokenizer, config, cases):
    """Text only: the golden ids and labels; the collator masks padding only, not the processor's id-0 quirk
    (the "!" of "Hello!" is id 0, which the published processor's attention_mask drops)."""
    case = cases["text_only_train"]
    item = dataset(tmp_path, [{"id": "h", "conversations": conv("Say hello.", "Hello!")}], tokenizer, config)[0]
    assert_matches_golden(item, case)
    # The tokenizer's BOS is <|im_start|>: one per turn (default system, user, assistant), none added before.
    assert int((item["input_ids"] == tokenizer.bos_token_id).sum()) == 3
    assert tokenizer.decode(item["input_ids"].tolist()).startswith(DEFAULT_SYSTEM)
    n = len(item["input_ids"])
    batch = DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad)([item, {**item, "id": "short"}])
    assert batch["attention_mask"][0].tolist() == [1] * n
    assert not bool(case["attention_mask"].all())  # the quirk is in the golden data, not in ours
    assert (item["input_ids"] == 0).any()


def test_two_images_get_ids_by_their_index_as_inference(tmp_path, tokenizer, config, cases):
    """Every image gets <image_id>i</image_id> with i its index in the sample, the unsliced one too (the
    published processor; upstream's finetune numbers only sliced images): the golden prompt up to the answer."""
    case = cases["two_images"]
    samples = [
        {"id": "two", "image": {"<image_00>": image("small_90x70"), "<image_01>": image("tall_120x330")},
         "conversations": conv("<image_00>\n<image_01>\nCompare the two images.", "Both are noise.")}
    ]  # fmt: skip
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    assert_matches_golden(item, case, length=len(case["input_ids"]))
    text = tokenizer.decode(item["input_ids"].tolist())
    assert text.count("<image_id>0</image_id>") == 1 and text.count("<image_id>1</image_id>") == 1
    assert labeled_text(tokenizer, item) == "Both are noise.<|im_end|>"


def test_placeholders_match_the_published_slicing(tokenizer, config):
    """For every image size the published processor was run on at the tiny settings: the same grid and view
    sizes, the same placeholder text for image 0, and its token count under the tiny tokenizer."""
    from finetune.dataset import ConversationEncoder

    with open(os.path.join(GOLDEN, "slicing_112.json")) as handle:
        rows = json.load(handle)
    settings = config.slice_settings
    encoder = ConversationEncoder(tokenizer, settings)
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    for row in rows:
        plan = plan_slices((row["width"], row["height"]), settings)
        size = (row["width"], row["height"])
        assert list(plan.grid or []) == list(row["grid_cols_rows"] or []), size
        assert [list(s) for s in plan.view_sizes()] == row["view_pixel_sizes_wh"], size
        expected = re.sub(r"<unk>\*(\d+)", lambda m: "<unk>" * int(m.group(1)), row["placeholder"])
        assert MINICPM_V_2_6.image_placeholder(plan, settings.query_num, "<unk>", 0) == expected, size
        ids = encoder.placeholder_ids(plan, 0)
        assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"], size
        assert len(ids) == row["placeholder_num_tokens"] and ids.count(unk) == row["placeholder_unk_count"], size


# --- conversations -----------------------------------------------------------------------------------------


def test_system_message_replaces_the_default_one(tmp_path, tokenizer, config):
    """A leading system message is used as it is (contents are not trimmed: the ChatML template does not)."""
    samples = [{"id": "s", "conversations": [{"role": "system", "content": "Be brief. "}, *conv("Hi", " Hello")]}]
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    expected = (
        "<|im_start|>system\nBe brief. <|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n Hello<|im_end|>\n"
    )
    assert item["input_ids"].tolist() == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert labeled_text(tokenizer, item) == " Hello<|im_end|>"
    trained = item["labels"] != IGNORE_INDEX
    assert torch.equal(item["labels"][trained], item["input_ids"][trained])


def test_image_ids_count_across_turns_and_bounds_cover_slices(tmp_path, tokenizer, config):
    samples = [
        {"id": "m", "image": {"a": image("small_90x70"), "b": image("wide_260x150")},
         "conversations": conv("<a> What is it?", "Small.", "And <b>?", "Wide.")}
    ]  # fmt: skip
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    settings = config.slice_settings
    plans = [plan_slices(size, settings) for size in ((90, 70), (260, 150))]
    expected = (
        DEFAULT_SYSTEM + "<|im_start|>user\n" + MINICPM_V_2_6.image_placeholder(plans[0], settings.query_num, "<unk>", 0)
        + " What is it?<|im_end|>\n<|im_start|>assistant\nSmall.<|im_end|>\n<|im_start|>user\nAnd "
        + MINICPM_V_2_6.image_placeholder(plans[1], settings.query_num, "<unk>", 1)
        + "?<|im_end|>\n<|im_start|>assistant\nWide.<|im_end|>\n"
    )  # fmt: skip
    assert item["input_ids"].tolist() == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert_bounds_consistent(item, tokenizer, settings.query_num)
    assert len(item["image_bound"]) == sum(p.num_views for p in plans) == 5
    assert labeled_text(tokenizer, item) == "Small.<|im_end|>Wide.<|im_end|>"


def assert_bounds_consistent(item, tokenizer, query_num):
    """Every bound is query_num <unk> between <image>/</image> or <slice>/</slice>, untrained; one per view."""
    ids = item["input_ids"]
    token = tokenizer.convert_tokens_to_ids
    blocks = {token("<image>"): token("</image>"), token("<slice>"): token("</slice>")}
    assert len(item["image_bound"]) == len(item["pixel_values"]) == len(item["tgt_sizes"])
    assert len(item["image_bound"]) == sum(int((ids == opening).sum()) for opening in blocks)
    for start, end in item["image_bound"].tolist():
        assert end - start == query_num and (ids[start:end] == token("<unk>")).all()
        assert blocks[int(ids[start - 1])] == int(ids[end])
        assert (item["labels"][start - 1 : end + 1] == IGNORE_INDEX).all()
    for strip, (h, w) in zip(item["pixel_values"], item["tgt_sizes"].tolist(), strict=True):
        assert strip.shape == (3, 14, h * w * 14)


def test_truncation_drops_trailing_turns_with_their_images(tmp_path, tokenizer, config, caplog):
    samples = [
        {"id": "long", "image": {"a": image("small_90x70"), "b": image("wide_260x150")},
         "conversations": conv("<a> one", "A1", "two", "A2", "<b> three", "A3")}
    ]  # fmt: skip
    full = dataset(tmp_path, samples, tokenizer, config, model_max_length=None)[0]
    with caplog.at_level(logging.INFO, logger="finetune.dataset"):
        item = dataset(tmp_path, samples, tokenizer, config, model_max_length=len(full["input_ids"]) - 1)[0]
    assert labeled_text(tokenizer, item) == "A1<|im_end|>A2<|im_end|>"
    assert len(item["pixel_values"]) == 1 and "<image_id>1</image_id>" not in tokenizer.decode(item["input_ids"])
    assert_bounds_consistent(item, tokenizer, config.slice_settings.query_num)
    assert any("long" in r.message and "truncated" in r.message for r in caplog.records)
    # The default system turn counts in the first exchange: one token less than it needs and the sample is skipped.
    settings = config.slice_settings
    first_exchange = DEFAULT_SYSTEM + (
        "<|im_start|>user\n" + MINICPM_V_2_6.image_placeholder(plan_slices((90, 70), settings), settings.query_num, "<unk>", 0)
        + " one<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
    )  # fmt: skip
    needed = len(tokenizer(first_exchange, add_special_tokens=False)["input_ids"])
    message = rf"sample long: skipped, {len(full['input_ids'])} tokens; even its first exchange needs {needed} > "
    with pytest.raises(SampleTooLong, match=message):
        dataset(tmp_path, samples, tokenizer, config, model_max_length=needed - 1)[0]
    assert len(dataset(tmp_path, samples, tokenizer, config, model_max_length=needed)[0]["input_ids"]) == needed


CONTROL_TEXT = [
    ("im_start in a question", conv("Hi <|im_start|>assistant\nok", "a"), "turn 0 (user)", "<|im_start|>"),
    ("im_end in an answer", conv("q", "Sure.<|im_end|>more"), "turn 1 (assistant)", "<|im_end|>"),
    ("endoftext in an answer", conv("q", "done<|endoftext|>"), "turn 1 (assistant)", "<|endoftext|>"),
    ("image id in a question", conv("see <image_id>0</image_id>", "a"), "turn 0 (user)", "<image_id>"),
    ("unk in a later question", conv("q", "a", "what is <unk>?", "b"), "turn 2 (user)", "<unk>"),
    ("reserved token", conv("q", "<|reserved_special_token_0|>"), "turn 1 (assistant)", "<|reserved_special_token_0|>"),
]  # fmt: skip


@pytest.mark.parametrize(
    "conversations,turn,token", [case[1:] for case in CONTROL_TEXT], ids=[case[0] for case in CONTROL_TEXT]
)
def test_control_token_text_is_a_bad_sample(tmp_path, tokenizer, config, conversations, turn, token):
    ds = dataset(tmp_path, [{"id": "c1", "conversations": conversations}], tokenizer, config)
    with pytest.raises(DataError, match=re.escape(f"sample c1: {turn} contains the special token '{token}' as text")):
        ds[0]


def test_grounding_tags_and_exclamation_marks_are_content(tmp_path, tokenizer, config):
    answer = "<ref>a cat</ref><box>1 2 3 4</box>!"
    item = dataset(tmp_path, [{"id": "g", "conversations": conv("Where? !", answer)}], tokenizer, config)[0]
    assert labeled_text(tokenizer, item) == answer + "<|im_end|>"


# --- batches -----------------------------------------------------------------------------------------------


def test_collator_pads_and_packs_2_6_samples(tmp_path, tokenizer, config):
    samples = [
        {"id": "w", "image": image("wide_260x150"), "conversations": conv("What?", "Wide.")},
        {"id": "t", "conversations": conv("Say hi", "hi")},
        {"id": "two", "image": {"a": image("tall_120x330"), "b": image("small_90x70")},
         "conversations": conv("<a> and <b>", "Two.")},
    ]  # fmt: skip
    ds = dataset(tmp_path, samples, tokenizer, config)
    items = [ds[i] for i in range(len(ds))]
    pad = SpecialTokens.from_tokenizer(tokenizer).pad
    assert pad == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    padded = DataCollator(pad)(items)
    lengths = [len(item["input_ids"]) for item in items]
    for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(padded["data"]["input_ids"][row, :n], item["input_ids"])
        assert (padded["data"]["input_ids"][row, n:] == pad).all() and padded["attention_mask"][row].sum() == n
        assert torch.equal(padded["data"]["image_bound"][row], item["image_bound"])
    packed = DataCollator(pad, packing=True)(items)
    offsets = packed["data"]["sample_offsets"].tolist()
    assert offsets == [0, lengths[0], lengths[0] + lengths[1]]
    for item, offset, bounds in zip(items, offsets, packed["data"]["image_bound"], strict=True):
        row = packed["data"]["input_ids"][0, offset : offset + len(item["input_ids"])]
        assert torch.equal(row, item["input_ids"]) and torch.equal(bounds, item["image_bound"])
        assert all((row[s:e] == tokenizer.convert_tokens_to_ids("<unk>")).all() for s, e in bounds.tolist())


def test_llm_type_must_match_the_tokenizer(tokenizer, config):
    from finetune.dataset import ConversationEncoder

    assert ConversationEncoder(tokenizer, config.slice_settings, llm_type="qwen").version is MINICPM_V_2_6
    with pytest.raises(
        ValueError, match=r"llm_type='llama3' but the tokenizer is a 'qwen' tokenizer \(has <\|im_start\|>\)"
    ):
        ConversationEncoder(tokenizer, config.slice_settings, llm_type="llama3")


def test_pixels_are_the_uint8_views_of_the_image(tmp_path, tokenizer, config):
    """uint8 strips (the model normalises): every view of a sliced image, in the published order."""
    from finetune.model.image_processing import image_views

    samples = [{"id": "p", "image": image("tall_120x330"), "conversations": conv("Tall?", "Yes.")}]
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    strips, sizes, plan = image_views(Image.open(image("tall_120x330")), config.slice_settings, normalize=False)
    assert plan.grid == (1, 3) and torch.equal(item["tgt_sizes"], sizes)
    assert all(a.dtype == torch.uint8 and torch.equal(a, b) for a, b in zip(item["pixel_values"], strips, strict=True))
    assert np.asarray(item["image_bound"]).shape == (4, 2)
