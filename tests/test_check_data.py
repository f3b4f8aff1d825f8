"""finetune.check_data: the CLI (exit codes, --show, --dump) and validate_dataset (CPU, tiny checkpoint)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import finetune  # noqa: F401
from finetune.check_data import LABEL_CLOSE, LABEL_OPEN, build_parser, data_settings_from_flags, main
from finetune.dataset import DataSettings
from finetune.validation import build_dataset, check_sample, validate_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "tests", "golden_tiny", "checkpoint")


def conv(*turns):
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)]


def make_image(folder, name, size):
    array = np.full((size[1], size[0], 3), 90, dtype=np.uint8)
    array[:, : size[0] // 3] = 250
    Image.fromarray(array).save(os.path.join(folder, name))


@pytest.fixture()
def good_data(tmp_path):
    make_image(tmp_path, "wide.png", (260, 150))
    make_image(tmp_path, "small.png", (90, 70))
    samples = [
        {"id": "img1", "image": "wide.png", "conversations": conv("What is this?", "A wide picture.")},
        {"id": "txt", "conversations": conv("Hello", "Hi!", "How are you?", "Fine.")},
        {"id": "two", "image": {"image_00": "small.png", "image_01": "wide.png"}, "conversations": conv("<image_00> vs <image_01>", "Same colours.")},
    ]  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps(samples))
    return path


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "finetune.check_data", "--model", CHECKPOINT, *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_good_data_show_and_dump(tmp_path, good_data):
    dump = tmp_path / "dump.pt"
    result = run_cli("--data", good_data, "--show", "img1", "--dump", dump, "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "samples: 3  kept: 3  truncated: 0  skipped (too long): 0  bad: 0" in out
    assert "p50" in out and "p99" in out and "max" in out and "suggested model_max_length:" in out
    assert "images per sample: 0: 1, 1: 1, 2: 1" in out
    assert "views per image:" in out and out.rstrip().endswith("OK")
    # --show: trained span marked, image blocks abbreviated
    assert f"{LABEL_OPEN}A wide picture.<|eot_id|>{LABEL_CLOSE}" in out
    assert "<image><unk>×16</image>" in out and "<unk><unk>" not in out
    assert f"{LABEL_OPEN}What" not in out
    # --dump: exactly what training feeds
    dumped = torch.load(dump, weights_only=False)
    assert set(dumped) == {"img1", "txt", "two"}
    from transformers import AutoTokenizer

    from finetune.dataset import SupervisedDataset
    from finetune.model import MiniCPMVConfig

    dataset = SupervisedDataset(
        DataSettings(str(good_data)),
        AutoTokenizer.from_pretrained(CHECKPOINT),
        MiniCPMVConfig.from_pretrained(CHECKPOINT),
    )
    for index in range(3):
        item = dataset[index]
        entry = dumped[item["id"]]
        assert set(entry) == {"input_ids", "labels", "image_bound", "tgt_sizes", "pixel_values", "position_ids"}
        for key in ("input_ids", "labels", "image_bound", "tgt_sizes"):
            assert torch.equal(entry[key], item[key]), key
        assert len(entry["pixel_values"]) == len(item["pixel_values"])
        assert all(torch.equal(a, b) for a, b in zip(entry["pixel_values"], item["pixel_values"], strict=True))
        assert torch.equal(entry["position_ids"], torch.arange(len(item["input_ids"])))


@pytest.mark.slow
def test_cli_bad_data_exit_1_lists_every_bad_id(tmp_path):
    make_image(tmp_path, "ok.png", (90, 70))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [json.dumps({"id": f"ok{i}", "conversations": conv(f"q{i}", f"a{i}")}) for i in range(70)]
    lines += [
        json.dumps({"id": "noimg", "image": "missing.png", "conversations": conv("q", "a")}),
        json.dumps({"id": "corrupt", "image": "corrupt.png", "conversations": conv("q", "a")}),
        json.dumps(
            {"id": "roles", "conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}
        ),
        '{"id": "broken", ',
        json.dumps({"id": "ok1", "image": "ok.png", "conversations": conv("dup id", "a")}),
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = run_cli("--data", data, "--workers", "2")  # > 64 samples: the process pool path
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "samples: 75  kept: 71  truncated: 0  skipped (too long): 0  bad: 4" in out
    assert "BAD noimg: image file not found: 'missing.png'" in out
    assert "BAD corrupt: cannot read image" in out and "corrupt.png" in out
    assert "BAD roles: turn 0: first turn must be from the user" in out
    assert "BAD train.jsonl:74: " in out and "train.jsonl line 74: malformed JSON" in out
    assert "WARNING duplicate ids (1): ok1" in out
    assert "FAILED: 4 bad sample(s)" in result.stderr


def test_validate_dataset_truncated_and_skipped(tmp_path, caplog):
    make_image(tmp_path, "big.png", (260, 150))
    samples = [
        {"id": "short", "conversations": conv("q", "a")},
        {"id": "long", "conversations": conv("q", "a", "q2 " + "x" * 80, "a2")},
        {"id": "huge", "image": "big.png", "conversations": conv("describe", "ok")},
    ]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(samples))
    with caplog.at_level(logging.INFO, logger="finetune.dataset"):
        report = validate_dataset(CHECKPOINT, DataSettings(str(data), model_max_length=60), workers=1)
    split = report.splits[0]
    assert report.ok  # too long is not bad data
    assert (split.count("kept"), split.count("truncated"), split.count("skipped")) == (1, 1, 1)
    assert split.usable_indices == [0, 1]
    assert any("long" in r.message and "truncated" in r.message for r in caplog.records)
    assert any("huge" in r.message and "skipped" in r.message for r in caplog.records)
    text = report.format()
    assert "SKIPPED huge" in text and "truncated: 1" in text
    lengths = split.lengths
    assert split.percentiles()["max"] == max(lengths)
    assert split.suggested_max_length() % 64 == 0 and split.suggested_max_length() >= split.percentiles()["p99"]


def test_validate_dataset_eval_split_and_malformed_json_list(tmp_path, good_data, capsys):
    bad = tmp_path / "eval.json"
    bad.write_text('[{"id": "a", "conversations": [}]')
    report = validate_dataset(CHECKPOINT, DataSettings(str(good_data), str(bad)), workers=1)
    assert not report.ok and [s.name for s in report.splits] == ["train", "eval"]
    assert report.splits[0].count("kept") == 3
    assert "eval.json: malformed JSON at line 1 column 32" in report.splits[1].file_errors[0]
    assert main(["--model", CHECKPOINT, "--data", str(good_data), "--eval_data", str(bad), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BAD FILE:" in out and "line 1 column 32" in out


def test_main_show_unknown_id_and_llm_type_mismatch(good_data, capsys):
    assert main(["--model", CHECKPOINT, "--data", str(good_data), "--show", "nope", "--workers", "1"]) == 1
    assert "no sample with id 'nope'" in capsys.readouterr().err
    assert main(["--model", CHECKPOINT, "--data", str(good_data), "--llm_type", "minicpm", "--workers", "1"]) == 2
    assert "llm_type='minicpm' but the tokenizer is a 'llama3' tokenizer" in capsys.readouterr().err


def test_main_overrides(good_data, capsys):
    assert main(["--model", CHECKPOINT, "--data", str(good_data), "--no_slicing", "--workers", "1"]) == 0
    assert "views per image: 1: 3" in capsys.readouterr().out
    assert main(["--model", CHECKPOINT, "--data", str(good_data), "--max_slice_nums", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    views = out.split("views per image: ")[1].splitlines()[0]
    assert all(int(part.split(":")[0]) <= 3 for part in views.split(", "))


def test_check_data_and_training_read_their_flags_into_the_same_settings(tmp_path, good_data):
    from finetune.arguments import data_settings_from_arguments, parse_arguments

    common = ["--image_folder", str(tmp_path), "--model_max_length", "512", "--max_slice_nums", "2", "--scale_resolution", "224",
              "--llm_type", "llama3", "--seed", "7"]  # fmt: skip
    flags = build_parser().parse_args(
        ["--model", CHECKPOINT, "--data", str(good_data), "--eval_data", "e.json", "--no_slicing", *common]
    )
    _, data_args, training_args, _ = parse_arguments(
        ["--data_path", str(good_data), "--eval_data_path", "e.json", "--slicing", "false", *common]
    )
    expected = DataSettings(str(good_data), "e.json", str(tmp_path), 512, 2, 224, False, "llama3", 7)
    assert data_settings_from_flags(flags) == data_settings_from_arguments(data_args, training_args) == expected


def test_workers_without_fork_build_the_same_dataset_from_its_pickled_settings(good_data):
    """Where fork is unavailable, each validation worker builds the dataset again from the model directory and
    the dataset's settings and split, which are pickled to it (check_samples)."""
    settings = DataSettings(str(good_data), str(good_data), model_max_length=60, max_slice_nums=2, seed=7)
    dataset = build_dataset(CHECKPOINT, settings, "eval")
    model, sent, split = pickle.loads(pickle.dumps((CHECKPOINT, dataset.settings, dataset.split)))
    again = build_dataset(model, sent, split)
    assert (again.settings, again.spec, again.slice_settings) == (settings, str(good_data), dataset.slice_settings)
    assert [check_sample(again, i) for i in range(len(again))] == [
        check_sample(dataset, i) for i in range(len(dataset))
    ]


def test_special_token_text_is_reported_by_id_and_turn(tmp_path, good_data, capsys):
    """check_data (and training, which validates the same way) lists such a sample as bad."""
    samples = json.loads(good_data.read_text()) + [
        {"id": "12", "conversations": conv("q", "a", "q2", "Done.<|eot_id|>")}
    ]
    data = tmp_path / "with_token.json"
    data.write_text(json.dumps(samples))
    assert main(["--model", CHECKPOINT, "--data", str(data), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BAD 12: turn 3 (assistant) contains the special token '<|eot_id|>' as text" in out
    assert "kept: 3" in out and "bad: 1" in out


def test_a_mix_reports_each_files_share_and_a_file_left_without_samples(tmp_path, good_data, capsys):
    more = tmp_path / "more.jsonl"
    more.write_text(
        "\n".join(json.dumps({"id": f"m{i}", "conversations": conv(f"q{i}", f"a{i}")}) for i in range(9)) + "\n"
    )
    assert main(["--model", CHECKPOINT, "--data", f"{good_data}:0.5,{more}:0.5", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"  from {good_data}: 6 samples (ratio 0.5: 3 in the file, 3 repeated)\n" in out
    assert f"  from {more}: 6 samples (ratio 0.5: 9 in the file)\n" in out
    assert "samples: 12  kept: 12" in out
    assert main(["--model", CHECKPOINT, "--data", f"{good_data}:1,{more}:0.01", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"BAD FILE: data mix: {more} gets 0 samples (ratio 0.01" in out


def test_main_on_a_2_6_model_shows_the_chatml_text_and_dumps_what_training_feeds(tmp_path, good_data, capsys):
    """MiniCPM-V 2.6 (tests/golden_tiny_v2_6): its config and tokenizer are read as 2.6's, --show renders the
    ChatML text with the default system turn and image ids, and --dump holds the dataset's items."""
    from transformers import AutoTokenizer

    from finetune.dataset import SupervisedDataset
    from finetune.model import MiniCPMVConfig

    checkpoint = os.path.join(ROOT, "tests", "golden_tiny_v2_6", "checkpoint")
    dump = tmp_path / "dump.pt"
    args = ["--model", checkpoint, "--data", str(good_data), "--workers", "1", "--llm_type", "qwen"]
    assert main([*args, "--show", "two", "--dump", str(dump)]) == 0
    out = capsys.readouterr().out
    assert "samples: 3  kept: 3  truncated: 0  skipped (too long): 0  bad: 0" in out
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image_id>0</image_id>" in out
    assert "<image_id>1</image_id><image><unk>×16</image><slice><unk>×16</slice>" in out
    assert f"<|im_start|>assistant\n{LABEL_OPEN}Same colours.<|im_end|>{LABEL_CLOSE}\n" in out
    dataset = SupervisedDataset(
        DataSettings(str(good_data)),
        AutoTokenizer.from_pretrained(checkpoint),
        MiniCPMVConfig.from_pretrained(checkpoint),
    )
    dumped = torch.load(dump, weights_only=False)
    for index in range(3):
        item = dataset[index]
        for key in ("input_ids", "labels", "image_bound", "tgt_sizes"):
            assert torch.equal(dumped[item["id"]][key], item[key]), key
    assert main([*args[:-1], "llama3"]) == 2
    assert "llm_type='llama3' but the tokenizer is a 'qwen' tokenizer" in capsys.readouterr().err
