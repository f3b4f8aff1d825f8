"""MiniCPM-V 2.6 (openbmb/MiniCPM-V-2_6): what this version does its own way.

- LLM: Qwen2-7B, `Qwen2ForCausalLM` on the model's own config (a Qwen2Config subclass): q/k/v projections with
  biases, rope_theta 1,000,000, vocabulary 151,666 with the special tokens at 151643..151665 and `<unk>` (the
  image feature token) at 128244, inside the BPE range. No embedding scale.
- Config fields: 64 resampler queries per view; no vision layer dropped; the vision config's model_type is
  written "siglip".
- Tokens and template: ChatML (`<|im_start|>role\\n ... <|im_end|>\\n`) with a default system turn
  ("You are a helpful assistant.") when the first message is not a system message; no BOS token.
  Generation stops on `<|im_end|>` or `<|endoftext|>`.
- Image placeholder: `<image_id>i</image_id>` (i = the image's index in its prompt), the overview's
  `<image>` + query_num x `<unk>` + `</image>`, then, when sliced, each slice as `<slice>` + query_num x `<unk>`
  + `</slice>`, a row's slices side by side, rows joined by "\\n"; the image bounds cover both kinds of blocks.
- Vision tower: the shared SigLIP tower, its position ids taken from each view's true (h, w) patch grid.
- chat(): defaults max_new_tokens 2048 and max_inp_length 8192; `max_slice_nums` and `use_image_id` may be set per
  call (the published video setting: use_image_id=False, max_slice_nums=2).

The vision tower, resampler, slicing, the `model(data=...)` interface and the loss are the shared ones.
"""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

from ..configuration import MiniCPMVConfigMixin
from ..image_processing import SliceGrid
from .model_version import ModelVersion

# The published tokenizer_config.json's chat_template (also the one training renders with).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n'"
    " }}{% endif %}"
)


def image_placeholder(plan: SliceGrid, query_num: int, unk_token: str = "<unk>", image_id: int | None = 0) -> str:
    """The text that stands for one image: `<image_id>{image_id}</image_id>` (left out when image_id is None),
    the overview block `<image>` + query_num x unk + `</image>`, then, if sliced, `rows` lines of `cols` slice
    blocks `<slice>` + query_num x unk + `</slice>` joined by "\\n" (no wrapper around the slices)."""
    text = "" if image_id is None else f"<image_id>{image_id}</image_id>"
    text += "<image>" + unk_token * query_num + "</image>"
    if plan.grid:
        cols, rows = plan.grid
        slice_block = "<slice>" + unk_token * query_num + "</slice>"
        text += "\n".join(slice_block * cols for _ in range(rows))
    return text


MINICPM_V_2_6 = ModelVersion(
    name="2.6",
    hub_id="openbmb/MiniCPM-V-2_6",
    llm_type="qwen",
    llm_class=Qwen2ForCausalLM,
    llm_config_class=Qwen2Config,
    chat_token="<|im_start|>",
    chat_template=CHAT_TEMPLATE,
    image_placeholder=image_placeholder,
    rope_theta=1000000.0,
    vision_config_model_type="siglip",
    liger_kernel_patch="apply_liger_kernel_to_qwen2",
    feature_blocks=(("<image>", "</image>"), ("<slice>", "</slice>")),
    vision_grid_from_tgt_sizes=True,
    adds_bos=False,
    uses_image_id=True,
    chat_max_new_tokens=2048,
    chat_max_inp_length=8192,
)


class MiniCPMVConfig(MiniCPMVConfigMixin, Qwen2Config):
    """Config of MiniCPM-V 2.6: a Qwen2 LLM config plus the vision and slicing settings. Named as the published
    config class (every version's is `MiniCPMVConfig`), which is also the name transformers' Auto classes
    require of a config class mapped to the one model class, `MiniCPMV`; import it as
    `versions.MiniCPMV26Config`."""

    model_type = "minicpmv"
    model_version = MINICPM_V_2_6
    # Lets transformers pass the attention implementation chosen at load time on to the vision tower.
    sub_configs = {"vision_config": Idefics2VisionConfig}

    version: float | str = 2.6  # config.json's own field: how `versions.config_class_for` tells versions apart
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = False
    batch_vision_input: bool = True
    slice_mode: bool = True
    slice_config: dict | None = None
    vision_config: dict | Idefics2VisionConfig | None = None
