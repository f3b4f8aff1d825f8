"""The MiniCPM-V versions finetune.model implements: one module each, stating what that version does its own way.

Shared by the versions, once, in finetune.model: the vision tower (SigLIP so400m, `vision.py` and the Idefics2
implementation), the perceiver resampler (`resampler.py`; the query count is a config field), adaptive slicing
and pixel layout (`image_processing.py`), the `model(data=...)` interface with packing (`modeling.py`), the loss
(`loss.py`, `sharded_loss.py`), attention and kernels, and the checkpoint checks and loading.

Per version (a module here, a `ModelVersion` and a config class): the LLM class and its config class, the
config fields and their defaults, the special tokens that tell its tokenizer apart, the image placeholder text
and the chat template, and the switches a shared part reads where versions differ (which tokens open an
image-feature block, whether the vision tower gets each view's (h, w) grid, whether prompts start with BOS).
MiniCPM-Llama3-V-2.5 is `minicpm_llama3_v2_5.py`, MiniCPM-V 2.6 `minicpm_v2_6.py`; config.json's "version"
field tells them apart (`config_class_for`), a config without one meaning 2.5, as the first checkpoints did.
"""

from __future__ import annotations

from typing import Any

from .minicpm_llama3_v2_5 import MINICPM_LLAMA3_V_2_5, MiniCPMVConfig
from .minicpm_v2_6 import MINICPM_V_2_6
from .minicpm_v2_6 import MiniCPMVConfig as MiniCPMV26Config
from .model_version import ModelVersion

# Every implemented version by its config.json "version" name, with its config class.
VERSIONS: dict[str, ModelVersion] = {version.name: version for version in (MINICPM_LLAMA3_V_2_5, MINICPM_V_2_6)}
CONFIG_CLASSES: dict[str, type] = {cls.model_version.name: cls for cls in (MiniCPMVConfig, MiniCPMV26Config)}
# What a config without a "version" field is: the first checkpoints (2.5) wrote none.
DEFAULT_VERSION = MINICPM_LLAMA3_V_2_5


class UnsupportedVersionError(ValueError):
    """A MiniCPM-V config whose "version" this package does not implement (it is never built as another one)."""


def version_name(value: Any) -> str:
    """config.json's "version" value as VERSIONS names it: 2.6 and "2.6" -> "2.6", 4 and 4.0 -> "4.0"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnsupportedVersionError(f"config.json: version {value!r} is not a MiniCPM-V version number")
    try:
        return repr(float(value))
    except ValueError:
        raise UnsupportedVersionError(f"config.json: version {value!r} is not a MiniCPM-V version number") from None


def version_named(value: Any) -> ModelVersion:
    """The implemented version config.json's "version" value names (None: the default, 2.5); anything else
    raises UnsupportedVersionError naming it and the versions implemented."""
    if value is None:
        return DEFAULT_VERSION
    name = version_name(value)
    if name not in VERSIONS:
        supported = ", ".join(VERSIONS)
        raise UnsupportedVersionError(
            f"MiniCPM-V version {name} is not supported by this suite (supported versions: {supported}); "
            "refusing to build it as another version"
        )
    return VERSIONS[name]


def config_class_for(config_dict: dict[str, Any]) -> type:
    """The config class of the version a config.json dict names in "version" (UnsupportedVersionError if none)."""
    return CONFIG_CLASSES[version_named(config_dict.get("version")).name]


def version_of(config: Any) -> ModelVersion:
    """The version a model config describes: its class's `model_version` (this package's config classes), else
    the version its "version" field names (the hub's own config classes carry the field but name no class)."""
    return getattr(config, "model_version", None) or version_named(getattr(config, "version", None))


__all__ = [
    "CONFIG_CLASSES", "MINICPM_LLAMA3_V_2_5", "MINICPM_V_2_6", "VERSIONS", "MiniCPMV26Config", "MiniCPMVConfig", "ModelVersion", "UnsupportedVersionError",
    "config_class_for", "version_named", "version_of",
]  # fmt: skip
