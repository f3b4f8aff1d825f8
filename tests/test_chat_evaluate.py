"""finetune.chat and finetune.evaluate on CPU with the tiny model: prompts as in training, streaming, metrics."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT

import finetune  # noqa: F401
from finetune.chat import ChatError, build_prompt, chat, conversation, generation_config, load_image, load_model
from finetune.dataset import DataSettings, SupervisedDataset, open_source, parse_record
from finetune.evaluate import evaluate, exact_match, lcs_length, normalize, rouge_l, split_record, token_f1
from finetune.model.image_processing import normalize_pixels


# The prompt test must see every image syntax of the demo data: one image with / without marker, two images
# with <image_00> markers, text only; and multi-turn samples.
@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    out = demo_factory(16, 4)
    # Syntaxes the demo lacks: a single image without marker (training puts it before the first user text), and
    # a system turn with a marker in the middle of the text.
    samples = [s for s in json.loads((out / "train.json").read_text()) if isinstance(s.get("image"), str)]
    extra = []
    for k, sample in enumerate(samples[:3]):
        turns = [dict(t, content=t["content"].replace("<image>", "").strip()) for t in sample["conversations"]]
        extra.append(dict(sample, id=f"no_marker_{k}", conversations=turns))
    turns = [dict(t) for t in samples[0]["conversations"]]
    turns[0]["content"] = "Look at this <image> picture please."
    extra.append(
        dict(
            samples[0], id="system_mid_marker", conversations=[{"role": "system", "content": "Answer briefly."}] + turns
        )
    )
    (out / "extra.json").write_text(json.dumps(extra))
    return out


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(str(tiny_model), device="cpu", dtype="fp32")


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


# --- metrics on hand examples ---------------------------------------------------------------------------------------


def test_normalize_and_exact_match():
    assert normalize("  The  Red\n\tCircle ") == "the red circle"
    assert exact_match("A red circle.", "a  RED circle.") == 1.0
    assert exact_match("A red circle", "A red circle.") == 0.0
    assert exact_match("", "  ") == 1.0


def test_token_f1():
    assert token_f1("a red circle", "a red circle") == 1.0
    # pred {the, red, square}, ref {a, red, circle}: 1 common -> P = R = 1/3
    assert token_f1("the red square", "a red circle") == pytest.approx(1 / 3)
    # pred 2 words, ref 4 words, 2 common: P = 1, R = 1/2 -> F1 = 2/3
    assert token_f1("red circle", "a big red circle") == pytest.approx(2 / 3)
    # repeated words count once per occurrence: pred "red red", ref "red" -> common 1, P = 1/2, R = 1 -> 2/3
    assert token_f1("red red", "red") == pytest.approx(2 / 3)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "red") == 0.0 and token_f1("", "") == 1.0


def test_rouge_l():
    assert lcs_length("a b c d".split(), "a c d".split()) == 3
    assert lcs_length("a b".split(), "b a".split()) == 1
    assert rouge_l("the shape is a red circle", "the shape is a red circle") == 1.0
    # pred 4 words, ref 6 words, LCS "the cat on mat" = 4: P = 1, R = 2/3 -> F1 = 0.8
    assert rouge_l("the cat on mat", "the cat sat on the mat") == pytest.approx(0.8)
    # order matters, unlike token F1: same bag of words, LCS 1 of 2
    assert rouge_l("circle red", "red circle") == pytest.approx(0.5)
    assert token_f1("circle red", "red circle") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


# --- prompts: images exactly where training puts them --------------------------------------------------------------


def test_inference_prompt_is_the_training_prefix(loaded, demo):
    """For every eval-set and train-set sample: the evaluation prompt's token ids (placeholders expanded by the
    model's prepare_inputs) equal the training ids up to the last assistant content (but for the published
    processor's second <|begin_of_text|>), and the pixels are equal."""
    model, tokenizer = loaded
    tokens_header = tokenizer("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)[
        "input_ids"
    ]
    for data in ("train.json", "eval.json", "extra.json"):
        dataset = SupervisedDataset(DataSettings(str(demo / data), model_max_length=None), tokenizer, model.config)
        source = open_source(str(demo / data))
        kinds = {type(source[i].get("image")).__name__ for i in range(len(source))}
        if data == "train.json":
            assert kinds == {"str", "dict", "NoneType"}, kinds
        for index in range(len(source)):
            record = parse_record(source[index], source.location(index), str(demo))
            turns, reference = split_record(record)
            prompt, images = build_prompt(tokenizer, turns, [(m, load_image(p)) for m, p in record.images])
            inputs = model.prepare_inputs(prompt, images, tokenizer)
            item = dataset.prepare(index)
            ids = item.input_ids.tolist()
            # the last assistant turn starts after the last assistant header of the training ids
            starts = [i for i in range(len(ids)) if ids[i : i + len(tokens_header)] == tokens_header]
            prefix = ids[: starts[-1] + len(tokens_header)]
            # The published processor gives two <|begin_of_text|> (the template's and the tokenizer's post-processor's,
            # tests/golden_tiny/README.md); training has one. Everything after it is identical.
            assert inputs["input_ids"][0].tolist() == [prefix[0]] + prefix, (data, record.id, prompt)
            assert len(inputs["pixel_values"][0]) == len(item.pixel_values)
            for a, b in zip(
                inputs["pixel_values"][0], item.pixel_values, strict=True
            ):  # training keeps uint8 until the model
                torch.testing.assert_close(a, normalize_pixels(b), atol=1e-6, rtol=0)
            torch.testing.assert_close(inputs["image_bound"][0], item.image_bound + 1)  # shifted by that extra token
            assert reference == record.messages[-1][1]


def test_build_prompt_places_markers_and_leading_images(loaded):
    _, tokenizer = loaded
    from PIL import Image

    a, b = Image.new("RGB", (30, 30)), Image.new("RGB", (40, 40))
    turns = [
        ("system", "Be brief."),
        ("user", "First <image_01> then <image_00>?"),
        ("assistant", "ok"),
        ("user", "And?"),
    ]
    prompt, images = build_prompt(tokenizer, turns, [("<image_00>", a), ("<image_01>", b)])
    assert images == [b, a]  # order of appearance
    assert "First (<image>./</image>) then (<image>./</image>)?" in prompt and "Be brief." in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    prompt, images = build_prompt(tokenizer, [("user", "  What?  ")], [("<image>", a)])
    assert "user<|end_header_id|>\n\n(<image>./</image>)\nWhat?<|eot_id|>" in prompt and images == [a]


def test_history_file_and_markers(demo, tmp_path):
    image = next((demo / "images").iterdir())
    history = tmp_path / "conv.json"
    history.write_text(
        json.dumps([{"role": "user", "content": "Look: <image>"}, {"role": "assistant", "content": "A shape."}])
    )
    turns, images = conversation("What colour?", history, [str(image)])
    assert turns[-1] == ("user", "What colour?") and len(images) == 1
    with pytest.raises(ChatError, match="1 <image> marker"):
        conversation("What colour?", history, [str(image), str(image)])
    record = json.loads((demo / "train.json").read_text())[0]
    record = dict(record, image=str(demo / record["image"])) if isinstance(record.get("image"), str) else record
    (tmp_path / "record.json").write_text(json.dumps(record))
    turns, images = conversation("Again?", tmp_path / "record.json", [])
    assert turns[-1] == ("user", "Again?") and len(turns) == len(record["conversations"]) + 1
    with pytest.raises(ChatError, match="no such file"):
        conversation("x", tmp_path / "missing.json", [])
    with pytest.raises(ChatError, match="image file not found"):
        conversation("x", None, [str(tmp_path / "nope.png")])


# --- generation --------------------------------------------------------------------------------------------------


def test_streamed_text_equals_returned_text(loaded, demo):
    model, tokenizer = loaded
    image = str(next((demo / "images").iterdir()))
    stream = io.StringIO()
    answer = chat(
        model, tokenizer, "What shape is in the picture?", [image], greedy=True, max_new_tokens=12, stream=stream
    )
    assert answer and stream.getvalue().strip() == answer
    # sampling path streams too (seeded)
    torch.manual_seed(0)
    stream = io.StringIO()
    sampled = chat(model, tokenizer, "Hello", max_new_tokens=6, stream=stream)
    assert stream.getvalue().strip() == sampled
    # beam search (the published non-sampling default) prints the answer at the end
    stream = io.StringIO()
    beams = chat(
        model, tokenizer, "Hello", greedy=True, beams=3, repetition_penalty=1.2, max_new_tokens=6, stream=stream
    )
    assert stream.getvalue() == beams + "\n"


def test_sampled_chat_prints_no_repetition_penalty_warning(loaded):
    """The published sampling default (repetition_penalty 1.05) on embeddings: transformers' notice that the
    penalty sees only new tokens (as in the published chat()) is not printed with every answer."""
    import warnings

    model, tokenizer = loaded
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat(model, tokenizer, "Hello", max_new_tokens=4, stream=io.StringIO())
    assert generation_config(greedy=False)["repetition_penalty"] != 1.0
    assert not [w for w in caught if "repetition_penalty" in str(w.message)]


def test_generate_equals_the_published_chat(loaded, demo):
    """Same prompt, same decoding: the command's generate_text path and MiniCPMV.chat() give the same answer."""
    from PIL import Image

    model, tokenizer = loaded
    image = Image.open(next((demo / "images").iterdir())).convert("RGB")
    expected = model.chat(
        image,
        [{"role": "user", "content": "What shape?"}],
        tokenizer,
        max_new_tokens=10,
        sampling=False,
        num_beams=1,
        repetition_penalty=1.0,
    )
    prompt, images = build_prompt(tokenizer, [("user", "What shape?")], [("<image>", image)])
    assert model.generate_text(prompt, images, tokenizer, 10, **generation_config(greedy=True)) == expected


def test_published_chat_streams_pieces_that_join_to_its_answer(loaded, demo):
    """MiniCPM-Llama3-V 2.5's card: `chat(..., sampling=True, stream=True)` gives the answer as a generator of text
    pieces (made deterministic by a top_k=1 override, which the published chat() passes on)."""
    from PIL import Image

    model, tokenizer = loaded
    image = Image.open(next((demo / "images").iterdir())).convert("RGB")
    msgs = [{"role": "user", "content": "What shape?"}]
    call = {"sampling": True, "top_k": 1, "max_new_tokens": 10, "min_new_tokens": 10}
    answer = model.chat(image=image, msgs=msgs, tokenizer=tokenizer, **call)
    pieces = list(model.chat(image=image, msgs=msgs, tokenizer=tokenizer, stream=True, **call))
    assert answer and len(pieces) >= 1 and all(isinstance(piece, str) for piece in pieces)
    assert "".join(pieces) == answer
    with pytest.raises(ValueError, match="stream=True.*sampling=True"):
        model.chat(image=image, msgs=msgs, tokenizer=tokenizer, sampling=False, stream=True)
    # An error raised while generating (in the streaming thread) comes out of the generator, which then stops.
    with pytest.raises(ValueError, match="beam search|batch size 1"):  # (transformers: the streamer sees 2 beams)
        list(model.chat(image=image, msgs=msgs, tokenizer=tokenizer, stream=True, num_beams=2, max_new_tokens=2))


def test_streamed_pieces_join_to_the_stripped_text():
    from finetune.model.modeling import stripped_pieces

    raw = ["", " \n", " Hello", " wor", "ld", " ", "\n", "again ", " \n"]
    pieces = list(stripped_pieces(raw))
    assert "".join(pieces) == "".join(raw).strip() and all(pieces)
    assert pieces[0] == "Hello" and list(stripped_pieces([" ", "\n"])) == []


def test_adapter_is_applied(tiny_model, tiny_adapter):
    base, tokenizer = load_model(str(tiny_model), device="cpu", dtype="fp32")
    tuned, _ = load_model(str(tiny_model), str(tiny_adapter), device="cpu", dtype="fp32")
    assert type(tuned).__name__ == "MiniCPMV" and any("lora_A" in n for n, _ in tuned.named_parameters())
    prompt, _ = build_prompt(tokenizer, [("user", "Hello there")])
    data = base.prepare_inputs(prompt, [], tokenizer)
    with torch.no_grad():
        assert not torch.allclose(base(data=data).logits, tuned(data=data).logits)
    with pytest.raises(ChatError, match="no adapter_config.json"):
        load_model(str(tiny_model), str(tiny_model))


@pytest.mark.slow
def test_chat_cli_streams_an_answer(tiny_model, tiny_adapter, demo):
    image = str(next((demo / "images").iterdir()))
    command = [sys.executable, "-m", "finetune.chat", "--model", str(tiny_model), "--image", image, "--image", image,
               "--greedy", "--max_new_tokens", "8", "--device", "cpu", "What shape is in the picture?"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    bad = subprocess.run(
        command[:5] + ["--adapter", str(demo), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=subprocess_env(),
    )
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stderr and "Traceback" not in bad.stderr


# --- evaluation --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_writes_predictions_and_averages(loaded, demo, tmp_path):
    model, tokenizer = loaded
    out = tmp_path / "pred.jsonl"
    summary = evaluate(model, tokenizer, str(demo / "eval.json"), out, max_new_tokens=6)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    samples = json.loads((demo / "eval.json").read_text())
    assert len(rows) == len(samples) == summary["samples"]
    for row, sample in zip(rows, samples, strict=True):
        assert set(row) == {"id", "prompt", "prediction", "reference", "exact_match", "f1", "rouge_l"}
        assert row["id"] == sample["id"] and row["reference"] == sample["conversations"][-1]["content"]
        assert row["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert row["f1"] == token_f1(row["prediction"], row["reference"])
    for key in ("exact_match", "f1", "rouge_l"):
        assert summary[key] == pytest.approx(sum(r[key] for r in rows) / len(rows))


def test_evaluate_scores_a_perfect_model(loaded, demo, tmp_path, monkeypatch):
    """With generation replaced by the reference answer, every score is 1 (the plumbing, not the model)."""
    model, tokenizer = loaded
    references = {
        json.dumps(s["conversations"][:-1]): s["conversations"][-1]["content"]
        for s in json.loads((demo / "eval.json").read_text())
    }
    answers = iter(references.values())
    monkeypatch.setattr(model, "generate_text", lambda *a, **k: "  " + next(answers).upper() + " ")
    summary = evaluate(model, tokenizer, str(demo / "eval.json"), tmp_path / "p.jsonl", max_new_tokens=4)
    assert summary["exact_match"] == summary["f1"] == summary["rouge_l"] == 1.0


@pytest.mark.slow
def test_evaluate_cli(tiny_model, tiny_adapter, demo, tmp_path):
    out = tmp_path / "predictions.jsonl"
    command = [sys.executable, "-m", "finetune.evaluate", "--model", str(tiny_model), "--adapter", str(tiny_adapter), "--data",
               str(demo / "eval.json"), "--out", str(out), "--max_new_tokens", "4", "--limit", "2", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[evaluate] 2 samples: exact_match" in result.stdout and len(out.read_text().splitlines()) == 2
    missing = subprocess.run(
        command[:5] + ["--data", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=subprocess_env(),
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
