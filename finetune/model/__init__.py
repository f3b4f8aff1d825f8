"""The native MiniCPM-V family, MiniCPM-Llama3-V-2.5, MiniCPM-V 2.6 and 2.0 implemented: model, configuration,
resampler, slicing, tokenizer, loss, checkpoint checks. What one version does its own way is in `versions/`; everything else
is shared."""

from .chat_prompt import render_chat_prompt
from .image_processing import SliceSettings, image_views, plan_slices, slice_image
from .modeling import MiniCPMV
from .tokenization import MiniCPMVTokenizerFast, SpecialTokens, detect_llm_type
from .versions.minicpm_llama3_v2_5 import MiniCPMVConfig, image_placeholder

__all__ = [
    "MiniCPMV", "MiniCPMVConfig", "MiniCPMVTokenizerFast", "SliceSettings", "SpecialTokens", "detect_llm_type",
    "image_placeholder", "image_views", "plan_slices", "render_chat_prompt", "slice_image",
]  # fmt: skip
