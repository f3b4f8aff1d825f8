"""The native MiniCPM-V 2.0: its published architecture (names and shapes from the real config), its loading from
the published layout, the muP scalings of its LLM, the timm-style vision tower and the older resampler.

There is no golden output of the published 2.0 code (it does not import on transformers 5, and timm is not
installed). What is checked numerically, and against what:
- the LLM (embedding scale, residual-branch scale, final division, rotary attention, RMSNorm, SiLU MLP):
  against a hand-written forward of a one-layer MiniCPM (`reference_minicpm_logits`), written from the
  published formulas, not from the model code;
- the resampler: against torch's own nn.MultiheadAttention fed the published formula's inputs;
- the position-embedding resampling: against timm's documented rule (bicubic, antialias, align_corners False,
  unchanged when the grid is the stored square one), plus an orientation check;
- the ViT (patch embedding, blocks with fused qkv, final norm): against transformers' Idefics2 SigLIP encoder
  with the same weights and exact GELU, on a view of the stored square grid (no position resampling);
- the batched vision tower: each view's features equal those it gets alone.
Not checked against any reference: timm's own code (not installed; its GELU and LayerNorm eps are taken from
its model definition), the published 2.0 model end to end, and anything against the real weights (none here).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.model import MiniCPMV, MiniCPMVConfig, render_chat_prompt
from finetune.model.image_processing import normalize_view, slice_image
from finetune.model.kernels import tower_layers
from finetune.model.minicpm_llm import MiniCPMConfig, MiniCPMForCausalLM
from finetune.model.resampler import QueryPositionResampler
from finetune.model.tokenization import SpecialTokens
from finetune.model.versions import MINICPM_LLAMA3_V_2_5, MINICPM_V_2, MiniCPMV2Config, version_of
from finetune.model.vit import VisionTransformer, ViTSettings, resample_position_embedding
from finetune.synthetic import build_tiny_checkpoint

REFERENCE = Path(__file__).parent / "reference_v2"


@pytest.fixture(scope="module")
def tiny_v2_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v2"), version="2.0")


@pytest.fixture(scope="module")
def tiny_v2(tiny_v2_dir):
    return AutoModel.from_pretrained(tiny_v2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer_v2(tiny_v2_dir):
    return AutoTokenizer.from_pretrained(tiny_v2_dir)


def published_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE / "param_shapes.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, _ = line.split("\t")
            shapes[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return shapes


def test_real_2_0_config_builds_exactly_the_published_tensors():
    config = AutoConfig.from_pretrained(REFERENCE)
    assert version_of(config) is MINICPM_V_2
    with torch.device("meta"):
        model = MiniCPMV(config)
    built = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    expected = published_shapes()
    assert len(expected) == 694
    assert built == expected
    assert sum(math.prod(shape) for shape in built.values()) == 3_434_965_792


@pytest.mark.parametrize("version", ["2.0", "2.5", "2.6"])
def test_every_tensor_is_created_on_the_device_the_model_is_built_on(version):
    """Built under a device context (how the benchmarks make a full-size model straight on the GPU, and how
    loaders build on the meta device), no parameter or buffer is left on the CPU: 2.0's query position table
    was made from numpy, which ignores the device context."""
    from finetune.synthetic import full_size_config

    with torch.device("meta"):
        model = MiniCPMV(full_size_config(version))
    on_cpu = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if not tensor.is_meta]
    assert on_cpu == []


def test_a_version_less_config_is_2_0_by_its_fields_and_2_5_otherwise():
    v2 = json.loads((REFERENCE / "config.json").read_text())
    assert "version" not in v2
    assert type(MiniCPMVConfig.from_dict(v2)) is MiniCPMV2Config
    v2_5 = json.loads((Path(__file__).parent / "reference" / "config.json").read_text())
    del v2_5["version"]  # as the first 2.5 checkpoints were written
    assert version_of(MiniCPMVConfig.from_dict(v2_5)) is MINICPM_LLAMA3_V_2_5


def test_2_0_config_keeps_the_published_flat_layout_on_save(tmp_path):
    config = AutoConfig.from_pretrained(REFERENCE)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    published = json.loads((REFERENCE / "config.json").read_text())
    assert "slice_config" not in written and "vision_config" not in written
    for field in ("vision_encoder", "max_slice_nums", "scale_resolution", "query_num", "scale_emb", "scale_depth",
                  "dim_model_base", "drop_vision_last_layer", "rope_theta", "num_key_value_heads"):  # fmt: skip
        assert written[field] == published[field], field
    assert version_of(AutoConfig.from_pretrained(tmp_path)) is MINICPM_V_2


def test_an_unknown_vision_encoder_is_refused_in_one_line(tmp_path):
    config = json.loads((REFERENCE / "config.json").read_text())
    config["vision_encoder"] = "vit_huge_patch14_clip_224"
    with pytest.raises(ValueError, match="vision_encoder 'vit_huge_patch14_clip_224'"):
        MiniCPMVConfig.from_dict(config)


# --- the LLM's muP scalings against a hand-written forward -------------------------------------------------


def reference_minicpm_logits(llm: MiniCPMForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """MiniCPM's published formulas for a one-layer model, written out: embeddings x scale_emb; RMSNorm
    (x / sqrt(mean(x^2) + eps) * w); rotary (rotate-half, theta 10000); causal softmax attention; residual
    branches x scale_depth / sqrt(L); SiLU-gated MLP; final norm; / (hidden / dim_model_base); lm_head."""
    config, state = llm.config, {name: t.detach() for name, t in llm.state_dict().items()}
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    branch = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * weight

    def rotate(x):  # x [T, heads, head_dim]
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.arange(x.shape[0]).float()[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
        half = head_dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    h = state["model.embed_tokens.weight"][input_ids] * config.scale_emb
    prefix = "model.layers.0."
    x = rms(h, state[prefix + "input_layernorm.weight"])
    q = rotate((x @ state[prefix + "self_attn.q_proj.weight"].T).view(-1, heads, head_dim))
    k = rotate((x @ state[prefix + "self_attn.k_proj.weight"].T).view(-1, heads, head_dim))
    v = (x @ state[prefix + "self_attn.v_proj.weight"].T).view(-1, heads, head_dim)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), float("-inf"))
    attention = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(-1, config.hidden_size)
    h = h + (attention @ state[prefix + "self_attn.o_proj.weight"].T) * branch
    x = rms(h, state[prefix + "post_attention_layernorm.weight"])
    gate, up = x @ state[prefix + "mlp.gate_proj.weight"].T, x @ state[prefix + "mlp.up_proj.weight"].T
    h = h + ((F.silu(gate) * up) @ state[prefix + "mlp.down_proj.weight"].T) * branch
    h = rms(h, state["model.norm.weight"]) / (config.hidden_size / config.dim_model_base)
    return h @ state["lm_head.weight"].T


def test_minicpm_llm_matches_the_hand_written_mup_forward():
    config = MiniCPMConfig(
        vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, scale_emb=12, scale_depth=1.4,
        dim_model_base=16, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    llm = MiniCPMForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in llm.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    input_ids = torch.tensor([[3, 17, 5, 42, 8, 0, 29]])
    with torch.no_grad():
        logits = llm(input_ids=input_ids).logits[0]
    expected = reference_minicpm_logits(llm, input_ids[0])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # The scalings matter: the same weights without them give other logits.
    plain = MiniCPMForCausalLM(MiniCPMConfig(**{**config.to_dict(), "scale_emb": 1, "scale_depth": 1.0}))
    plain.load_state_dict(llm.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=input_ids).logits[0], logits, atol=1e-3)


def test_token_embeddings_are_scaled_but_image_features_are_not(tiny_v2, tokenizer_v2):
    image = Image.new("RGB", (56, 70), (10, 200, 90))
    data = tiny_v2.prepare_inputs("(<image>./</image>)\nhi", [image], tokenizer_v2)
    with torch.no_grad():
        embeddings, features = tiny_v2.get_vllm_embedding(data)
        token_embeddings = tiny_v2.llm.get_input_embeddings()(data["input_ids"])
    (start, end), *_ = data["image_bound"][0].tolist()
    torch.testing.assert_close(embeddings[0, start:end], features[0][0])
    torch.testing.assert_close(embeddings[0, :start], token_embeddings[0, :start] * 12)
    torch.testing.assert_close(embeddings[0, end:], token_embeddings[0, end:] * 12)


# --- vision ---------------------------------------------------------------------------------------------------


def timm_rule(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """timm's resample_abs_pos_embed as documented (no prefix tokens): a [1, S*S, D] table laid out as a
    [1, D, S, S] image in float32, resized bicubic with antialias (align_corners False), back to [1, h*w, D]."""
    side, dim = math.isqrt(pos_embed.shape[1]), pos_embed.shape[-1]
    image = pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


def test_position_embedding_resampling_follows_timms_rule():
    torch.manual_seed(0)
    table = torch.randn(1, 36, 8)  # a 6 x 6 learned grid
    assert resample_position_embedding(table, (6, 6)) is table  # the stored square grid: unchanged
    for grid in [(3, 4), (9, 5), (6, 2), (4, 4)]:
        torch.testing.assert_close(resample_position_embedding(table, grid), timm_rule(table, grid))
    # Orientation: a table that varies along rows only keeps varying along rows only.
    rows_only = torch.arange(6.0).repeat_interleave(6).reshape(1, 36, 1).expand(1, 36, 2).contiguous()
    resized = resample_position_embedding(rows_only, (4, 9)).reshape(4, 9, 2)
    assert torch.allclose(resized, resized[:, :1].expand(4, 9, 2))
    assert bool((resized[1:, 0, 0] > resized[:-1, 0, 0]).all())


def test_resampler_equals_torch_multihead_attention_on_the_published_formula():
    torch.manual_seed(0)
    resampler = QueryPositionResampler(num_queries=16, embed_dim=256, kv_dim=48).eval()
    with torch.no_grad():
        for parameter in resampler.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.2)
    h, w = 3, 5
    features = torch.randn(1, h * w, 48)
    with torch.no_grad():
        got = resampler(features, [(h, w)], (h, w))[0]
        reference = torch.nn.MultiheadAttention(256, 2)
        reference.load_state_dict(resampler.attn.state_dict())
        x = resampler.ln_kv(resampler.kv_proj(features[0]))
        keys = x + resampler.position_table(h, w, torch.device("cpu"))[:h, :w].reshape(h * w, -1)
        queries = resampler.ln_q(resampler.query) + resampler.pos_embed
        out = reference(queries[:, None], keys[:, None], x[:, None])[0][:, 0]
        expected = resampler.ln_post(out) @ resampler.proj
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The stored query position table is the 4 x 4 sin-cos grid, not trained.
    assert not resampler.pos_embed.requires_grad
    torch.testing.assert_close(resampler.pos_embed, resampler.query_grid_table(256, 4))


def test_each_view_gets_the_features_it_gets_alone(tiny_v2):
    torch.manual_seed(1)
    views = [torch.rand(3, 70, 42) * 2 - 1, torch.rand(3, 28, 112) * 2 - 1, torch.rand(3, 50, 33) * 2 - 1]
    with torch.no_grad():
        together = tiny_v2.vision_features([[views[0], views[1]], [], [views[2]]], None)
        alone = [tiny_v2.vision_features([[view]], None)[0][0] for view in views]
    assert [len(f) for f in together] == [2, 0, 1]
    torch.testing.assert_close(together[0][0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[0][1], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[2][0], alone[2], atol=1e-5, rtol=1e-5)


# --- loading, forward, chat -----------------------------------------------------------------------------------


def test_tiny_2_0_checkpoint_loads_runs_forward_and_greedy_chat(tiny_v2_dir, tiny_v2, tokenizer_v2):
    assert version_of(tiny_v2.config) is MINICPM_V_2
    assert len(tower_layers(tiny_v2, "vision")) == 2  # 3 built, the last dropped (drop_vision_last_layer)
    tokens = SpecialTokens.from_tokenizer(tokenizer_v2)
    assert (tokens.unk, tokens.bos, tokens.eos, tokens.pad) == (0, 1, 2, 0)
    assert (tokens.image_start, tokens.image_end, tokens.slice_start, tokens.slice_end) == (101, 102, 111, 112)
    assert tokens.stop_ids == [2]

    image = Image.new("RGB", (224, 112), (200, 40, 40))  # sliced at scale_resolution 112
    data = tiny_v2.prepare_inputs("<用户>(<image>./</image>)\nWhat?<AI>", [image], tokenizer_v2)
    ids = data["input_ids"][0].tolist()
    assert ids[:3] == [1, tokenizer_v2.convert_tokens_to_ids("<用户>"), 101]
    assert ids[-1] == tokenizer_v2.convert_tokens_to_ids("<AI>")
    views = len(data["pixel_values"][0])
    assert views > 1 and ids.count(0) == views * 16 and ids.count(111) == 1

    # The published interface: [3, H, W] views, no tgt_sizes; the same logits as the suite's strips + sizes.
    published = {key: data[key] for key in ("input_ids", "position_ids", "image_bound")}
    published["pixel_values"] = [[normalize_view(view) for view in _views(tiny_v2, image)]]
    with torch.no_grad():
        logits = tiny_v2(data=published).logits
        suite_logits = tiny_v2(data=data).logits
    assert logits.shape == (1, len(ids), tiny_v2.config.vocab_size)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, suite_logits, atol=1e-5, rtol=1e-5)

    # The published 2.0 signature: chat(image, msgs, context, tokenizer, ...) -> (answer, context, generation_config)
    answer, _, _ = tiny_v2.chat(image, [{"role": "user", "content": "What?"}], None, tokenizer_v2, sampling=False,
                                num_beams=1, max_new_tokens=4)  # fmt: skip
    # Greedy decoding by hand: the prompt chat() writes (BOS from the tokenizer, <用户>, the placeholder, "\n",
    # the question, <AI>), then the argmax token appended four times (or up to EOS).
    generated = []
    with torch.no_grad():
        for _ in range(4):
            step = dict(data, input_ids=torch.tensor([ids + generated]))
            step["position_ids"] = torch.arange(len(ids) + len(generated))[None]
            token = int(tiny_v2(data=step).logits[0, -1].argmax())
            if token == 2:
                break
            generated.append(token)
    assert answer == tokenizer_v2.decode(generated, skip_special_tokens=True).strip()


def _views(model, image):
    views, _ = slice_image(image, model.config.slice_settings)
    return views


def test_chat_refuses_a_system_turn(tiny_v2, tokenizer_v2):
    with pytest.raises(Exception, match="only user and assistant turns"):
        tiny_v2.chat(None, [{"role": "user", "content": "hi"}], None, tokenizer_v2, system_prompt="Be brief.",
                     sampling=False, num_beams=1, max_new_tokens=2)  # fmt: skip


def test_chat_takes_the_published_readme_call_and_returns_answer_context_and_generation_config(tiny_v2, tokenizer_v2):
    """The MiniCPM-V 2.0 README: `res, context, _ = model.chat(image=image, msgs=msgs, context=None,
    tokenizer=tokenizer, sampling=True, temperature=0.7)`; the context continues the conversation."""
    from finetune.model.chat_prompt import PUBLISHED_SAMPLING

    image = Image.new("RGB", (224, 112), (200, 40, 40))
    msgs = [{"role": "user", "content": "What is in the image?"}]
    torch.manual_seed(0)
    res, context, generation_config = tiny_v2.chat(image=image, msgs=msgs, context=None, tokenizer=tokenizer_v2,
                                                   sampling=True, temperature=0.5, max_new_tokens=4, min_new_tokens=4)  # fmt: skip
    assert isinstance(res, str) and res
    assert context == [*msgs, {"role": "assistant", "content": res}] and len(msgs) == 1
    assert generation_config == dict(PUBLISHED_SAMPLING, temperature=0.5, min_new_tokens=4)
    follow_up = context + [{"role": "user", "content": "And the colour?"}]
    greedy = {"sampling": False, "num_beams": 1, "max_new_tokens": 3}
    second, second_context, _ = tiny_v2.chat(image, follow_up, None, tokenizer_v2, stream=False, **greedy)
    assert second_context[:-1] == follow_up and second_context[-1] == {"role": "assistant", "content": second}
    with pytest.raises(ValueError, match="2.0.*stream"):
        tiny_v2.chat(image=image, msgs=msgs, context=None, tokenizer=tokenizer_v2, stream=True)


def test_a_2_0_checkpoint_missing_a_tensor_is_refused(tiny_v2_dir, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(tiny_v2_dir, target)
    state = load_file(target / "model.safetensors")
    del state["resampler.pos_embed"]
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="resampler.pos_embed"):
        AutoModel.from_pretrained(target)


def test_training_step_gives_gradients_with_gradient_checkpointing(tiny_v2_dir, tokenizer_v2):
    model = AutoModel.from_pretrained(tiny_v2_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.train()
    image = Image.new("RGB", (84, 56), (0, 0, 255))
    data = model.prepare_inputs("<用户>(<image>./</image>)\nColour?<AI>blue", [image], tokenizer_v2)
    labels = data["input_ids"].clone()
    labels[:, :-3] = -100
    loss = model(data=data, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.resampler.query.grad is not None and model.resampler.query.grad.abs().sum() > 0
    assert model.llm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_vit_blocks_equal_transformers_siglip_encoder_with_the_same_weights():
    """The tower's arithmetic against an independent implementation: transformers' Idefics2 SigLIP encoder
    (separate q/k/v, exact GELU chosen) given the same weights, on a view of the stored square grid, where
    neither tower resamples its positions."""
    settings = ViTSettings(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                           image_size=84)  # fmt: skip
    torch.manual_seed(0)
    ours = VisionTransformer(settings).eval()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0, 0.3)
    reference_config = Idefics2VisionConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, image_size=84,
        patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
    )  # fmt: skip
    reference_config._attn_implementation = "eager"
    reference = Idefics2VisionTransformer(reference_config).eval()
    state = {
        "embeddings.patch_embedding.weight": ours.patch_embed.proj.weight,
        "embeddings.patch_embedding.bias": ours.patch_embed.proj.bias,
        "embeddings.position_embedding.weight": ours.pos_embed[0],
        "post_layernorm.weight": ours.norm.weight,
        "post_layernorm.bias": ours.norm.bias,
    }
    for n, block in enumerate(ours.blocks):
        prefix = f"encoder.layers.{n}."
        for name, weight, bias in zip(
            ("q_proj", "k_proj", "v_proj"), block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3), strict=True
        ):
            state[prefix + f"self_attn.{name}.weight"], state[prefix + f"self_attn.{name}.bias"] = weight, bias
        pairs = {"self_attn.out_proj": block.attn.proj, "layer_norm1": block.norm1, "layer_norm2": block.norm2,
                 "mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2}  # fmt: skip
        for name, module in pairs.items():
            state[prefix + name + ".weight"], state[prefix + name + ".bias"] = module.weight, module.bias
    reference.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    pixels = torch.rand(1, 3, 84, 84) * 2 - 1
    with torch.no_grad():
        got = ours(pixels, [(6, 6)])
        expected = reference(pixels, patch_attention_mask=torch.ones(1, 6, 6, dtype=torch.bool)).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tokenizer_loads_natively_also_without_config_json(tiny_v2_dir, tmp_path):
    """An adapter directory holds the base's tokenizer files and no config.json; the published tokenizer_config
    names the hub class (LlamaTokenizerWrapper, remote code needing timm): it must load natively, unprompted."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_v2_dir / name, tmp_path / name)
    for directory in (tiny_v2_dir, tmp_path):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert type(tokenizer).__module__.startswith("finetune."), type(tokenizer)
        assert tokenizer("<用户>hi")["input_ids"][:2] == [1, tokenizer.convert_tokens_to_ids("<用户>")]


def test_the_2_0_prompt_is_rendered_without_a_tokenizer_template(tokenizer_v2):
    assert not tokenizer_v2.chat_template
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Q"},
    ]
    prompt, images = render_chat_prompt(Image.new("RGB", (28, 28)), msgs, tokenizer_v2)
    assert prompt == "<用户>(<image>./</image>)\nHi<AI>Hello<用户>Q<AI>" and len(images) == 1


def test_preflight_takes_a_2_0_checkpoint_as_2_0_and_checks_llm_type_against_it(tiny_v2_dir, tmp_path):
    """2.0's config.json has no "version": the launcher's preflight tells it apart by its fields, as loading does."""
    from finetune.arguments import UsageError
    from finetune.preflight import preflight

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"role": "user", "content": "Hi?"},
                                                              {"role": "assistant", "content": "Hello."}]}]))  # fmt: skip
    common = ["--model_name_or_path", str(tiny_v2_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "o")]
    preflight(common)
    preflight([*common, "--llm_type", "minicpm"])
    with pytest.raises(UsageError, match=r"--llm_type llama3 .*MiniCPM-V 2\.0 checkpoint.*--llm_type minicpm"):
        preflight([*common, "--llm_type", "llama3"])


def test_the_memory_planner_plans_a_2_0_checkpoint(capsys):
    """The planner reads a 2.0 checkpoint's version by its fields (its config.json names none) and plans for the
    2.0 architecture."""
    from finetune.plan import main

    assert main(["--gpus", "1", "--gpu-mem", "24", "--model", str(REFERENCE), "--emit-args"]) == 0
    assert "--per_device_train_batch_size" in capsys.readouterr().out
    assert main(["--gpus", "1", "--gpu-mem", "24", "--model", str(REFERENCE)]) == 0
    assert "model:                   MiniCPM-V 2.0 (openbmb/MiniCPM-V-2 architecture)" in capsys.readouterr().out
