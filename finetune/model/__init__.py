"""The native MiniCPM-Llama3-V-2.5: configuration, model, resampler, slicing, tokenizer, checkpoints."""

from .chat_prompt import render_chat_prompt
from .configuration import MiniCPMVConfig
from .image_processing import SliceSettings, image_placeholder, image_views, plan_slices, slice_image
from .modeling import MiniCPMV
from .tokenization import MiniCPMVTokenizerFast, SpecialTokens, detect_llm_type

__all__ = [
    "MiniCPMV", "MiniCPMVConfig", "MiniCPMVTokenizerFast", "SliceSettings", "SpecialTokens", "detect_llm_type",
    "image_placeholder", "image_views", "plan_slices", "render_chat_prompt", "slice_image",
]  # fmt: skip
