"""The native model against the published code's outputs (golden tiny), and its loading/saving contract."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import case_data
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.model import MiniCPMV, SpecialTokens
from finetune.model.checkpoint import CheckpointError
from finetune.model.runtime import RuntimeOptions
from finetune.model.versions import VERSIONS, version_of


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def golden_model(request, golden_dir):
    return AutoModel.from_pretrained(golden_dir, dtype=torch.float32, attn_implementation=request.param)


def test_auto_classes_give_native_model_and_tokenizer(golden_dir):
    model = AutoModel.from_pretrained(golden_dir)
    tokenizer = AutoTokenizer.from_pretrained(golden_dir)
    assert type(model) is MiniCPMV
    assert type(tokenizer).__name__ == "MiniCPMVTokenizerFast"
    assert model.config.query_num == 16 and model.config.slice_settings.scale_resolution == 112
    text = "Hello  world\n\n  spaced\tout"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("index", range(4))
def test_golden_logits(golden_model, golden_cases, index):
    case = golden_cases[index]
    golden_model.train(case["train_mode"])
    with torch.no_grad():
        embeddings, _ = golden_model.get_vllm_embedding(case_data(case))
        logits = golden_model(data=case_data(case)).logits[0]
    torch.testing.assert_close(embeddings[0], case["inputs_embeds"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, case["logits"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_golden_preprocessing(golden_dir, golden_cases, golden_images):
    """Prompt -> ids, bounds, tgt_sizes and pixels exactly as the published processor made them."""
    model = AutoModel.from_pretrained(golden_dir)
    tokenizer = AutoTokenizer.from_pretrained(golden_dir)
    for case in golden_cases:
        images = [Image.open(golden_images / f"{stem}.png") for stem in case["images"]]
        data = model.prepare_inputs(case["prompt"], images, tokenizer)
        assert torch.equal(data["input_ids"][0], case["input_ids"]), case["name"]
        assert torch.equal(data["image_bound"][0], case["image_bound"]), case["name"]
        assert torch.equal(data["tgt_sizes"][0].long(), case["tgt_sizes"].long()), case["name"]
        assert len(data["pixel_values"][0]) == len(case.get("pixel_values", []))
        for ours, theirs in zip(data["pixel_values"][0], case.get("pixel_values", []), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_uint8_pixels_give_the_same_logits_as_normalised_ones(golden_dir, golden_cases, golden_images):
    """The training path feeds uint8 strips (normalised on the model's device); the published one floats."""
    from finetune.model.image_processing import image_views

    model = AutoModel.from_pretrained(golden_dir).eval()
    case = golden_cases[2]
    raw = []
    for stem in case["images"]:
        raw += image_views(Image.open(golden_images / f"{stem}.png"), model.config.slice_settings, normalize=False)[0]
    assert {p.dtype for p in raw} == {torch.uint8}
    data = case_data(case)
    with torch.no_grad():
        from_floats = model(data=data).logits
        from_uint8 = model(data=dict(data, pixel_values=[raw])).logits
    assert torch.equal(from_floats, from_uint8)


def test_chat_prompt_matches_published_rendering(golden_dir, golden_cases, golden_images):
    from finetune.model import render_chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(golden_dir)
    case = golden_cases[0]
    image = Image.open(golden_images / "wide_260x150.png")
    prompt, images = render_chat_prompt(image, [{"role": "user", "content": "What is in the picture?"}], tokenizer)
    assert prompt == case["prompt"] and images == [image]


def test_sample_alone_equals_sample_batched_with_longer_slices(golden_dir, golden_cases):
    """Batching must not change a sample's features (the published code pads strips to the call's max)."""
    model = AutoModel.from_pretrained(golden_dir, attn_implementation="eager").eval()
    small, two = golden_cases[1], golden_cases[2]  # 'two_images' has a 910-px strip, longer than small's 882
    assert max(p.shape[-1] for p in two["pixel_values"]) > max(p.shape[-1] for p in small["pixel_values"])
    length = max(len(small["input_ids"]), len(two["input_ids"]))

    def padded(ids):
        return torch.cat([ids, torch.zeros(length - len(ids), dtype=ids.dtype)])

    data = {
        "input_ids": torch.stack([padded(small["input_ids"]), padded(two["input_ids"])]),
        "position_ids": torch.arange(length).expand(2, -1),
        "pixel_values": [small["pixel_values"], two["pixel_values"]],
        "tgt_sizes": [small["tgt_sizes"], two["tgt_sizes"]],
        "image_bound": [small["image_bound"], two["image_bound"]],
    }
    mask = torch.zeros(2, length, dtype=torch.long)
    mask[0, : len(small["input_ids"])] = 1
    mask[1, : len(two["input_ids"])] = 1
    with torch.no_grad():
        batched = model(data=data, attention_mask=mask).logits
        alone = model(data=case_data(small)).logits[0]
    torch.testing.assert_close(batched[0, : len(small["input_ids"])], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[0, : len(small["input_ids"])], small["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched[1, : len(two["input_ids"])], two["logits"], atol=1e-4, rtol=0)


def test_packed_row_equals_samples_alone(golden_dir, golden_cases):
    """Padding-free packing: two samples in one row, position ids restarting, no attention mask."""
    model = AutoModel.from_pretrained(golden_dir, attn_implementation="sdpa").eval()
    first, second = golden_cases[0], golden_cases[2]
    ids = torch.cat([first["input_ids"], second["input_ids"]])[None]
    data = {
        "input_ids": ids,
        "position_ids": torch.cat([torch.arange(len(first["input_ids"])), torch.arange(len(second["input_ids"]))])[
            None
        ],
        "pixel_values": [first["pixel_values"], second["pixel_values"]],
        "tgt_sizes": [first["tgt_sizes"], second["tgt_sizes"]],
        "image_bound": [first["image_bound"], second["image_bound"]],
        "row_of_sample": torch.tensor([0, 0]),
        "sample_offsets": torch.tensor([0, len(first["input_ids"])]),
    }
    with torch.no_grad():
        logits = model(data=data).logits[0]
    split = len(first["input_ids"])
    torch.testing.assert_close(logits[:split], first["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[split:], second["logits"], atol=1e-4, rtol=0)


def test_text_only_training_keeps_vision_in_graph(golden_dir, golden_cases):
    model = AutoModel.from_pretrained(golden_dir).train()
    case = golden_cases[3]
    labels = case["input_ids"][None].clone()
    model(data=case_data(case), labels=labels).loss.backward()
    grads = [p.grad for p in model.vpm.parameters()] + [p.grad for p in model.resampler.parameters()]
    assert all(g is not None for g in grads), "the dummy image must put every vision parameter in the graph"
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_text_only_training_without_the_dummy_image_gives_the_same_loss_and_gradients(golden_dir, golden_cases):
    """In one process the dummy image's only effect is zero gradients for the vision parameters: the stand-in
    gives the same loss and the same gradient for every parameter, and never runs the vision tower."""
    case = golden_cases[3]
    runs = {}
    for stand_in in (False, True):
        model = AutoModel.from_pretrained(golden_dir).train()
        model.configure_runtime(dummy_image_stand_in=stand_in)
        tower_calls = []
        model.vpm.register_forward_hook(lambda *args, calls=tower_calls: calls.append(1))
        loss = model(data=case_data(case), labels=case["input_ids"][None].clone()).loss
        loss.backward()
        runs[stand_in] = (loss.detach(), {name: p.grad for name, p in model.named_parameters()}, len(tower_calls))
    (loss_dummy, grads_dummy, calls_dummy), (loss_stand_in, grads_stand_in, calls_stand_in) = runs[False], runs[True]
    assert (calls_dummy, calls_stand_in) == (1, 0)
    assert torch.equal(loss_dummy, loss_stand_in)
    assert grads_dummy.keys() == grads_stand_in.keys() and all(g is not None for g in grads_stand_in.values())
    for name, grad in grads_dummy.items():
        assert torch.equal(grad, grads_stand_in[name]), name
    vision = [g for name, g in grads_stand_in.items() if name.startswith(("vpm.", "resampler."))]
    assert vision and all(torch.count_nonzero(g) == 0 for g in vision)


def test_train_and_eval_reach_every_module_and_skip_the_walk_when_nothing_would_change(golden_dir, monkeypatch):
    """MiniCPMV.train skips nn.Module.train when every module already is in the asked mode (the Trainer calls it
    every step), and otherwise sets every module, as nn.Module.train does. A module with its own `train` is
    always called (PEFT's DoRA layers clear a cache there)."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    model = get_peft_model(
        AutoModel.from_pretrained(golden_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    flags_set = []
    library_setattr = nn.Module.__setattr__

    def counted(module, name, value):
        if name == "training":
            flags_set.append(type(module).__name__)
        library_setattr(module, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", counted)
    modules = list(model.modules())
    model.eval()
    assert not any(m.training for m in modules) and len(flags_set) == len(modules)
    model.train()
    assert all(m.training for m in modules)
    flags_set.clear()
    model.train()  # already training everywhere: only the two wrappers above MiniCPMV set their flag
    assert all(m.training for m in modules) and flags_set == ["PeftModel", "LoraModel"]
    native = model.get_base_model()
    dropout = native.llm.model.layers[0].self_attn.q_proj.lora_dropout["default"]
    dropout.eval()  # one module out of step: the next train() walks and sets it again
    model.train()
    assert dropout.training and all(m.training for m in modules)

    class OwnTrain(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def train(self, mode=True):
            self.calls += 1
            return super().train(mode)

    native.resampler.extra = OwnTrain()
    model.train()
    assert native.resampler.extra.calls == 1


def _checkpointed_step(
    golden_dir,
    case,
    vision_trained: bool,
    use_reentrant: bool,
    library_hooks: bool = False,
    embeddings_trained: bool = True,
):
    """One checkpointed training step on an image case: (whether backward reached the vision tower's
    embeddings, the loss, the gradients)."""
    from transformers import PreTrainedModel

    model = AutoModel.from_pretrained(golden_dir).train()
    model.vpm.requires_grad_(vision_trained)
    model.vpm.embeddings.requires_grad_(vision_trained and embeddings_trained)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if library_hooks:  # transformers' own: every sub-model's input embeddings, the vision tower's included
        model.disable_input_require_grads()
        PreTrainedModel.enable_input_require_grads(model)
    reached = []

    def watch(module, inputs, output):
        if output.requires_grad:
            output.register_hook(lambda grad: reached.append(True))

    model.vpm.embeddings.register_forward_hook(watch)
    loss = model(data=case_data(case), labels=case["input_ids"][None].clone()).loss
    loss.backward()
    return bool(reached), loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_backward_does_not_run_through_a_frozen_vision_tower_under_checkpointing(golden_dir, golden_cases):
    """transformers' checkpointing marks every sub-model's embeddings as requiring grad, the vision tower's too:
    with the tower frozen, backward then ran through all its layers (recomputing them where they are
    checkpointed) for gradients nothing used. The loss and the trained gradients stay the same without."""
    case = next(c for c in golden_cases if len(c["pixel_values"]))
    reached, loss, grads = _checkpointed_step(golden_dir, case, vision_trained=False, use_reentrant=False)
    library_reached, library_loss, library_grads = _checkpointed_step(
        golden_dir, case, False, False, library_hooks=True
    )
    assert (reached, library_reached) == (False, True)
    assert torch.equal(loss, library_loss) and grads.keys() == library_grads.keys()
    assert any(name.startswith("resampler.") for name in grads) and not any(name.startswith("vpm.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, library_grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_a_trained_vision_tower_gets_gradients_under_reentrant_checkpointing(golden_dir, golden_cases):
    """Reentrant checkpointing gives a block's parameters gradients only if its input requires grad: the hook
    must still mark the vision tower's embeddings when the tower is trained, here all of it but the embeddings
    (whose own trained weights would otherwise make their output require grad anyway)."""
    case = next(c for c in golden_cases if len(c["pixel_values"]))
    reached, _, grads = _checkpointed_step(
        golden_dir, case, vision_trained=True, use_reentrant=True, embeddings_trained=False
    )
    layers = {name: g for name, g in grads.items() if name.startswith("vpm.encoder.layers.")}
    assert reached and layers and all(g is not None and torch.count_nonzero(g) > 0 for g in layers.values())


@pytest.mark.slow
def test_a_trained_fp32_vision_tower_under_autocast_carries_its_residual_in_bf16(golden_dir, golden_cases):
    """fp32 master weights under bf16 autocast: the position embeddings (fp32) would make the vision residual
    fp32 in every layer, twice the checkpointed bytes of the bf16 model. It starts in bf16 instead; the loss and
    the vision gradients stay within bf16 tolerance of the fp32 stream's."""
    case = next(c for c in golden_cases if len(c["pixel_values"]))
    runs = {}
    for bf16_residual in (False, True):
        model = AutoModel.from_pretrained(golden_dir).train()
        model.configure_runtime(vision_residual_in_autocast_dtype=bf16_residual)
        layer_inputs = []
        model.vpm.encoder.layers[1].register_forward_pre_hook(
            lambda module, args, kwargs, seen=layer_inputs: seen.append(args[0].dtype), with_kwargs=True
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(data=case_data(case), labels=case["input_ids"][None].clone()).loss
        loss.backward()
        runs[bf16_residual] = (
            layer_inputs,
            loss.detach(),
            {n: p.grad for n, p in model.named_parameters() if n.startswith("vpm.encoder.layers.0.")},
        )
    assert runs[False][0] == [torch.float32] and runs[True][0] == [torch.bfloat16]
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=2e-2, atol=0)
    for name, grad in runs[False][2].items():
        assert torch.linalg.vector_norm(runs[True][2][name] - grad) <= 0.05 * torch.linalg.vector_norm(grad) + 1e-6, (
            name
        )


def test_runtime_options_are_validated_and_reach_the_trained_copy_of_the_vision_tower(golden_dir):
    """configure_runtime changes the named options only and refuses unknown names and invalid values (changing
    nothing then); the vision residual switch reaches PEFT's trained copy of the vision tower, whose hook reads it
    from its own embeddings module."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

    model = AutoModel.from_pretrained(golden_dir)
    assert model.runtime_options == RuntimeOptions()
    assert model.configure_runtime(loss_chunk_size=4) == model.runtime_options == RuntimeOptions(loss_chunk_size=4)
    with pytest.raises(TypeError):
        model.configure_runtime(loss_chunk=4)
    for invalid in (
        {"loss_chunk_size": 0},
        {"loss_chunk_size": 2.5},
        {"loss_kernel": "fused"},
        {"dummy_image_stand_in": "no"},
    ):
        with pytest.raises(ValueError):
            model.configure_runtime(**invalid)
    assert model.runtime_options == RuntimeOptions(loss_chunk_size=4)

    get_peft_model(model, LoraConfig(target_modules=r"llm\..*\.q_proj", modules_to_save=["vpm"]))
    model.configure_runtime(vision_residual_in_autocast_dtype=False)
    embeddings = [module for module in model.modules() if isinstance(module, Idefics2VisionEmbeddings)]
    assert len(embeddings) == 2 and not any(module.residual_in_autocast_dtype for module in embeddings)


def test_the_model_is_built_from_what_its_version_states(golden_dir):
    """The shared model class takes the LLM and the placeholder text from the config's version (versions/)."""
    model = AutoModel.from_pretrained(golden_dir)
    version = version_of(model.config)
    assert version is VERSIONS["2.5"] and version.hub_id == "openbmb/MiniCPM-Llama3-V-2_5"
    assert type(model.llm) is version.llm_class and isinstance(model.config, version.llm_config_class)
    assert version_of(SimpleNamespace()) is version  # a hub config class names no version: 2.5, the one implemented


def test_dtype_cast_on_load(golden_dir):
    model = AutoModel.from_pretrained(golden_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_save_load_round_trip_is_bit_exact_and_published_layout(golden_dir, tmp_path):
    model = AutoModel.from_pretrained(golden_dir)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "minicpmv" and config["rope_theta"] == 500000.0
    assert config["rope_scaling"] is None and "rope_parameters" not in config
    assert config["auto_map"]["AutoModel"] == "modeling_minicpmv.MiniCPMV"
    assert config["vision_config"]["hidden_size"] == 32 and config["slice_config"]["scale_resolution"] == 112
    saved = load_file(tmp_path / "model.safetensors")
    original = load_file(golden_dir / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    reloaded = AutoModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    for path in dst.iterdir():
        path.chmod(0o644)
    return dst


def test_missing_tensor_is_refused(golden_dir, tmp_path):
    target = copy_checkpoint(golden_dir, tmp_path / "ckpt")
    tensors = load_file(target / "model.safetensors")
    del tensors["resampler.proj"]
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"resampler\.proj .* is missing"):
        AutoModel.from_pretrained(target)


def test_wrong_shape_is_refused(golden_dir, tmp_path):
    target = copy_checkpoint(golden_dir, tmp_path / "ckpt")
    tensors = load_file(target / "model.safetensors")
    tensors["resampler.query"] = torch.zeros(8, 256)
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"resampler\.query in model\.safetensors has shape \[8, 256\], expected \[16, 256\]"
    ):
        AutoModel.from_pretrained(target)


def test_missing_weights_file_is_refused(golden_dir, tmp_path):
    target = copy_checkpoint(golden_dir, tmp_path / "ckpt")
    (target / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        MiniCPMV.from_pretrained(target)


def test_other_model_type_is_refused(golden_dir, tmp_path):
    target = copy_checkpoint(golden_dir, tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "llava"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type is 'llava'"):
        MiniCPMV.from_pretrained(target)


@pytest.mark.slow
def test_chat_greedy_generation(golden_dir, golden_images):
    model = AutoModel.from_pretrained(golden_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(golden_dir)
    image = Image.open(golden_images / "small_90x70.png")
    msgs = [{"role": "user", "content": "Describe it."}]
    greedy = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 8}
    first = model.chat(image, msgs, tokenizer, **greedy)
    second = model.chat(image, msgs, tokenizer, **greedy)
    assert isinstance(first, str) and first == second
    # The same greedy continuation computed by hand from the forward pass.
    prompt_data = model.prepare_inputs(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n(<image>./</image>)\nDescribe it.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        [image],
        tokenizer,
    )
    ids = prompt_data["input_ids"]
    stop = SpecialTokens.from_tokenizer(tokenizer).stop_ids
    generated = []
    with torch.no_grad():
        for _ in range(8):
            data = dict(prompt_data, input_ids=ids, position_ids=torch.arange(ids.shape[1])[None])
            next_id = int(model(data=data).logits[0, -1].argmax())
            if next_id in stop:
                break
            generated.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    assert first == tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_label_position_loss_equals_full_logits_loss(golden_dir, golden_cases):
    """The fast loss (label positions only, chunked, recomputed) equals LlamaForCausalLM's, value and grads."""
    case = golden_cases[2]
    labels = case["input_ids"][None].clone()
    labels[:, :120] = -100  # only the tail is trained, as with a real answer
    results = []
    for return_logits in (True, False):
        model = AutoModel.from_pretrained(golden_dir).train()
        loss = model(
            data=case_data(case), labels=labels, num_items_in_batch=torch.tensor(37), return_logits=return_logits
        ).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (plain_loss, plain_grads), (fast_loss, fast_grads) = results
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert plain_grads.keys() == fast_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_loading_report_problems_are_refused_for_any_source(golden_dir, tmp_path, monkeypatch):
    """Hub ids skip the directory check; transformers' own loading report must then refuse missing tensors."""
    import finetune.model.modeling as modeling

    target = copy_checkpoint(golden_dir, tmp_path / "ckpt")
    tensors = load_file(target / "model.safetensors")
    del tensors["vpm.post_layernorm.weight"]
    save_file(tensors, target / "model.safetensors")
    monkeypatch.setattr(modeling, "validate_checkpoint_dir", lambda *args, **kwargs: None)  # as for a hub id
    with pytest.raises(CheckpointError, match=r"missing keys: \['vpm\.post_layernorm\.weight'\]"):
        AutoModel.from_pretrained(target)


def test_views_as_images_or_strips_give_the_same_logits(golden_dir, golden_cases, golden_images):
    """The data interface takes the published [3, 14, L*14] strips or plain [3, H, W] views."""
    from finetune.model.image_processing import normalize_view, slice_image

    model = AutoModel.from_pretrained(golden_dir).eval()
    case = golden_cases[0]
    views, _ = slice_image(Image.open(golden_images / "wide_260x150.png"), model.config.slice_settings)
    data = case_data(case)
    with torch.no_grad():
        from_strips = model(data=data).logits
        from_images = model(data=dict(data, pixel_values=[[normalize_view(v) for v in views]])).logits
    assert torch.equal(from_strips, from_images)


def _padded_batch(cases: list[dict]) -> tuple[dict, torch.Tensor]:
    """`data` (pixel_values, tgt_sizes and image_bound one entry per sample) and the attention mask of a
    right-padded batch of golden cases; callers swap in the tgt_sizes form they test."""
    length = max(len(case["input_ids"]) for case in cases)
    input_ids = torch.zeros(len(cases), length, dtype=torch.int64)
    mask = torch.zeros(len(cases), length, dtype=torch.int64)
    for row, case in enumerate(cases):
        input_ids[row, : len(case["input_ids"])] = case["input_ids"]
        mask[row, : len(case["input_ids"])] = 1
    data = {
        "input_ids": input_ids,
        "position_ids": torch.arange(length).expand(len(cases), -1),
        "pixel_values": [list(case["pixel_values"]) for case in cases],
        "tgt_sizes": [case["tgt_sizes"] for case in cases],
        "image_bound": [case["image_bound"] for case in cases],
    }
    return data, mask


def test_published_collator_form_gives_a_text_only_sample_and_an_image_sample_their_own_features(
    golden_dir, golden_cases
):
    """The published collator stacks tgt_sizes only for samples that have images (a text-only sample has no
    entry), and the published get_vllm_embedding concatenates them and hands the views out in order over all
    samples' pixel_values lists. A [text-only, image] batch in that form, in the suite's own per-sample form,
    and with the upstream dataset's `[]` for the text-only sample all give each sample its logits alone."""
    model = AutoModel.from_pretrained(golden_dir, attn_implementation="eager").eval()
    text, image = golden_cases[3], golden_cases[1]
    data, mask = _padded_batch([text, image])
    forms = {
        "published collator (text-only entry left out)": [image["tgt_sizes"]],
        "upstream dataset ([] for the text-only sample)": [[], image["tgt_sizes"]],
        "suite collator (one [n, 2] per sample)": [torch.zeros(0, 2, dtype=torch.int64), image["tgt_sizes"]],
    }
    with torch.no_grad():
        alone = [model(data=case_data(case)).logits[0] for case in (text, image)]
        for form, tgt_sizes in forms.items():
            logits = model(data=dict(data, tgt_sizes=tgt_sizes), attention_mask=mask).logits
            for row, case in enumerate((text, image)):
                n = len(case["input_ids"])
                torch.testing.assert_close(
                    logits[row, :n],
                    alone[row],
                    atol=1e-5,
                    rtol=0,
                    msg=lambda m, form=form, row=row: f"{form}, row {row}: {m}",
                )
    torch.testing.assert_close(alone[1], image["logits"], atol=1e-4, rtol=0)


def test_views_and_tgt_sizes_that_disagree_are_refused(golden_dir, golden_cases):
    """More or fewer sizes than views, or a size that does not fit its view, is an error, never a silent
    misassignment of views to sizes."""
    model = AutoModel.from_pretrained(golden_dir).eval()
    text, small, sliced = golden_cases[3], golden_cases[1], golden_cases[0]
    data, mask = _padded_batch([text, small])
    with torch.no_grad(), pytest.raises(ValueError, match=r"1 view\(s\) .* but tgt_sizes give 5 sizes"):
        model(data=dict(data, tgt_sizes=[small["tgt_sizes"], sliced["tgt_sizes"]]), attention_mask=mask)
    with torch.no_grad(), pytest.raises(ValueError, match=r"1 view\(s\) .* but tgt_sizes give 0 sizes"):
        model(data=dict(data, tgt_sizes=[]), attention_mask=mask)
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"sample 1, view 0: .* 63 patches but its tgt_size \(6, 10\) gives 60"),
    ):
        model(data=dict(data, tgt_sizes=[sliced["tgt_sizes"][:1]]), attention_mask=mask)
