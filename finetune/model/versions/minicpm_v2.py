"""MiniCPM-V 2.0 (openbmb/MiniCPM-V-2): what this version does its own way.

- LLM: MiniCPM-2.4B (`minicpm_llm.MiniCPMForCausalLM`: Llama's modules with the muP scalings scale_emb,
  scale_depth, dim_model_base), MHA with 36 heads, rope_theta 10,000, vocabulary 122,753, no biases.
- Config: the published config.json has no "version" field and no nested vision or slice config: the vision
  tower is named by `vision_encoder` (timm's "vit_so400m_patch14_siglip_384.webli") and the slicing fields
  (max_slice_nums, scale_resolution, patch_size, slice_mode) sit at the top level. `is_v2_config` tells it
  apart from 2.5's (also version-less) by those fields. 64 resampler queries; the last vision block dropped.
- Vision tower: the timm-style SigLIP ViT of `vit.py` on standard [3, H, W] views (mean/std 0.5), its learned
  27 x 27 positions resampled to each view's grid; no NaViT strips, no tgt_sizes in the published interface.
- Resampler: `resampler.QueryPositionResampler` (query position embedding, per-view key sin-cos table).
- Tokens and template: SentencePiece vocabulary with `<unk>` 0 (image feature token and pad), `<s>` 1 (BOS),
  `</s>` 2 (EOS), the image/slice/grounding tags at 101..112, and the role markers `<用户>` / `<AI>` as ordinary
  vocabulary entries (not special tokens in tokenizer_config.json). No chat template: the published chat() writes
  BOS + per turn `<用户>` or `<AI>` + content, then `<AI>`; only user and assistant turns; generation stops on EOS.
- Image placeholder: 2.5's layout (`<image>` + 64 x `<unk>` + `</image>`, then the slices inside one
  `<slice>...</slice>`); no image ids; one image, in the first user turn (chat()).
- chat(): the published signature `chat(image, msgs, context, tokenizer, vision_hidden_states=None,
  max_new_tokens=1024, sampling=True, max_inp_length=2048, **kwargs)`, returning (answer, context,
  generation_config) (`chat_returns_context`); no streaming.
"""

from __future__ import annotations

from typing import Any

from ..configuration import DEFAULT_SLICE_CONFIG, MiniCPMVConfigMixin
from ..minicpm_llm import MiniCPMConfig, MiniCPMForCausalLM
from ..vit import VIT_ENCODERS, ViTSettings
from .minicpm_llama3_v2_5 import image_placeholder
from .model_version import ModelVersion

USER_MARKER, ASSISTANT_MARKER = "<用户>", "<AI>"
# The published chat()'s prompt as a template (the checkpoint ships none): BOS comes from the tokenizer itself
# (add_bos_token), so the template does not write it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<用户>' }}{% elif message['role'] == "
    "'assistant' %}{{ '<AI>' }}{% else %}{{ raise_exception('MiniCPM-V 2.0 has only user and assistant turns') }}"
    "{% endif %}{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}"
)
# The fields of 2.0's config.json that no other version's has.
V2_MARKER_FIELDS = ("vision_encoder", "scale_emb")

MINICPM_V_2 = ModelVersion(
    name="2.0",
    hub_id="openbmb/MiniCPM-V-2",
    llm_type="minicpm",
    llm_class=MiniCPMForCausalLM,
    llm_config_class=MiniCPMConfig,
    chat_token=USER_MARKER,
    chat_template=CHAT_TEMPLATE,
    image_placeholder=image_placeholder,
    rope_theta=10000.0,
    vision_config_model_type="timm",
    liger_kernel_patch="",  # liger has no MiniCPM patch (the scalings are not Llama's)
    vision_tower="vit",
    tokenizer_has_chat_template=False,
    chat_returns_context=True,
)


def is_v2_config(config_dict: dict[str, Any]) -> bool:
    """Whether a version-less config.json is MiniCPM-V 2.0's: it names a timm vision encoder or a muP scale."""
    return "version" not in config_dict and any(field in config_dict for field in V2_MARKER_FIELDS)


class MiniCPMVConfig(MiniCPMVConfigMixin, MiniCPMConfig):
    """Config of MiniCPM-V 2.0: a MiniCPM LLM config plus the flat vision and slicing fields of the published
    config.json, which `to_dict` writes back in that layout. `vision_config` (absent from the published file)
    may give the tower's dimensions (tiny test checkpoints); by default they come from `vision_encoder`. Named
    as the published config class; import it as `versions.MiniCPMV2Config`."""

    model_type = "minicpmv"
    model_version = MINICPM_V_2

    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: int | None = 256
    vision_encoder: str = "vit_so400m_patch14_siglip_384.webli"
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    max_slice_nums: int = 9
    scale_resolution: int = 448
    drop_vision_last_layer: bool = True
    batch_vision_input: bool = False
    slice_mode: bool = True
    mm_use_im_start_end: bool = True
    slice_config: dict | None = None
    vision_config: dict | None = None

    def __post_init__(self, **kwargs):
        if self.vision_encoder not in VIT_ENCODERS:
            raise ValueError(
                f"MiniCPM-V 2.0 config: vision_encoder {self.vision_encoder!r} is not one this package builds "
                f"({', '.join(VIT_ENCODERS)})"
            )
        flat = {"max_slice_nums": self.max_slice_nums, "scale_resolution": self.scale_resolution}
        self.slice_config = dict(DEFAULT_SLICE_CONFIG, **flat, patch_size=self.patch_size, **(self.slice_config or {}))
        if isinstance(self.vision_config, dict):  # (the mixin's Idefics2 config is not this version's tower)
            drop = ("model_type", "transformers_version")
            self.vision_config = {k: v for k, v in self.vision_config.items() if k not in drop} or None
        MiniCPMConfig.__post_init__(self, **kwargs)
        if self.hidden_size < 128 or self.hidden_size % 128:
            raise ValueError(f"{type(self).__name__}: hidden_size must be a multiple of 128, got {self.hidden_size}")

    @property
    def vit_settings(self) -> ViTSettings:
        """The vision tower's dimensions: `vision_encoder`'s, with `vision_config`'s fields over them."""
        base = VIT_ENCODERS[self.vision_encoder]
        return ViTSettings(**{**base.__dict__, **(self.vision_config or {})})

    def to_dict(self) -> dict[str, Any]:
        """The published layout: flat slicing fields, no slice_config; vision_config only when it overrides the
        named encoder's dimensions."""
        output = super().to_dict()
        output.pop("slice_config", None)
        if not self.vision_config:
            output.pop("vision_config", None)
        return output
