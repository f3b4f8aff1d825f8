"""The MiniCPM-V versions finetune.model implements: one module each, stating what that version does its own way.

Shared by the versions, once, in finetune.model: the vision tower (SigLIP so400m, `vision.py` and the Idefics2
implementation), the perceiver resampler (`resampler.py`; the query count is a config field), adaptive slicing
and pixel layout (`image_processing.py`), the `model(data=...)` interface with packing (`modeling.py`), the loss
(`loss.py`, `sharded_loss.py`), attention and kernels, and the checkpoint checks and loading.

Per version (a module here, a `ModelVersion` and a config class): the LLM class and its config class, the
config fields and their defaults, the special tokens that tell its tokenizer apart, the image placeholder text
and the chat template. MiniCPM-V 2.6 (Qwen2, 64 queries, ChatML, image ids; see the reference FACTS.md) would
be `minicpm_v2_6.py` beside `minicpm_llama3_v2_5.py`, listed in VERSIONS, with `version_of` telling the two
apart by config.json's `version` field, and whatever 2.6 changes in a shared part (its vision tower's position
ids come from each view's (h, w) grid; its image bounds include the slice blocks) made a ModelVersion field.
"""

from __future__ import annotations

from typing import Any

from .minicpm_llama3_v2_5 import MINICPM_LLAMA3_V_2_5
from .model_version import ModelVersion

# Every implemented version by its config.json "version" name.
VERSIONS: dict[str, ModelVersion] = {version.name: version for version in (MINICPM_LLAMA3_V_2_5,)}


def version_of(config: Any) -> ModelVersion:
    """The version a model config describes: its class's `model_version` (this package's config classes), else
    MiniCPM-Llama3-V-2.5, the one version implemented (the hub's own config classes name none)."""
    return getattr(config, "model_version", None) or MINICPM_LLAMA3_V_2_5


__all__ = ["MINICPM_LLAMA3_V_2_5", "VERSIONS", "ModelVersion", "version_of"]
