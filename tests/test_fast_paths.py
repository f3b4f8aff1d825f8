"""The fast paths (finetune.model.kernels, finetune.model.attention) compute what the plain path computes:
same batch, same weights, loss and every trained parameter's gradient compared.

The compiled decoder layers are checked on CPU in fp32 (tight tolerance) with gradient checkpointing on, as
the Trainer runs them. liger-kernel's Triton kernels run on CUDA only: those tests run on the device (bench/
README.md records the run) and are skipped elsewhere; there the reference is the plain path under the same
bf16 autocast, and the tolerance is bf16's (a relative error of the gradient's norm, since summation order
differs between kernels). varlen attention is checked on CPU (its segment-by-segment path) and on CUDA (torch's
flash kernel over all segments at once), against sdpa's block-diagonal mask.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel

import finetune  # noqa: F401
from finetune.arguments import DEFAULT_LORA_TARGETS
from finetune.dataset import DataCollator
from finetune.model.attention import packed_segments, use_varlen_attention, vision_attention
from finetune.model.kernels import apply_liger_kernels, compile_decoder_layers, compiled_layer_count, liger_available
from finetune.model_setup import configure_trainable

CUDA = torch.cuda.is_available()


def lora_model(golden_dir, device: str):
    """The golden checkpoint with the upstream recipe (LoRA q/k/v/o + resampler + vision tower), LoRA dropout
    off (dropout masks come from different random streams in eager and compiled code), checkpointing on."""
    model = AutoModel.from_pretrained(golden_dir, attn_implementation="sdpa")
    training = SimpleNamespace(
        tune_llm=False, tune_vision=True, use_lora=True, tune_embeddings=False, gradient_checkpointing=True
    )
    lora = SimpleNamespace(
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=DEFAULT_LORA_TARGETS,
        lora_bias="none",
        q_lora=False,
    )
    torch.manual_seed(0)
    model = configure_trainable(model, training, lora)
    # LoRA B starts at zero, which would make every LoRA A gradient zero and the comparison blind to them.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train()


def loss_and_grads(model, batch, device: str, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    data = dict(batch["data"])
    data["input_ids"] = data["input_ids"].to(device)
    data["position_ids"] = data["position_ids"].to(device)
    count = (batch["labels"][:, 1:] != -100).sum().to(device)
    padding = {"attention_mask": batch["attention_mask"].to(device)} if "attention_mask" in batch else {}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = model(data=data, labels=batch["labels"].to(device), num_items_in_batch=count, **padding).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


def assert_same(reference, candidate, loss_rtol: float, grad_rtol: float) -> None:
    (ref_loss, ref_grads), (loss, grads) = reference, candidate
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=0)
    assert grads.keys() == ref_grads.keys()
    lora_b = [n for n in ref_grads if "lora_B" in n]
    assert lora_b and all(ref_grads[n].abs().sum() > 0 for n in lora_b), "the reference must train LoRA"
    for name, ref in ref_grads.items():
        if name.endswith("k_proj.bias"):
            # A key bias shifts every score of a query by the same amount, which softmax ignores: its true
            # gradient is zero and both paths return rounding noise (~1e-12 in fp32), not comparable values.
            continue
        error = (grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert error <= grad_rtol, f"{name}: relative gradient error {error:.2e} > {grad_rtol:.0e}"


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_plain_loss_and_gradients(golden_dir, mixed_samples):
    _, items, pad = mixed_samples
    batch = DataCollator(pad, packing=True)(items)
    model = lora_model(golden_dir, "cpu")
    reference = loss_and_grads(model, batch, "cpu", autocast=False)
    assert compile_decoder_layers(model) == len(model.get_base_model().llm.model.layers)
    compiled = loss_and_grads(model, batch, "cpu", autocast=False)
    assert_same(reference, compiled, loss_rtol=1e-5, grad_rtol=1e-4)


needs_liger = pytest.mark.skipif(not (CUDA and liger_available()), reason="liger-kernel runs on CUDA (Triton) only")


@pytest.fixture
def llama_module_restored():
    """liger patches transformers' llama module itself (RoPE function, RMSNorm and MLP classes): every Llama
    built later in the process would get its Triton kernels, CPU ones included. Undone after each test."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name, value in saved.items():
        if vars(modeling_llama).get(name) is not value:
            setattr(modeling_llama, name, value)


@needs_liger
@pytest.mark.parametrize("fused_loss", [False, True], ids=["kernels", "kernels+fused_loss"])
def test_liger_kernels_give_the_plain_loss_and_gradients(golden_dir, mixed_samples, fused_loss, llama_module_restored):
    _, items, pad = mixed_samples
    batch = DataCollator(pad, packing=True)(items)
    model = lora_model(golden_dir, "cuda")
    reference = loss_and_grads(model, batch, "cuda", autocast=True)
    apply_liger_kernels(model, fused_loss=fused_loss)
    fast = loss_and_grads(model, batch, "cuda", autocast=True)
    assert_same(reference, fast, loss_rtol=1e-2, grad_rtol=2e-2)


@needs_liger
def test_liger_and_compile_together_give_the_plain_loss_and_gradients(golden_dir, mixed_samples, llama_module_restored):
    _, items, pad = mixed_samples
    batch = DataCollator(pad, packing=True)(items)
    model = lora_model(golden_dir, "cuda")
    reference = loss_and_grads(model, batch, "cuda", autocast=True)
    apply_liger_kernels(model)
    compile_decoder_layers(model)
    fast = loss_and_grads(model, batch, "cuda", autocast=True)
    assert_same(reference, fast, loss_rtol=1e-2, grad_rtol=2e-2)


def test_liger_without_the_package_is_a_clear_error(golden_dir, monkeypatch):
    monkeypatch.setattr("finetune.model.kernels.liger_available", lambda: False)
    model = AutoModel.from_pretrained(golden_dir)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        apply_liger_kernels(model)


# --- varlen attention -----------------------------------------------------------------------------------------


def test_packed_segments_cut_at_every_position_zero_and_row_start():
    cu_seq_lens, longest = packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert cu_seq_lens.tolist() == [0, 3, 5, 6] and cu_seq_lens.dtype == torch.int32 and longest == 3
    # Padding mode: two right-padded rows; every padding position (id 0) is a segment of its own.
    cu_seq_lens, longest = packed_segments(torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0]]))
    assert cu_seq_lens.tolist() == [0, 3, 4, 6, 7, 8] and longest == 3
    # A row that does not start at position 0 (a continuation) still starts a segment.
    assert packed_segments(torch.tensor([[5, 6], [7, 8]]))[0].tolist() == [0, 2, 4]


needs_cuda = pytest.mark.skipif(not CUDA, reason="the flash kernel's variable-length entry runs on CUDA only")


@pytest.mark.parametrize(
    ("device", "packing", "compiled"),
    [("cpu", True, False), ("cpu", False, False), ("cpu", True, True),
     pytest.param("cuda", True, False, marks=needs_cuda), pytest.param("cuda", False, False, marks=needs_cuda),
     pytest.param("cuda", True, True, marks=needs_cuda)],
    ids=["cpu-packed", "cpu-padded", "cpu-packed-compiled", "cuda-packed", "cuda-padded", "cuda-packed-compiled"],
)  # fmt: skip
@pytest.mark.slow
def test_varlen_attention_gives_the_plain_loss_and_gradients(golden_dir, mixed_samples, device, packing, compiled):
    """On the CPU the segment-by-segment path (fp32, tight tolerance); on CUDA torch's flash kernel over all
    segments at once (bf16 autocast, bf16 tolerance); with compiled decoder layers around it too."""
    _, items, pad = mixed_samples
    batch = DataCollator(pad, packing=packing)(items)
    model = lora_model(golden_dir, device)
    cuda = device == "cuda"
    reference = loss_and_grads(model, batch, device, autocast=cuda)
    use_varlen_attention(model)
    assert vision_attention(model) == "varlen", "the vision tower's strips are attended one by one too"
    if compiled:
        compile_decoder_layers(model, vision=True, dynamic=True)
        assert compiled_layer_count(model, "vision") == len(model.get_base_model().vpm.encoder.layers) > 0
    varlen = loss_and_grads(model, batch, device, autocast=cuda)
    assert_same(reference, varlen, *((1e-2, 2e-2) if cuda else (1e-5, 1e-4)))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_packed_vision_tower_gives_the_padded_towers_features(golden_dir, golden_images, device):
    """Strips of different lengths, in samples whose own longest strips differ: each strip padded to its own
    sample's longest and masked beyond it (the reference) or packed and attended on its own (varlen) give the
    same resampler output; on CUDA through the flash kernel, bidirectionally, head_dim 8 + the tiny tower's."""
    from PIL import Image

    from finetune.model.image_processing import image_views

    model = AutoModel.from_pretrained(golden_dir, attn_implementation="sdpa").to(device).eval()
    pixel_values, tgt_sizes = [], []
    for names in (["wide_260x150.png"], ["tall_120x330.png", "small_90x70.png"]):
        views = [
            image_views(Image.open(golden_images / name).convert("RGB"), model.config.slice_settings) for name in names
        ]
        pixel_values.append([strip for strips, _, _ in views for strip in strips])
        tgt_sizes.append(torch.cat([sizes for _, sizes, _ in views]))
    strips = {view.shape[-1] for sample in pixel_values for view in sample}
    assert len(strips) > 2, "the check needs strips of several lengths"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(dtype)
    with torch.no_grad():
        reference = model.vision_features(pixel_values, tgt_sizes)
        use_varlen_attention(model)
        packed = model.vision_features(pixel_values, tgt_sizes)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if device == "cuda" else {"rtol": 1e-5, "atol": 1e-5}
    for expected, got in zip(reference, packed, strict=True):
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.slow
def test_varlen_attention_sees_only_its_own_sample(golden_dir, mixed_samples):
    """Not the same as attending the whole row: changing the first sample must leave the others' loss alone."""
    _, items, pad = mixed_samples
    model = lora_model(golden_dir, "cpu")
    use_varlen_attention(model)
    collate = DataCollator(pad, packing=True)

    def last_sample_loss(first_ids):
        batch = collate([dict(items[0], input_ids=first_ids), *items[1:]])
        labels = batch["labels"].clone()
        labels[:, : -len(items[-1]["labels"])] = -100
        with torch.no_grad():
            return model(data=batch["data"], labels=labels).loss

    shuffled = items[0]["input_ids"].clone()
    text = (items[0]["labels"] != -100).nonzero().flatten()
    shuffled[text] = shuffled[text].flip(0)
    torch.testing.assert_close(last_sample_loss(shuffled), last_sample_loss(items[0]["input_ids"]), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_a_model_switched_to_varlen_still_runs_inference_as_sdpa(golden_dir, golden_images):
    """Logits through MiniCPMV.forward (segments given) and generation (llm.generate with a KV cache: no
    segments, so sdpa with its mask) are sdpa's."""
    from PIL import Image
    from transformers import AutoTokenizer

    model = AutoModel.from_pretrained(golden_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(golden_dir)
    image = Image.open(golden_images / "small_90x70.png")
    msgs = [{"role": "user", "content": "Describe it."}]
    greedy = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 8}
    data = model.prepare_inputs("<|begin_of_text|>(<image>./</image>)\nDescribe it.", [image], tokenizer)
    with torch.no_grad():
        logits = model(data=data).logits
    answer = model.chat(image, msgs, tokenizer, **greedy)
    use_varlen_attention(model)
    with torch.no_grad():
        torch.testing.assert_close(model(data=data).logits, logits, rtol=1e-5, atol=1e-5)
    assert model.chat(image, msgs, tokenizer, **greedy) == answer


def test_varlen_attention_never_attends_left_padding(golden_dir):
    """Padding before a row's tokens (not what the collator makes), position ids counting through it (the
    model's default when a caller gives none): the padding mask cuts the padding off, and the real tokens'
    logits are sdpa's under the same mask."""
    model = AutoModel.from_pretrained(golden_dir, attn_implementation="sdpa").eval()
    ids = torch.tensor([[7, 7, 11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26, 27, 28]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    positions = torch.arange(8).expand(2, -1)
    empty = torch.zeros(0, 2, dtype=torch.int64)
    data = {
        "input_ids": ids,
        "position_ids": positions,
        "pixel_values": [[], []],
        "tgt_sizes": [empty, empty],
        "image_bound": [empty, empty],
    }
    with torch.no_grad():
        reference = model(data=data, attention_mask=mask).logits
        use_varlen_attention(model)
        varlen = model(data=data, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(varlen[real], reference[real], rtol=1e-5, atol=1e-5)
    assert packed_segments(positions, mask)[0].tolist() == [0, 1, 2, 8, 16]
