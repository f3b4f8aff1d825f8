"""ModelVersion: what one MiniCPM-V version states about itself, for the shared modules of finetune.model to read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedModel

from ..image_processing import SliceGrid

# (grid, query_num, unk token, image index in its prompt) -> the text that stands for that image
ImagePlaceholder = Callable[[SliceGrid, int, str, int], str]


@dataclass(frozen=True)
class ModelVersion:
    """The choices one MiniCPM-V version makes where versions differ (the list of what they share is in
    `finetune.model.versions`). Each version module fills in one and names it in its config class's
    `model_version`; the shared modules read it through `versions.version_of(config)`."""

    name: str  # config.json's "version" field ("2.5")
    hub_id: str  # the published checkpoint's hub id
    llm_type: str  # the upstream finetune's name for the version's conversation format ("llama3")
    llm_class: type[PreTrainedModel]  # the causal LM under `llm`, built from the model's own config
    llm_config_class: type[PretrainedConfig]  # the LLM's config class, which the version's config class extends
    chat_token: str  # a special token of the version's chat format that no other version's tokenizer has
    chat_template: str  # the published inference template (tokenizer_config.json's chat_template)
    image_placeholder: ImagePlaceholder  # an image's text; the image index matters only where image ids are used
    rope_theta: float  # the published config's rope_theta, written to config.json when the config holds none
    vision_config_model_type: str  # the model_type the published config.json gives its vision_config
    liger_kernel_patch: str  # liger_kernel.transformers' function that patches this LLM's modules in place
    # The (opening, closing) tokens of every block of query_num image-feature positions in the placeholder: the
    # image bounds are the spans strictly between a block's opening token and its closing token.
    feature_blocks: tuple[tuple[str, str], ...] = (("<image>", "</image>"),)
    # Whether the vision tower's position ids come from each view's true (h, w) patch grid (tgt_sizes), and each
    # view attends over its own h * w patches only; else each view is a 1 x L strip padded to its sample's longest.
    vision_grid_from_tgt_sizes: bool = False
    adds_bos: bool = True  # whether the version's prompts start with the tokenizer's BOS token
    uses_image_id: bool = False  # whether the placeholder opens with <image_id>i</image_id>
    # The vision stack: "navit" (Idefics2's SigLIP over patch strips + the shared resampler: 2.5, 2.6) or "vit"
    # (timm-style SigLIP ViT over [3, H, W] views + the query-position resampler: 2.0).
    vision_tower: str = "navit"
    # Whether the published tokenizer carries `chat_template` (2.0's has none: chat() renders this version's own).
    tokenizer_has_chat_template: bool = True
    # The published chat()'s defaults for max_new_tokens and max_inp_length (prompt tokens).
    chat_max_new_tokens: int = 1024
    chat_max_inp_length: int = 2048
    # Whether the published chat() takes `context` after `msgs` and returns (answer, context, generation_config)
    # (MiniCPM-V 2.0) rather than the answer alone (`MiniCPMV.chat_with_context`, `MiniCPMV.answer_chat`).
    chat_returns_context: bool = False
