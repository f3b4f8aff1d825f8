"""finetune.dataset: records, template, labels, images, truncation, mixing, collator (CPU, tiny tokenizer)."""

from __future__ import annotations

import dataclasses
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
    ConversationEncoder,
    DataCollator,
    DataError,
    DataSettings,
    JsonlSource,
    MixedSource,
    SampleTooLong,
    SupervisedDataset,
    open_source,
    parse_data_spec,
    parse_record,
)
from finetune.model import MiniCPMVConfig, image_placeholder
from finetune.model.image_processing import (
    image_views,
    normalize_pixels,
    normalize_view,
    plan_slices,
    slice_image,
    to_patch_strip,
    uint8_patch_strip,
)  # fmt: skip
from finetune.validation import ValidationReport, validate_built

CHECKPOINT = os.path.join(os.path.dirname(__file__), "golden_tiny", "checkpoint")
IMAGES = os.path.join(os.path.dirname(__file__), "golden_tiny", "images")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def config():
    return MiniCPMVConfig.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def encoder(tokenizer, config):
    return ConversationEncoder(tokenizer, config.slice_settings)


def make_image(folder, name="img.png", size=(260, 150), color=(200, 30, 60)):
    path = os.path.join(folder, name)
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[...] = color
    array[:, : size[0] // 2, 1] = 255  # not flat: slices differ
    Image.fromarray(array).save(path)
    return path


def write_json(folder, samples, name="data.json"):
    path = os.path.join(folder, name)
    with open(path, "w") as handle:
        json.dump(samples, handle)
    return path


def write_jsonl(folder, samples, name="data.jsonl"):
    path = os.path.join(folder, name)
    with open(path, "w") as handle:
        for s in samples:
            handle.write((s if isinstance(s, str) else json.dumps(s)) + "\n")
    return path


def conv(*turns):
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)]


def labeled_text(tokenizer, item):
    labels = item["labels"]
    return tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())


def dataset(folder, samples, tokenizer, config, **kwargs):
    return SupervisedDataset(DataSettings(write_json(folder, samples), **kwargs), tokenizer, config)


# --- template and labels -----------------------------------------------------------------------------------


def test_text_only_template_and_labels_multi_turn(tmp_path, tokenizer, config):
    samples = [
        {
            "id": "t",
            "conversations": [{"role": "system", "content": " Be brief. "}]
            + conv("Hi there ", "Hello!", "Q2?", " A2 "),
        }
    ]
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    text = tokenizer.decode(item["input_ids"].tolist())
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
    )
    assert text == expected  # one bos, no trailing assistant header
    assert item["input_ids"][0] == tokenizer.bos_token_id and (item["input_ids"] == tokenizer.bos_token_id).sum() == 1
    # piecewise tokenization equals tokenizing the whole rendered string
    assert item["input_ids"].tolist() == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert labeled_text(tokenizer, item) == "Hello!<|eot_id|>A2<|eot_id|>"
    # labelled positions are exactly two contiguous spans (content + eot of each answer)
    mask = (item["labels"] != IGNORE_INDEX).int()
    assert int((mask[1:] - mask[:-1] == 1).sum()) == 2
    assert torch.equal(item["labels"][mask.bool()], item["input_ids"][mask.bool()])
    assert item["pixel_values"] == [] and item["tgt_sizes"].shape == (0, 2) and item["image_bound"].shape == (0, 2)
    assert item["id"] == "t"


def test_single_image_without_marker_goes_before_first_user_text(tmp_path, tokenizer, config):
    make_image(tmp_path)
    samples = [{"id": "a", "image": "img.png", "conversations": conv("What is it?", "A flag.")}]
    ds = dataset(tmp_path, samples, tokenizer, config)
    item = ds[0]
    settings = config.slice_settings
    plan = plan_slices((260, 150), settings)
    placeholder = image_placeholder(plan, settings.query_num)
    expected = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + placeholder + "\nWhat is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA flag.<|eot_id|>"
    )
    assert item["input_ids"].tolist() == tokenizer(expected, add_special_tokens=False)["input_ids"]
    # pixels, sizes: same as the reference image_views
    strips, sizes, _ = image_views(Image.open(tmp_path / "img.png"), settings, normalize=False)
    assert len(item["pixel_values"]) == len(strips) == plan.num_views
    assert all(torch.equal(a, b) for a, b in zip(item["pixel_values"], strips, strict=True))
    assert all(p.shape[:2] == (3, 14) for p in item["pixel_values"])
    assert torch.equal(item["tgt_sizes"], sizes)
    assert_bounds_consistent(item, tokenizer, settings.query_num)
    assert labeled_text(tokenizer, item) == "A flag.<|eot_id|>"


def assert_bounds_consistent(item, tokenizer, query_num):
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    bounds = item["image_bound"]
    assert len(bounds) == len(item["pixel_values"]) == len(item["tgt_sizes"])
    for start, end in bounds.tolist():
        assert end - start == query_num
        assert (item["input_ids"][start:end] == unk).all()
        assert item["input_ids"][start - 1] == tokenizer.convert_tokens_to_ids("<image>")
        assert item["input_ids"][end] == tokenizer.convert_tokens_to_ids("</image>")
        assert (item["labels"][start - 1 : end + 1] == IGNORE_INDEX).all()
    for strip, (h, w) in zip(item["pixel_values"], item["tgt_sizes"].tolist(), strict=True):
        assert strip.shape == (3, 14, h * w * 14)


def test_image_marker_mid_text(tmp_path, tokenizer, config):
    make_image(tmp_path, size=(90, 70))
    samples = [{"id": "m", "image": "img.png", "conversations": conv("Look at <image> and say", "Red.")}]
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    plan = plan_slices((90, 70), config.slice_settings)
    assert plan.grid is None  # small image: upscaled, one view
    placeholder = image_placeholder(plan, config.slice_settings.query_num)
    text = tokenizer.decode(item["input_ids"].tolist())
    assert "\n\nLook at " + placeholder + " and say<|eot_id|>" in text
    assert_bounds_consistent(item, tokenizer, config.slice_settings.query_num)


def test_multi_image_dict_markers_in_order_of_appearance(tmp_path, tokenizer, config):
    make_image(tmp_path, "tall.png", (120, 330))
    make_image(tmp_path, "sq.png", (224, 224), (0, 0, 255))
    # dict order differs from appearance order: appearance decides (views follow the text)
    samples = [{"id": "d", "image": {"image_01": "sq.png", "image_00": "tall.png"},
                "conversations": conv("First <image_00> then <image_01>?", "Two.", "More?", "No.")}]  # fmt: skip
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    settings = config.slice_settings
    tall, _, _ = image_views(Image.open(tmp_path / "tall.png"), settings, normalize=False)
    square, _, _ = image_views(Image.open(tmp_path / "sq.png"), settings, normalize=False)
    assert len(item["pixel_values"]) == len(tall) + len(square)
    assert all(torch.equal(a, b) for a, b in zip(item["pixel_values"], tall + square, strict=True))
    assert_bounds_consistent(item, tokenizer, settings.query_num)
    text = tokenizer.decode(item["input_ids"].tolist())
    assert text.count("<slice>") == 2 and "<image_0" not in text
    assert labeled_text(tokenizer, item) == "Two.<|eot_id|>No.<|eot_id|>"


def test_real_golden_images_bounds(tmp_path, tokenizer, config):
    samples = [
        {"id": "g", "image": os.path.join(IMAGES, "wide_260x150.png"), "conversations": conv("Describe", "Wide.")}
    ]
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    assert len(item["image_bound"]) == plan_slices((260, 150), config.slice_settings).num_views
    assert_bounds_consistent(item, tokenizer, config.slice_settings.query_num)


def test_placeholder_ids_equal_tokenized_text(encoder, tokenizer, config):
    settings = config.slice_settings
    for size in [(90, 70), (260, 150), (120, 330), (224, 224), (1000, 200), (500, 500)]:
        plan = plan_slices(size, settings)
        text = image_placeholder(plan, settings.query_num)
        assert encoder.placeholder_ids(plan) == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert (
            encoder.placeholder_ids(plan).count(tokenizer.convert_tokens_to_ids("<unk>"))
            == settings.query_num * plan.num_views
        )
    # full-size settings: 1344 x 1344 costs 960 <unk> (spec section 3)
    full = ConversationEncoder(tokenizer, dataclasses.replace(settings, scale_resolution=448, query_num=96))
    plan = plan_slices((1344, 1344), full.settings)
    ids = full.placeholder_ids(plan)
    assert ids == tokenizer(image_placeholder(plan, 96), add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<unk>")) == 960


def test_uint8_strips_normalise_bit_identical_to_reference(config):
    """Training keeps uint8 strips and the model normalises them: the same bits as the published processor."""
    settings = dataclasses.replace(config.slice_settings, scale_resolution=448)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (700, 900, 3), dtype=np.uint8))
    views, _ = slice_image(image, settings)
    for view in views:
        strip = uint8_patch_strip(view, 14)
        assert strip.dtype == torch.uint8
        assert torch.equal(normalize_pixels(strip), to_patch_strip(normalize_view(view), 14))
    raw, sizes, _ = image_views(image, settings, normalize=False)
    ref, ref_sizes, _ = image_views(image, settings)
    assert torch.equal(sizes, ref_sizes) and all(
        torch.equal(normalize_pixels(a), b) for a, b in zip(raw, ref, strict=True)
    )


@pytest.mark.parametrize("size", [(1344, 1344), (900, 700), (260, 150), (90, 70), (2000, 300)])
def test_view_strips_equal_per_view_crops(config, size):
    """image_views cuts the grid's strips from whole colour planes (no PIL crops, and no resize when the grid
    already has the image's size, e.g. 1344 x 1344 into 3 x 3 cells of 448): the same bits as one strip per
    slice_image view."""
    settings = dataclasses.replace(config.slice_settings, scale_resolution=448)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    views, plan = slice_image(image, settings)
    strips, sizes, grid = image_views(image, settings, normalize=False)
    assert grid == plan and len(strips) == len(views) == plan.num_views
    for strip, view in zip(strips, views, strict=True):
        assert strip.is_contiguous() and torch.equal(strip, uint8_patch_strip(view, 14))
        assert torch.equal(normalize_pixels(strip), to_patch_strip(normalize_view(view), 14))
    assert torch.equal(sizes, torch.tensor([(v.size[1] // 14, v.size[0] // 14) for v in views]))


def test_prepare_sample_closes_image_files(tmp_path, tokenizer, config, monkeypatch):
    """Images are opened once (header, then decoded only if kept) and every file is closed afterwards."""
    make_image(tmp_path, "a.png", (300, 200))
    make_image(tmp_path, "b.jpg", (200, 300))
    samples = [
        {
            "id": "two",
            "image": {"image_00": "a.png", "image_01": "b.jpg"},
            "conversations": conv("<image_00> <image_01>", "ok"),
        }
    ]
    ds = dataset(tmp_path, samples, tokenizer, config)
    opened = []
    real_open = Image.open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(Image, "open", spy)
    item = ds[0]
    assert len(opened) == 2 and all(image.fp is None for image in opened)
    assert len(item["pixel_values"]) == sum(
        plan_slices(s, config.slice_settings).num_views for s in ((300, 200), (200, 300))
    )


def test_slice_overrides_and_slicing_off(tmp_path, tokenizer, config):
    make_image(tmp_path, size=(600, 300))
    samples = [{"id": "o", "image": "img.png", "conversations": conv("?", "!")}]
    default = dataset(tmp_path, samples, tokenizer, config)[0]
    assert len(default["pixel_values"]) > 3
    capped = SupervisedDataset(DataSettings(str(tmp_path / "data.json"), max_slice_nums=2), tokenizer, config)
    assert capped.slice_settings.max_slice_nums == 2 and len(capped[0]["pixel_values"]) <= 3
    off = SupervisedDataset(DataSettings(str(tmp_path / "data.json"), slicing=False), tokenizer, config)
    item = off[0]
    assert len(item["pixel_values"]) == 1 and "<slice>" not in tokenizer.decode(item["input_ids"].tolist())
    bigger = SupervisedDataset(
        DataSettings(str(tmp_path / "data.json"), scale_resolution=224, slicing=False), tokenizer, config
    )
    h, w = bigger[0]["tgt_sizes"][0].tolist()
    assert h * w > 64 and bigger.slice_settings.scale_resolution == 224


def test_llm_type_mismatch_and_minicpm(tokenizer, config):
    with pytest.raises(ValueError, match="llm_type='minicpm' but the tokenizer is a 'llama3' tokenizer"):
        ConversationEncoder(tokenizer, config.slice_settings, llm_type="minicpm")
    assert ConversationEncoder(tokenizer, config.slice_settings, llm_type="llama3").llm_type == "llama3"


# --- truncation --------------------------------------------------------------------------------------------


def test_truncation_drops_trailing_turns_and_their_images(tmp_path, tokenizer, config, caplog):
    make_image(tmp_path, "a.png", (90, 70))
    make_image(tmp_path, "b.png", (260, 150))
    samples = [{"id": "long", "image": {"image_00": "a.png", "image_01": "b.png"},
                "conversations": conv("<image_00> one", "A1", "two", "A2", "<image_01> three " + "x" * 50, "A3")}]  # fmt: skip
    full = dataset(tmp_path, samples, tokenizer, config, model_max_length=None)[0]
    q = config.slice_settings.query_num
    limit = len(full["input_ids"]) - 1
    with caplog.at_level(logging.INFO, logger="finetune.dataset"):
        item = dataset(tmp_path, samples, tokenizer, config, model_max_length=limit)[0]
    assert len(item["input_ids"]) <= limit
    assert labeled_text(tokenizer, item) == "A1<|eot_id|>A2<|eot_id|>"
    assert len(item["pixel_values"]) == 1 and len(item["image_bound"]) == 1  # image_01's views dropped with its turn
    assert_bounds_consistent(item, tokenizer, q)
    assert any("long" in r.message and "truncated" in r.message for r in caplog.records)
    # even tighter: only the first exchange remains
    first = dataset(tmp_path, samples, tokenizer, config, model_max_length=60)[0]
    assert labeled_text(tokenizer, first) == "A1<|eot_id|>" and len(first["image_bound"]) == 1


def test_truncation_skips_when_first_exchange_does_not_fit(tmp_path, tokenizer, config, caplog):
    make_image(tmp_path)
    samples = [
        {"id": "big", "image": "img.png", "conversations": conv("hi", "ok")},
        {"id": "small", "conversations": conv("hi", "ok")},
    ]
    ds = dataset(tmp_path, samples, tokenizer, config, model_max_length=40)  # shorter than one image block set
    with pytest.raises(SampleTooLong, match="sample big: skipped"):
        ds[0]
    with caplog.at_level(logging.INFO):
        split = validate_built("train", "data.json", ds, workers=1)
    assert [split.count(s) for s in ("kept", "truncated", "skipped", "bad")] == [1, 0, 1, 0]
    assert [r.id for r in split.results if r.status == "skipped"] == ["big"] and split.usable_indices == [1]
    assert "kept: 1  truncated: 0  skipped (too long): 1  bad: 0" in ValidationReport([split], 40).format()
    assert any("big" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    usable = SupervisedDataset(
        DataSettings(str(tmp_path / "data.json"), model_max_length=40), tokenizer, config, indices=split.usable_indices
    )
    assert len(usable) == 1 and usable[0]["id"] == "small"
    subset = ds.subset(split.usable_indices)  # what finetune.py uses: no second read of the data files
    assert len(subset) == 1 and subset[0]["id"] == "small" and len(ds) == 2 and subset.source is ds.source


# --- sources and mixing ------------------------------------------------------------------------------------


def test_jsonl_lazy_offsets(tmp_path, tokenizer, config):
    samples = [{"id": f"s{i}", "conversations": conv(f"q{i}", f"a{i}")} for i in range(5)]
    path = write_jsonl(tmp_path, samples[:2] + [""] + samples[2:])  # blank lines are ignored
    source = JsonlSource(path)
    assert len(source) == 5 and not hasattr(source, "_data")
    assert source[3]["id"] == "s3" and source.location(2) == "data.jsonl:4"
    ds = SupervisedDataset(DataSettings(path), tokenizer, config)
    assert [ds[i]["id"] for i in range(5)] == [f"s{i}" for i in range(5)]
    assert labeled_text(tokenizer, ds[4]) == "a4<|eot_id|>"


def test_parse_data_spec():
    assert parse_data_spec("ocr.json:0.7,chat.jsonl:0.3") == [("ocr.json", 0.7), ("chat.jsonl", 0.3)]
    assert parse_data_spec("a.json, c:/x/b.jsonl") == [("a.json", None), ("c:/x/b.jsonl", None)]
    with pytest.raises(ValueError, match="ratio must be"):
        parse_data_spec("a.json:-1")


def test_mixing_ratios_deterministic(tmp_path):
    a = write_json(tmp_path, [{"id": f"a{i}", "conversations": conv("q", "a")} for i in range(60)], "a.json")
    b = write_jsonl(tmp_path, [{"id": f"b{i}", "conversations": conv("q", "a")} for i in range(40)], "b.jsonl")
    c = write_json(tmp_path, [{"id": f"c{i}", "conversations": conv("q", "a")} for i in range(7)], "c.json")
    mixed = MixedSource(f"{a}:0.7,{b}:0.3,{c}")
    # pool N = 100: a gives round(100*0.7)=70 (> 60: all once + 10 resampled), b gives 30 of 40, c all 7
    assert mixed.counts == [70, 30, 7] and len(mixed) == 107
    ids = [mixed[i]["id"] for i in range(len(mixed))]
    assert len({i for i in ids if i.startswith("b")}) == 30 and ids[-7:] == [f"c{i}" for i in range(7)]
    assert {f"a{i}" for i in range(60)} <= set(ids)
    again = MixedSource(f"{a}:0.7,{b}:0.3,{c}")
    assert [again[i]["id"] for i in range(len(again))] == ids
    other = MixedSource(f"{a}:0.7,{b}:0.3,{c}", seed=7)
    assert [other[i]["id"] for i in range(len(other))] != ids


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "a.json:1e308,b.json:1e308",
            r"data spec 'a.json:1e308,b.json:1e308': the ratios add up to more than the largest float",
        ),
        ("a.json:inf,b.json:1", r"data spec 'a.json:inf': ratio must be a finite number > 0"),
        ("a.json:nan,b.json:1", r"data spec 'a.json:nan': ratio must be a finite number > 0"),
        ("a.json:-0.5,b.json:1", r"data spec 'a.json:-0.5': ratio must be a finite number > 0"),
        (
            "a.json:0,b.json:1",
            r"data spec 'a.json:0': ratio must be a finite number > 0 \(leave a file out of the spec to drop it\)",
        ),
    ],
)
def test_data_spec_ratios_that_cannot_mix_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_data_spec(spec)
    assert "\n" not in str(error.value)


def test_a_file_that_the_mix_gives_no_samples_is_an_error(tmp_path):
    """Ratios are shares of the pooled size: one that rounds to 0 samples, or an empty file, would silently
    drop a file the user asked for."""
    a = write_json(tmp_path, [{"id": f"a{i}", "conversations": conv("q", "a")} for i in range(60)], "a.json")
    b = write_json(tmp_path, [{"id": f"b{i}", "conversations": conv("q", "a")} for i in range(10)], "b.json")
    empty = write_jsonl(tmp_path, [], "empty.jsonl")
    cases = {
        f"{a}:1,{b}:0.001": r"data mix: .*b\.json gets 0 samples \(ratio 0\.001 is 0\.0999% of the ratios, of a pool of 70 samples\); raise its ratio or leave it out",
        f"{a}:1e308,{b}:1": r"data mix: .*b\.json gets 0 samples \(ratio 1 is 1e-306% of the ratios",
        f"{a}:0.5,{empty}:0.5": r"data mix: .*empty\.jsonl gets 0 samples: the file holds none",
        f"{a},{empty}": r"data mix: .*empty\.jsonl gets 0 samples: the file holds none",
    }
    for spec, message in cases.items():
        with pytest.raises(DataError, match=message) as error:
            MixedSource(spec)
        assert "\n" not in str(error.value), spec
    # Huge ratios that do not overflow in sum mix as their shares say.
    assert MixedSource(f"{a}:1e307,{b}:1e307").counts == [35, 35]


def test_mix_shares_one_line_per_file(tmp_path):
    a = write_json(tmp_path, [{"id": f"a{i}", "conversations": conv("q", "a")} for i in range(60)], "a.json")
    b = write_jsonl(tmp_path, [{"id": f"b{i}", "conversations": conv("q", "a")} for i in range(40)], "b.jsonl")
    c = write_json(tmp_path, [{"id": f"c{i}", "conversations": conv("q", "a")} for i in range(7)], "c.json")
    assert MixedSource(f"{a}:0.7,{b}:0.3,{c}").share_lines() == [
        f"{a}: 70 samples (ratio 0.7: 60 in the file, 10 repeated)",
        f"{b}: 30 samples (ratio 0.3: 40 in the file)",
        f"{c}: 7 samples (no ratio: every sample once)",
    ]


def test_image_paths_relative_to_data_dir_and_image_folder(tmp_path, tokenizer, config):
    images = tmp_path / "imgs"
    images.mkdir()
    make_image(images, "x.png")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_image(data_dir, "y.png")
    record = parse_record(
        {"id": "r", "image": "x.png", "conversations": conv("a", "b")}, "r", str(data_dir), str(images)
    )
    assert record.images[0][1] == str(images / "x.png")
    record = parse_record(
        {"id": "r", "image": "y.png", "conversations": conv("a", "b")}, "r", str(data_dir), str(images)
    )
    assert record.images[0][1] == str(data_dir / "y.png")


# --- bad input ---------------------------------------------------------------------------------------------


def test_malformed_json_list_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]')
    with pytest.raises(DataError, match=r"bad.json: malformed JSON at line 3 column 14"):
        open_source(str(path))


def test_malformed_jsonl_names_line(tmp_path, tokenizer, config):
    path = write_jsonl(tmp_path, [{"id": "a", "conversations": conv("q", "a")}, '{"id": "b", "conv'])
    ds = SupervisedDataset(DataSettings(path), tokenizer, config)
    assert ds[0]["id"] == "a"
    with pytest.raises(DataError, match=r"data.jsonl line 2: malformed JSON \(column \d+\)"):
        ds[1]


BAD_RECORDS = [
    ({"id": "r1", "conversations": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
     r"sample r1: turn 0: first turn must be from the user"),
    ({"id": "r2", "conversations": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]},
     r"sample r2: turn 1: first turn must be from the user"),
    ({"id": "r3", "conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r"sample r3: turn 1: roles must alternate user/assistant, expected 'assistant' got 'user'"),
    ({"id": "r4", "conversations": [{"role": "user", "content": "a"}, {"role": "gpt", "content": "b"}]},
     r"sample r4: turn 1: unknown role 'gpt'"),
    ({"id": "r5", "conversations": conv("a", "   ")}, r"sample r5: turn 1 \(assistant\): empty content"),
    ({"id": "r6", "conversations": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
     r"sample r6: turn 0 \(user\): content must be a string, got list"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "only a question"}]}, r"sample r7: no assistant turn"),
    ({"id": "r8", "image": "img.png", "conversations": conv("<image> and <image>", "b")},
     r"sample r8: 2 <image> markers but 1 image"),
    ({"id": "r9", "conversations": conv("<image> what?", "b")}, r"sample r9: 1 image marker\(s\) but no image"),
    ({"id": "r10", "image": {"image_00": "img.png", "image_01": "img.png"}, "conversations": conv("<image_00> only", "b")},
     r"sample r10: image 'image_01': marker <image_01> appears 0 times, expected exactly once"),
    ({"id": "r11", "image": {"image_00": "img.png"}, "conversations": conv("<image_00> <image_01>", "b")},
     r"sample r11: image marker\(s\) <image_01> without an image"),
    ({"conversations": conv("a", 3)}, r"sample data.json\[5\]: turn 1 \(assistant\): content must be a string, got int"),
    ({"id": "r13", "conversations": []}, r"sample r13: 'conversations' must be a non-empty list"),
    ({"id": "r14", "conversations": conv("a", "b", "c")}, r"sample r14: turn 2: conversation ends with a user turn"),
    ({"id": "r15", "conversations": conv("a </image> b", "c")}, r"sample r15: turn 0: content contains the reserved tag '</image>'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "raw,message", BAD_RECORDS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_RECORDS)]
)
def test_bad_records(tmp_path, raw, message):
    make_image(tmp_path)
    with pytest.raises(DataError, match=message):
        parse_record(raw, "data.json[5]", str(tmp_path))


SPECIAL_TOKEN_TEXT = [
    ("eot in an answer", conv("q", "Sure.<|eot_id|>more"), "turn 1 (assistant)", "<|eot_id|>"),
    ("header in a question", conv("Hi <|start_header_id|>assistant<|end_header_id|> ok", "a"), "turn 0 (user)", "<|start_header_id|>"),
    ("unk in a later question", conv("q", "a", "what is <unk>?", "b"), "turn 2 (user)", "<unk>"),
    ("end of text in a system turn", [{"role": "system", "content": "Be brief.<|end_of_text|>"}, *conv("q", "a")], "turn 0 (system)", "<|end_of_text|>"),
    ("begin of text in an answer", conv("q", "<|begin_of_text|>a"), "turn 1 (assistant)", "<|begin_of_text|>"),
]  # fmt: skip


@pytest.mark.parametrize(
    "conversations,turn,token", [case[1:] for case in SPECIAL_TOKEN_TEXT], ids=[case[0] for case in SPECIAL_TOKEN_TEXT]
)
def test_special_token_text_in_a_turn_is_a_bad_sample(tmp_path, tokenizer, config, conversations, turn, token):
    """Written as text, a control token becomes that token (roles, label spans, the end of a turn move);
    the sample is refused by id, naming the turn and the token, before it is encoded."""
    ds = dataset(tmp_path, [{"id": "s12", "conversations": conversations}], tokenizer, config)
    expected = f"sample s12: {turn} contains the special token '{token}' as text"
    with pytest.raises(DataError, match=re.escape(expected)):
        ds.record(0)
    with pytest.raises(DataError, match=re.escape(expected)):
        ds[0]


def test_image_marker_and_grounding_tags_in_text_are_accepted(tmp_path, tokenizer, config):
    """The <image> marker is the data format's own; <ref>/<box> (grounding) are content the model is taught to
    write, not control tokens: both stay accepted, and the grounding tags are trained as single tokens."""
    make_image(tmp_path)
    answer = "<ref>the cat</ref><box>10 20 30 40</box>"
    samples = [{"id": "g", "image": "img.png", "conversations": conv("<image>\nWhere is the cat?", answer)}]
    item = dataset(tmp_path, samples, tokenizer, config)[0]
    assert labeled_text(tokenizer, item) == answer + "<|eot_id|>"
    assert tokenizer.convert_tokens_to_ids("<box>") in item["labels"].tolist()


def test_missing_image_names_path(tmp_path, tokenizer, config):
    samples = [{"id": "miss", "image": "nope.png", "conversations": conv("a", "b")}]
    ds = dataset(tmp_path, samples, tokenizer, config)
    with pytest.raises(DataError, match=r"sample miss: image file not found: 'nope.png' \(tried .*nope.png\)"):
        ds[0]


def test_corrupt_image_names_path(tmp_path, tokenizer, config):
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    good = make_image(tmp_path, "good.jpg")
    Image.open(good).convert("RGB").save(tmp_path / "cut.jpg", quality=90)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated: header opens, decoding fails
    samples = [{"id": "junk", "image": "junk.png", "conversations": conv("a", "b")},
               {"id": "cut", "image": "cut.jpg", "conversations": conv("a", "b")}]  # fmt: skip
    ds = dataset(tmp_path, samples, tokenizer, config)
    with pytest.raises(DataError, match=r"sample junk: cannot read image .*junk.png"):
        ds[0]
    with pytest.raises(DataError, match=r"sample cut: cannot read image .*cut.jpg"):
        ds[1]
    split = validate_built("train", "data.json", ds, workers=1)
    assert [r.id for r in split.bad] == ["junk", "cut"]
    assert all("cannot read image" in r.reason for r in split.bad)


def test_duplicate_ids_warn(tmp_path, tokenizer, config, caplog):
    samples = [{"id": "same", "conversations": conv("a", "b")}, {"id": "same", "conversations": conv("c", "d")}]
    ds = dataset(tmp_path, samples, tokenizer, config)
    with caplog.at_level(logging.WARNING, logger="finetune.dataset"):
        split = validate_built("train", "data.json", ds, workers=1)
    assert split.count("kept") == 2 and not split.bad
    assert any("duplicate sample ids" in r.message and "same" in r.message for r in caplog.records)


# --- collator ----------------------------------------------------------------------------------------------


@pytest.fixture()
def items(tmp_path, tokenizer, config):
    make_image(tmp_path, "a.png", (260, 150))
    make_image(tmp_path, "b.png", (90, 70))
    samples = [
        {"id": "a", "image": "a.png", "conversations": conv("what", "this")},
        {"id": "t", "conversations": conv("text only, a bit longer than the others", "ok")},
        {"id": "b", "image": "b.png", "conversations": conv("small", "yes", "and?", "done")},
    ]
    ds = dataset(tmp_path, samples, tokenizer, config)
    return [ds[i] for i in range(3)]


def test_collator_padding_contract(items):
    batch = DataCollator(pad_token_id=0, packing=False)(items)
    assert set(batch) == {"data", "labels", "attention_mask"}
    data = batch["data"]
    assert set(data) == {"input_ids", "position_ids", "pixel_values", "tgt_sizes", "image_bound"}
    lengths = [len(i["input_ids"]) for i in items]
    B, T = 3, max(lengths)
    for key in ("input_ids", "position_ids"):
        assert data[key].shape == (B, T) and data[key].dtype == torch.int64
    assert (
        batch["labels"].shape == batch["attention_mask"].shape == (B, T)
        and batch["attention_mask"].dtype == torch.int64
    )
    for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(data["input_ids"][row, :n], item["input_ids"]) and (data["input_ids"][row, n:] == 0).all()
        assert (
            torch.equal(batch["labels"][row, :n], item["labels"]) and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        )
        assert batch["attention_mask"][row].sum() == n and (batch["attention_mask"][row, n:] == 0).all()
        assert (
            torch.equal(data["position_ids"][row, :n], torch.arange(n)) and (data["position_ids"][row, n:] == 0).all()
        )
        assert isinstance(data["pixel_values"][row], list) and len(data["pixel_values"][row]) == len(
            item["pixel_values"]
        )
        assert all(p.dtype == torch.uint8 and p.shape[:2] == (3, 14) for p in data["pixel_values"][row])
        assert data["tgt_sizes"][row].dtype == torch.int64 and data["tgt_sizes"][row].shape == (
            len(item["pixel_values"]),
            2,
        )
        assert torch.equal(data["image_bound"][row], item["image_bound"])
    assert data["pixel_values"][1] == [] and data["image_bound"][1].shape == (0, 2)


def test_collator_packing_contract(items):
    batch = DataCollator(pad_token_id=0, packing=True)(items)
    assert set(batch) == {"data", "labels"}  # no attention_mask: packed sequences are detected from position_ids
    data = batch["data"]
    lengths = [len(i["input_ids"]) for i in items]
    total = sum(lengths)
    assert data["input_ids"].shape == data["position_ids"].shape == batch["labels"].shape == (1, total)
    assert torch.equal(data["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
    assert torch.equal(data["row_of_sample"], torch.zeros(3, dtype=torch.int64))
    assert torch.equal(data["sample_offsets"], torch.tensor([0, lengths[0], lengths[0] + lengths[1]]))
    assert len(data["pixel_values"]) == len(data["tgt_sizes"]) == len(data["image_bound"]) == 3
    for item, offset, views, sizes, bounds in zip(
        items,
        data["sample_offsets"].tolist(),
        data["pixel_values"],
        data["tgt_sizes"],
        data["image_bound"],
        strict=True,
    ):
        n = len(item["input_ids"])
        assert torch.equal(data["input_ids"][0, offset : offset + n], item["input_ids"])
        assert torch.equal(batch["labels"][0, offset : offset + n], item["labels"])
        assert len(views) == len(item["pixel_values"]) and torch.equal(sizes, item["tgt_sizes"])
        assert torch.equal(bounds, item["image_bound"])  # relative to the sample's start
        for s, e in bounds.tolist():  # offset bounds land on the sample's <unk> runs in the packed row
            assert (data["input_ids"][0, offset + s : offset + e] == item["input_ids"][s]).all()
    with pytest.raises(ValueError, match="packed row is .* over max_length"):
        DataCollator(0, packing=True, max_length=total - 1)(items)
