"""Chat messages -> the prompt text `MiniCPMV.chat` generates from, with the published decoding settings.

Images go into the prompt as IMAGE_MARKER, which `MiniCPMV.prepare_inputs` replaces with each image's
placeholder text; the turns are rendered by the tokenizer's own chat template (each version ships its own).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from PIL import Image

from .tokenization import detect_llm_type
from .versions import VERSIONS

IMAGE_MARKER = "(<image>./</image>)"  # what chat() puts where an image goes; replaced by placeholder text
# The published chat() decoding: sampling, or (sampling=False) 3-beam search.
PUBLISHED_SAMPLING = {"do_sample": True, "top_p": 0.8, "top_k": 100, "temperature": 0.7, "repetition_penalty": 1.05}
PUBLISHED_BEAM_SEARCH = {"do_sample": False, "num_beams": 3, "repetition_penalty": 1.2}


def published_decoding(sampling: bool, min_new_tokens: int = 0, **overrides: Any) -> dict[str, Any]:
    """The generation settings of the published chat(): its sampling or beam-search defaults, `min_new_tokens`
    when positive (2.6's own argument), then the caller's keyword arguments over them. (The published code keeps
    only overrides of keys it already set; here any `generate` argument passes, so `min_new_tokens`, or
    `num_beams` with sampling, take effect on every version.)"""
    config = dict(PUBLISHED_SAMPLING if sampling else PUBLISHED_BEAM_SEARCH)
    if min_new_tokens > 0:
        config["min_new_tokens"] = min_new_tokens
    config.update(overrides)
    return config


def render_chat_prompt(
    image, msgs: list[dict[str, Any]], tokenizer, system_prompt: str = "", chat_template: str | None = None
) -> tuple[str, list[Image.Image]]:
    """Messages (content: str or list of str / PIL images) -> (inference prompt with markers, images), rendered
    with `chat_template`; None: the tokenizer's, or, for a tokenizer without one (MiniCPM-V 2.0's), the template
    of the version whose chat tokens it has."""
    msgs = deepcopy(msgs)
    if not msgs or msgs[0].get("role") != "user":
        raise ValueError("chat messages must start with a user turn")
    if image is not None:
        leading = image if isinstance(image, list) else [image]
        first = msgs[0]["content"]
        msgs[0]["content"] = leading + (first if isinstance(first, list) else [first])
    images: list[Image.Image] = []
    for message in msgs:
        content = message["content"] if isinstance(message["content"], list) else [message["content"]]
        parts = []
        for item in content:
            if isinstance(item, Image.Image):
                images.append(item)
                parts.append(IMAGE_MARKER)
            else:
                parts.append(str(item))
        message["content"] = "\n".join(parts)
    if system_prompt:
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        llm_type = detect_llm_type(tokenizer)
        chat_template = next(v.chat_template for v in VERSIONS.values() if v.llm_type == llm_type)
    prompt = tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, chat_template=chat_template
    )
    return prompt, images
