"""`make demo`'s pieces on a small, fast configuration: the colour-shape data, the demo's tiny model and the report
whose last line the demo ends with. (The learning target itself, F >= 0.80 and B <= 0.20, is checked by running
`make demo`: it needs a couple of minutes of training.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers import ROOT, base_args
from PIL import Image

import finetune  # noqa: F401
from finetune.demo_data import COLOURS, SHAPES, colour_shape_samples, write_samples
from finetune.demo_report import format_table, question_of
from finetune.synthetic import DEMO_CONFIG_OVERRIDES, build_tiny_checkpoint
from finetune.train import train

LAST_LINE = re.compile(r"held-out exact match: base (\d\.\d{3}) -> fine-tuned (\d\.\d{3})")


def test_colour_shape_data_needs_the_picture_and_holds_out_new_renders(tmp_path):
    train_samples, held_out = colour_shape_samples(num_train=72, num_eval=36, seed=0)
    pairs = {(c, s) for c in COLOURS for s in SHAPES}
    for samples in (train_samples, held_out):
        answers = [s.conversations[-1]["content"] for s in samples]
        assert {tuple(a.split()) for a in answers} == pairs, "every colour x shape pair, each once per 36 samples"
        assert all(s.conversations[0]["content"].startswith("<image>\n") and len(s.images) == 1 for s in samples)
        assert all(s.images[0].size == (112, 112) for s in samples)  # one view at the tiny model's scale
    assert not {s.images[0].seed for s in train_samples} & {s.images[0].seed for s in held_out}, (
        "held-out pictures are new renders"
    )
    paths = write_samples(tmp_path, train_samples[:4], held_out[:2])
    record = json.loads(paths["eval"].read_text())[0]
    image = Image.open(tmp_path / record["image"]).convert("RGB")
    colour = record["conversations"][-1]["content"].split()[0]
    assert image.getpixel((56, 56)) == COLOURS[colour], "the shape is drawn in the centre, in the answer's colour"


def test_demo_model_keeps_the_published_layout_with_a_wider_vision_tower(tmp_path):
    default = json.loads((build_tiny_checkpoint(tmp_path / "tiny") / "config.json").read_text())
    demo = json.loads(
        (build_tiny_checkpoint(tmp_path / "demo", config_overrides=DEMO_CONFIG_OVERRIDES) / "config.json").read_text()
    )
    assert demo["vision_config"]["hidden_size"] > default["vision_config"]["hidden_size"]
    assert set(demo) == set(default) and demo["architectures"] == default["architectures"]


@pytest.mark.slow
def test_report_compares_base_and_fine_tuned_and_ends_with_the_parsed_line(tmp_path):
    """The demo's report on a 2-step run: a table of held-out answers, then exactly the last line the demo prints."""
    model = build_tiny_checkpoint(tmp_path / "model", config_overrides=DEMO_CONFIG_OVERRIDES)
    data = tmp_path / "data"
    write_samples(data, *colour_shape_samples(num_train=8, num_eval=3, seed=1))
    adapter = tmp_path / "adapter"
    train(
        base_args(
            model,
            data / "train.json",
            adapter,
            "--max_steps",
            "2",
            "--tune_embeddings",
            "true",
            "--max_slice_nums",
            "1",
        )
    )
    command = [
        sys.executable,
        "-m",
        "finetune.demo_report",
        "--model",
        str(model),
        "--adapter",
        str(adapter),
        "--data",
        str(data / "eval.json"),
        "--show",
        "2",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    rows = {
        name: [json.loads(line) for line in (adapter / f"predictions_{name}.jsonl").read_text().splitlines()]
        for name in ("base", "finetuned")
    }
    for fraction, name in zip(match.groups(), ("base", "finetuned"), strict=True):
        assert float(fraction) == round(sum(r["exact_match"] for r in rows[name]) / 3, 3)
    assert lines[1].split() == ["sample", "question", "reference", "base", "model", "fine-tuned"]
    assert len(lines) == 1 + 1 + 2 + 1  # title, header, the two samples shown, the verdict
    assert rows["base"][0]["reference"] in lines[2] and rows["base"][0]["id"] in lines[2] and "shape" in lines[2]


def test_question_of_strips_the_template_and_the_image():
    prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image><unk><unk></image>\nWhat colour and shape is this?"
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")  # fmt: skip
    assert question_of(prompt) == "What colour and shape is this?"
    table = format_table([{"id": "a", "prompt": prompt, "reference": "red star", "prediction": "x", "exact_match": 0.0}],
                         [{"id": "a", "prompt": prompt, "reference": "red star", "prediction": "red star", "exact_match": 1.0}], 5)  # fmt: skip
    cells = [cell.strip() for cell in table[1].split("  ") if cell.strip()]
    assert cells == ["a", "What colour and shape is this?", "red star", "'x'", "'red star' +"]
