"""The native MiniCPM-V 2.6 against the published code's outputs (golden tiny-v2_6), its loading from the published
layout, its tokenizer, and the refusal of versions the suite does not implement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import case_data
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, Qwen2ForCausalLM

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.model import MiniCPMV, SpecialTokens, render_chat_prompt
from finetune.model.attention import use_varlen_attention
from finetune.model.checkpoint import CheckpointError, expected_shapes
from finetune.model.image_processing import SliceGrid
from finetune.model.versions import MINICPM_V_2_6, VERSIONS, UnsupportedVersionError, version_of

CASE_NAMES = ["single_sliced", "two_images", "text_only", "two_turn_train", "text_only_train"]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model_v2_6(request, golden_v2_6_dir):
    return AutoModel.from_pretrained(golden_v2_6_dir, dtype=torch.float32, attn_implementation=request.param)


@pytest.fixture(scope="module")
def tokenizer_v2_6(golden_v2_6_dir):
    return AutoTokenizer.from_pretrained(golden_v2_6_dir)


def case_named(cases: list[dict], name: str) -> dict:
    return next(case for case in cases if case["name"] == name)


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def right_padded_batch(cases: list[dict]) -> tuple[dict, torch.Tensor]:
    """The cases as one right-padded batch (pad id 0, position ids 0.. per row) and its attention mask."""
    length = max(len(case["input_ids"]) for case in cases)
    input_ids = torch.zeros(len(cases), length, dtype=torch.long)
    mask = torch.zeros(len(cases), length, dtype=torch.long)
    for row, case in enumerate(cases):
        input_ids[row, : len(case["input_ids"])] = case["input_ids"]
        mask[row, : len(case["input_ids"])] = 1
    data = {
        "input_ids": input_ids,
        "position_ids": torch.arange(length).expand(len(cases), -1),
        "pixel_values": [case["pixel_values"] for case in cases],
        "tgt_sizes": [case["tgt_sizes"] for case in cases],
        "image_bound": [case["image_bound"] for case in cases],
    }
    return data, mask


def packed_row(cases: list[dict]) -> dict:
    """The cases one after another in a single row, position ids restarting at 0 for each, no padding."""
    offsets = torch.tensor([0, *torch.tensor([len(c["input_ids"]) for c in cases]).cumsum(0)[:-1].tolist()])
    return {
        "input_ids": torch.cat([case["input_ids"] for case in cases])[None],
        "position_ids": torch.cat([torch.arange(len(case["input_ids"])) for case in cases])[None],
        "pixel_values": [case["pixel_values"] for case in cases],
        "tgt_sizes": [case["tgt_sizes"] for case in cases],
        "image_bound": [case["image_bound"] for case in cases],
        "row_of_sample": torch.zeros(len(cases), dtype=torch.long),
        "sample_offsets": offsets,
    }


# --- loading the published layout -------------------------------------------------------------------------


def test_auto_classes_build_the_native_2_6_from_the_published_layout(golden_v2_6_dir, tokenizer_v2_6):
    model = AutoModel.from_pretrained(golden_v2_6_dir)
    assert type(model) is MiniCPMV and version_of(model.config) is VERSIONS["2.6"]
    assert type(model.llm) is Qwen2ForCausalLM
    attention = model.llm.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.v_proj.bias is not None and attention.o_proj.bias is None
    assert model.resampler.num_queries == 16 and model.config.slice_settings.scale_resolution == 112
    assert not getattr(model.config, "scale_emb", None)
    assert type(tokenizer_v2_6).__name__ == "MiniCPMVTokenizerFast"


def test_real_2_6_config_builds_the_published_architecture(reference_v2_6):
    """The published config.json -> every tensor name and shape of the published checkpoint (on meta)."""
    config = AutoConfig.from_pretrained(reference_v2_6)
    assert version_of(config) is MINICPM_V_2_6 and config.query_num == 64 and config.num_key_value_heads == 4
    shapes = expected_shapes(config, MiniCPMV)
    published = {}
    for line in (reference_v2_6 / "param_shapes.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape, _count = line.split("\t")
            published[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    index = json.loads((reference_v2_6 / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(published)
    assert shapes == published
    parameters = sum(torch.Size(shape).numel() for shape in shapes.values())
    assert parameters * 2 == index["metadata"]["total_size"]  # bf16


def test_a_2_6_checkpoint_without_its_qkv_biases_is_refused(golden_v2_6_dir, tmp_path):
    target = copy_checkpoint(golden_v2_6_dir, tmp_path / "ckpt")
    tensors = load_file(target / "model.safetensors")
    del tensors["llm.model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"llm\.model\.layers\.1\.self_attn\.k_proj\.bias .* is missing"):
        AutoModel.from_pretrained(target)


def test_save_and_reload_keep_the_published_2_6_layout(golden_v2_6_dir, golden_v2_6_cases, tmp_path):
    model = AutoModel.from_pretrained(golden_v2_6_dir).eval()
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["version"] == 2.6 and saved["vision_config"]["model_type"] == "siglip"
    assert saved["rope_theta"] == 1000000.0 and saved["query_num"] == 16
    reloaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    case = case_named(golden_v2_6_cases, "two_images")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(data=case_data(case)).logits[0], case["logits"], atol=1e-4, rtol=0)


# --- versions the suite does not implement ------------------------------------------------------------------


@pytest.mark.parametrize("version", [4.0, 3.0, "4.5"])
def test_a_version_not_implemented_is_refused_in_one_line(reference_v2_6, golden_v2_6_dir, tmp_path, version):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    shutil.copy(reference_v2_6 / "config.json", config_dir / "config.json")
    rewrite_config(config_dir, version=version)
    name = repr(float(version))
    with pytest.raises(UnsupportedVersionError) as raised:
        AutoConfig.from_pretrained(config_dir)
    message = str(raised.value)
    assert f"version {name} is not supported" in message and "2.5, 2.6" in message and "\n" not in message

    checkpoint = copy_checkpoint(golden_v2_6_dir, tmp_path / "ckpt")
    rewrite_config(checkpoint, version=version)
    for load in (AutoModel.from_pretrained, MiniCPMV.from_pretrained):
        with pytest.raises(ValueError, match=rf"version {name} is not supported .*2\.5, 2\.6"):
            load(checkpoint)


def test_configs_name_their_version_and_a_config_without_one_is_2_5(reference_v2_6, golden_dir, tmp_path):
    assert version_of(AutoConfig.from_pretrained(reference_v2_6)) is VERSIONS["2.6"]
    assert version_of(AutoConfig.from_pretrained(golden_dir)) is VERSIONS["2.5"]
    unversioned = tmp_path / "unversioned"
    unversioned.mkdir()
    config = json.loads((golden_dir / "config.json").read_text())
    del config["version"]
    (unversioned / "config.json").write_text(json.dumps(config))
    assert version_of(AutoConfig.from_pretrained(unversioned)) is VERSIONS["2.5"]


# --- the forward pass against the published code ------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_logits_alone(model_v2_6, golden_v2_6_cases, name):
    case = case_named(golden_v2_6_cases, name)
    model_v2_6.train(case["train_mode"])
    with torch.no_grad():
        embeddings, _ = model_v2_6.get_vllm_embedding(case_data(case))
        logits = model_v2_6(data=case_data(case)).logits[0]
    torch.testing.assert_close(embeddings[0], case["inputs_embeds"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, case["logits"], atol=1e-4, rtol=0)


def test_text_only_training_runs_the_dummy_image_through_the_grid_tower(golden_v2_6_dir, golden_v2_6_cases):
    """The published 2.6 runs a 224 x 224 zero image through vpm + resampler in a text-only training step (the
    path every rank takes under torch.distributed): the golden loss, zero gradients for every vision parameter."""
    model = AutoModel.from_pretrained(golden_v2_6_dir).train()
    model.configure_runtime(dummy_image_stand_in=False)
    tower_calls = []
    model.vpm.embeddings.register_forward_hook(lambda *args: tower_calls.append(1))
    case = case_named(golden_v2_6_cases, "text_only_train")
    loss = model(data=case_data(case), labels=case["labels"][None]).loss
    loss.backward()
    assert len(tower_calls) == 1
    torch.testing.assert_close(loss.detach(), torch.as_tensor(case["loss"]), atol=1e-5, rtol=0)
    vision = [p.grad for p in model.vpm.parameters()] + [p.grad for p in model.resampler.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in vision)


@pytest.mark.parametrize("name", ["two_turn_train", "text_only_train"])
def test_golden_training_loss(golden_v2_6_dir, golden_v2_6_cases, name):
    model = AutoModel.from_pretrained(golden_v2_6_dir).train()
    case = case_named(golden_v2_6_cases, name)
    labels = case["labels"][None]
    with torch.no_grad():
        label_positions = model(data=case_data(case), labels=labels).loss
        full_logits = model(data=case_data(case), labels=labels, return_logits=True).loss
    torch.testing.assert_close(label_positions, torch.as_tensor(case["loss"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(full_logits, torch.as_tensor(case["loss"]), atol=1e-5, rtol=0)


def test_right_padded_batch_of_mixed_rows_equals_each_case(model_v2_6, golden_v2_6_cases):
    """Image rows and text rows together, right-padded, under an attention mask: each row as its golden case."""
    model_v2_6.eval()
    cases = [case_named(golden_v2_6_cases, name) for name in ("two_images", "text_only", "single_sliced")]
    data, mask = right_padded_batch(cases)
    with torch.no_grad():
        logits = model_v2_6(data=data, attention_mask=mask).logits
    for row, case in enumerate(cases):
        torch.testing.assert_close(logits[row, : len(case["input_ids"])], case["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_packed_row_equals_the_cases_alone(golden_v2_6_dir, golden_v2_6_cases, attention):
    """Padding-free packing (row_of_sample / sample_offsets), dense and per-sample (varlen) attention. Without
    a KV cache, as in training: transformers finds the packed samples from the position ids only then."""
    model = AutoModel.from_pretrained(golden_v2_6_dir, attn_implementation="sdpa").eval()
    if attention == "varlen":
        use_varlen_attention(model)
    cases = [case_named(golden_v2_6_cases, name) for name in ("single_sliced", "text_only", "two_images")]
    with torch.no_grad():
        logits = model(data=packed_row(cases), use_cache=False).logits[0]
    start = 0
    for case in cases:
        end = start + len(case["input_ids"])
        torch.testing.assert_close(logits[start:end], case["logits"], atol=1e-4, rtol=0)
        start = end


# --- preprocessing and chat ---------------------------------------------------------------------------------


def test_golden_preprocessing(golden_v2_6_dir, golden_v2_6_cases, golden_v2_6_images, tokenizer_v2_6):
    """Prompt -> ids (image ids, slice blocks, no BOS), bounds, tgt_sizes and pixels as the published processor."""
    model = AutoModel.from_pretrained(golden_v2_6_dir)
    for case in golden_v2_6_cases:
        images = [Image.open(golden_v2_6_images / f"{stem}.png") for stem in case["images"]]
        data = model.prepare_inputs(case["prompt"], images, tokenizer_v2_6)
        assert torch.equal(data["input_ids"][0], case["input_ids"]), case["name"]
        assert torch.equal(data["image_bound"][0], case["image_bound"]), case["name"]
        assert torch.equal(data["tgt_sizes"][0].long(), case["tgt_sizes"].long()), case["name"]
        assert len(data["pixel_values"][0]) == len(case["pixel_values"])
        for ours, theirs in zip(data["pixel_values"][0], case["pixel_values"], strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_placeholders_match_the_published_processor(tokenizer_v2_6):
    rows = json.loads((Path(__file__).parent / "golden_tiny_v2_6" / "slicing_112.json").read_text())
    for row in rows:
        grid = tuple(row["grid_cols_rows"]) if row["grid_cols_rows"] else None
        plan = SliceGrid((row["width"], row["height"]), grid, (1, 1) if grid else None)
        text = MINICPM_V_2_6.image_placeholder(plan, 16, "<unk>", 0)
        assert text.replace("<unk>" * 16, "<unk>*16") == row["placeholder"], row
        assert len(tokenizer_v2_6(text)["input_ids"]) == row["placeholder_num_tokens"], row


def test_chat_renders_chatml_with_the_default_system_turn_and_generates_greedily(
    golden_v2_6_dir, golden_v2_6_cases, golden_v2_6_images, tokenizer_v2_6
):
    model = AutoModel.from_pretrained(golden_v2_6_dir).eval()
    case = case_named(golden_v2_6_cases, "single_sliced")
    image = Image.open(golden_v2_6_images / "wide_260x150.png")
    msgs = [{"role": "user", "content": "What is shown in this picture?"}]
    prompt, images = render_chat_prompt(image, msgs, tokenizer_v2_6)
    prompt_data = model.prepare_inputs(prompt, images, tokenizer_v2_6)
    assert torch.equal(prompt_data["input_ids"][0], case["input_ids"])  # the golden prompt came from chat()

    greedy = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 8}
    answer = model.chat(image, msgs, tokenizer_v2_6, **greedy)
    tokens = SpecialTokens.from_tokenizer(tokenizer_v2_6)
    vocab = tokenizer_v2_6.get_vocab()
    assert set(tokens.stop_ids) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    ids, generated = prompt_data["input_ids"], []
    with torch.no_grad():
        for _ in range(8):
            data = dict(prompt_data, input_ids=ids, position_ids=torch.arange(ids.shape[1])[None])
            next_id = int(model(data=data).logits[0, -1].argmax())
            if next_id in tokens.stop_ids:
                break
            generated.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    assert answer == tokenizer_v2_6.decode(generated, skip_special_tokens=True).strip()


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_from_vocab_and_merges_equals_tokenizer_json(golden_v2_6_dir, tokenizer_v2_6, tmp_path):
    """The published 2.6 repo ships vocab.json + merges.txt and no tokenizer.json: the same ids either way."""
    target = tmp_path / "vocab_merges"
    target.mkdir()
    for file in golden_v2_6_dir.iterdir():
        if file.name not in ("tokenizer.json", "model.safetensors"):
            shutil.copy(file, target / file.name)
    model = json.loads((golden_v2_6_dir / "tokenizer.json").read_text())["model"]
    (target / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = "\n".join(" ".join(pair) for pair in model["merges"])
    (target / "merges.txt").write_text("#version: 0.2\n" + merges + "\n")

    rebuilt = AutoTokenizer.from_pretrained(target)
    assert type(rebuilt).__name__ == "MiniCPMVTokenizerFast" and not (target / "tokenizer.json").exists()
    assert rebuilt.get_vocab() == tokenizer_v2_6.get_vocab()
    text = (
        "Two  spaces,\ttab\n\nnaïve café 日本語 <|im_start|>user\n<image_id>3</image_id><image><unk></image><|im_end|>"
    )
    assert rebuilt(text)["input_ids"] == tokenizer_v2_6(text)["input_ids"]
    assert rebuilt.decode(rebuilt(text)["input_ids"]) == text
    assert SpecialTokens.from_tokenizer(rebuilt) == SpecialTokens.from_tokenizer(tokenizer_v2_6)


def test_special_tokens_of_the_2_6_tokenizer(tokenizer_v2_6):
    text = "Tabs\tand  spaces\n\n ünïcödé ✓"
    assert tokenizer_v2_6.decode(tokenizer_v2_6(text)["input_ids"]) == text
    tokens = SpecialTokens.from_tokenizer(tokenizer_v2_6)
    vocab = tokenizer_v2_6.get_vocab()
    assert tokens.unk == vocab["<unk>"] == 288  # inside the BPE range, as 128244 is in the real vocabulary
    assert (tokens.bos, tokens.eos, tokens.pad) == (vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["<|endoftext|>"])
    assert (tokens.image_id_start, tokens.image_id_end) == (vocab["<image_id>"], vocab["</image_id>"])
    assert tokens.feature_block_ids(MINICPM_V_2_6) == (
        [vocab["<image>"], vocab["<slice>"]],
        [vocab["</image>"], vocab["</slice>"]],
    )
    assert tokenizer_v2_6("hello")["input_ids"][0] != tokens.bos  # no BOS


# --- chat(): the calls of the published model card and README --------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_v2_6(golden_v2_6_dir):
    return AutoModel.from_pretrained(golden_v2_6_dir, dtype=torch.float32).eval()


class PromptRecorder:
    """Wraps a model's `prepare_inputs` (what chat() tokenizes its prompt with) and keeps each prompt's ids."""

    def __init__(self, model: MiniCPMV, monkeypatch: pytest.MonkeyPatch):
        self.ids: list[list[int]] = []
        original = model.prepare_inputs

        def recording(*args, **kwargs):
            data = original(*args, **kwargs)
            self.ids.append(data["input_ids"][0].tolist())
            return data

        monkeypatch.setattr(model, "prepare_inputs", recording)


def token_count(tokenizer, ids: list[int], token: str) -> int:
    return ids.count(tokenizer.convert_tokens_to_ids(token))


# The published card's sampling call, made deterministic by one override the published chat() passes on (top_k).
STREAMABLE = {"sampling": True, "top_k": 1, "max_new_tokens": 8, "min_new_tokens": 8}
GREEDY_V2_6 = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 6}


def test_chat_stream_yields_pieces_that_join_to_the_answer(chat_model_v2_6, tokenizer_v2_6, golden_v2_6_images):
    image = Image.open(golden_v2_6_images / "wide_260x150.png").convert("RGB")
    msgs = [{"role": "user", "content": "What is in the image?"}]
    answer = chat_model_v2_6.chat(image=image, msgs=msgs, tokenizer=tokenizer_v2_6, **STREAMABLE)
    streamed = chat_model_v2_6.chat(image=image, msgs=msgs, tokenizer=tokenizer_v2_6, stream=True, **STREAMABLE)
    assert not isinstance(streamed, str)
    pieces = list(streamed)
    assert answer and all(isinstance(piece, str) and piece for piece in pieces)
    assert "".join(pieces) == answer


def test_chat_stream_with_beam_search_is_refused_before_generating(chat_model_v2_6, tokenizer_v2_6, monkeypatch):
    """The published chat() asserts sampling=True when streaming: beam search cannot stream."""
    recorder = PromptRecorder(chat_model_v2_6, monkeypatch)
    with pytest.raises(ValueError, match="stream=True.*sampling=True"):
        chat_model_v2_6.chat(image=None, msgs=[{"role": "user", "content": "Hi"}], tokenizer=tokenizer_v2_6,
                             sampling=False, stream=True)  # fmt: skip
    assert recorder.ids == []


def test_chat_takes_video_frames_with_per_call_image_ids_and_slices(
    chat_model_v2_6, tokenizer_v2_6, golden_v2_6_images, monkeypatch
):
    """The published video example: frames as PIL images in the content, use_image_id=False, max_slice_nums=2."""
    frames = [Image.open(golden_v2_6_images / name).convert("RGB") for name in ("wide_260x150.png", "tall_120x330.png")]
    frames.append(Image.new("RGB", (448, 448), (30, 160, 90)))
    msgs = [{"role": "user", "content": frames + ["Describe the video"]}]
    recorder = PromptRecorder(chat_model_v2_6, monkeypatch)
    calls = [{}, {"use_image_id": False, "max_slice_nums": 2}, {"max_slice_nums": 1}]
    for overrides in calls:
        answer = chat_model_v2_6.chat(image=None, msgs=msgs, tokenizer=tokenizer_v2_6, **GREEDY_V2_6, **overrides)
        assert isinstance(answer, str)
    default, video, unsliced = recorder.ids
    for ids in recorder.ids:
        assert token_count(tokenizer_v2_6, ids, "<image>") == len(frames)
    assert token_count(tokenizer_v2_6, default, "<image_id>") == len(frames)
    assert token_count(tokenizer_v2_6, video, "<image_id>") == 0
    assert token_count(tokenizer_v2_6, unsliced, "<image_id>") == len(frames)
    # The 448 x 448 frame is cut 3 x 3 by the checkpoint's settings (max_slice_nums 9); 2 slices at most per call.
    assert token_count(tokenizer_v2_6, default, "<slice>") >= 9
    assert 0 < token_count(tokenizer_v2_6, video, "<slice>") <= 2 * len(frames)
    assert token_count(tokenizer_v2_6, unsliced, "<slice>") == 0


def test_chat_takes_several_images_in_the_content_a_system_prompt_and_min_new_tokens(
    chat_model_v2_6, tokenizer_v2_6, golden_v2_6_images, monkeypatch
):
    first = Image.open(golden_v2_6_images / "small_90x70.png").convert("RGB")
    second = Image.open(golden_v2_6_images / "tall_120x330.png").convert("RGB")
    msgs = [{"role": "user", "content": [first, second, "Compare the two images."]}]
    recorder = PromptRecorder(chat_model_v2_6, monkeypatch)
    calls = []
    generate = chat_model_v2_6.llm.generate

    def recording_generate(**kwargs):
        calls.append((kwargs, generate(**kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(chat_model_v2_6.llm, "generate", recording_generate)
    chat_model_v2_6.chat(image=None, msgs=msgs, tokenizer=tokenizer_v2_6, system_prompt="Answer in one word.",
                         min_new_tokens=5, **dict(GREEDY_V2_6, max_new_tokens=5))  # fmt: skip
    text = tokenizer_v2_6.decode(recorder.ids[0])
    assert text.startswith(
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n<image_id>0</image_id>"
    )
    assert "You are a helpful assistant." not in text
    assert text.index("<image_id>0</image_id>") < text.index("<image_id>1</image_id>") < text.index("Compare")
    assert token_count(tokenizer_v2_6, recorder.ids[0], "<image>") == 2
    ((kwargs, output),) = calls
    assert kwargs["min_new_tokens"] == 5 and output.shape[1] == 5  # no stop before min_new_tokens


def test_chat_answers_a_batch_of_conversations_as_each_alone(chat_model_v2_6, tokenizer_v2_6, golden_v2_6_images):
    image = Image.open(golden_v2_6_images / "wide_260x150.png").convert("RGB")
    batch = [
        [{"role": "user", "content": [image, "What is in the image?"]}],
        [{"role": "user", "content": "Tell me a story."}],
    ]
    greedy = dict(GREEDY_V2_6, min_new_tokens=3)
    answers = chat_model_v2_6.chat(image=None, msgs=batch, tokenizer=tokenizer_v2_6, **greedy)
    alone = [chat_model_v2_6.chat(image=None, msgs=msgs, tokenizer=tokenizer_v2_6, **greedy) for msgs in batch]
    assert isinstance(answers, list) and answers == alone and all(alone)
    with pytest.raises(ValueError, match="image must be None"):
        chat_model_v2_6.chat(image=image, msgs=batch, tokenizer=tokenizer_v2_6, **greedy)


def test_use_image_id_is_refused_where_the_version_has_no_image_ids(golden_dir, golden_images):
    model = AutoModel.from_pretrained(golden_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(golden_dir)
    with pytest.raises(ValueError, match="use_image_id.*2.5"):
        model.chat(image=Image.new("RGB", (50, 50)), msgs=[{"role": "user", "content": "Hi"}], tokenizer=tokenizer,
                   use_image_id=True, sampling=False, max_new_tokens=2)  # fmt: skip
