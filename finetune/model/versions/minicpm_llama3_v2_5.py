"""MiniCPM-Llama3-V-2.5 (openbmb/MiniCPM-Llama3-V-2_5): what this version does its own way.

- LLM: Llama-3-8B, `LlamaForCausalLM` on the model's own config (a LlamaConfig subclass); rope_theta 500,000,
  vocabulary 128,256 with the special tokens at 128000..128255.
- Config fields: 96 resampler queries per view; no vision layer dropped; the vision config's model_type is
  written "idefics2".
- Tokens and template: Llama-3's chat format (`<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>`),
  BOS first; `<unk>` stands for the image features.
- Image placeholder: every view is `<image>` + query_num x `<unk>` + `</image>`; the slices' blocks follow the
  overview's inside one `<slice>...</slice>`, a row's blocks side by side, rows joined by "\\n"; no image ids.

The vision tower, resampler, slicing, the `model(data=...)` interface and the loss are the shared ones.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

from ..configuration import MiniCPMVConfigMixin
from ..image_processing import SliceGrid
from .model_version import ModelVersion

# The published inference template: it always ends with the assistant header (see spec section 5).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
    " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
    "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)


def image_placeholder(plan: SliceGrid, query_num: int, unk_token: str = "<unk>", image_id: int | None = None) -> str:
    """The text that stands for an image: its global block, then the grid of slice blocks if sliced. 2.5 has no
    image ids: `image_id` (the image's index in its prompt, the placeholder signature every version shares) is
    not used."""
    block = "<image>" + unk_token * query_num + "</image>"
    text = block
    if plan.grid:
        cols, rows = plan.grid
        text += "<slice>" + "\n".join(block * cols for _ in range(rows)) + "</slice>"
    return text


MINICPM_LLAMA3_V_2_5 = ModelVersion(
    name="2.5",
    hub_id="openbmb/MiniCPM-Llama3-V-2_5",
    llm_type="llama3",
    llm_class=LlamaForCausalLM,
    llm_config_class=LlamaConfig,
    chat_token="<|start_header_id|>",
    chat_template=CHAT_TEMPLATE,
    image_placeholder=image_placeholder,
    rope_theta=500000.0,
    vision_config_model_type="idefics2",
    liger_kernel_patch="apply_liger_kernel_to_llama",
)


class MiniCPMVConfig(MiniCPMVConfigMixin, LlamaConfig):
    """Config of MiniCPM-Llama3-V-2.5: a Llama-3 LLM config plus the vision and slicing settings."""

    model_type = "minicpmv"
    model_version = MINICPM_LLAMA3_V_2_5
    # Lets transformers pass the attention implementation chosen at load time on to the vision tower.
    sub_configs = {"vision_config": Idefics2VisionConfig}

    query_num: int = 96
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = False
    batch_vision_input: bool = True
    slice_mode: bool = True
    slice_config: dict | None = None
    vision_config: dict | Idefics2VisionConfig | None = None
