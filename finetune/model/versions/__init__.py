"""The MiniCPM-V versions finetune.model implements: one module each, stating what that version does its own way.

Shared by the versions, once, in finetune.model: the vision tower (SigLIP so400m, `vision.py` and the Idefics2
implementation; MiniCPM-V 2.0's timm-style ViT is `vit.py`), the perceiver resampler (`resampler.py`; the query
count is a config field), adaptive slicing and pixel layout (`image_processing.py`), the `model(data=...)` interface with packing (`modeling.py`), the loss
(`loss.py`, `sharded_loss.py`), attention and kernels, and the checkpoint checks and loading.

Per version (a module here, a `ModelVersion` and a config class): the LLM class and its config class, the
config fields and their defaults, the special tokens that tell its tokenizer apart, the image placeholder text
and the chat template, and the switches a shared part reads where versions differ (which tokens open an
image-feature block, whether the vision tower gets each view's (h, w) grid, whether prompts start with BOS).
MiniCPM-Llama3-V-2.5 is `minicpm_llama3_v2_5.py`, MiniCPM-V 2.6 `minicpm_v2_6.py`, MiniCPM-V 2.0 `minicpm_v2.py`;
config.json's "version" field tells them apart (`config_class_for`). A config without one is 2.0's when it has
2.0's own fields (`vision_encoder`, `scale_emb`: `minicpm_v2.is_v2_config`), else 2.5's, as the first
checkpoints of 2.5 wrote none.
"""

from __future__ import annotations

from typing import Any

from .minicpm_llama3_v2_5 import MINICPM_LLAMA3_V_2_5, MiniCPMVConfig
from .minicpm_v2 import MINICPM_V_2, is_v2_config
from .minicpm_v2 import V2_MARKER_FIELDS as V2_FIELDS
from .minicpm_v2 import MiniCPMVConfig as MiniCPMV2Config
from .minicpm_v2_6 import MINICPM_V_2_6
from .minicpm_v2_6 import MiniCPMVConfig as MiniCPMV26Config
from .model_version import ModelVersion

# Every implemented version by its config.json "version" name, with its config class.
VERSIONS: dict[str, ModelVersion] = {
    version.name: version for version in (MINICPM_LLAMA3_V_2_5, MINICPM_V_2_6, MINICPM_V_2)
}
CONFIG_CLASSES: dict[str, type] = {
    cls.model_version.name: cls for cls in (MiniCPMVConfig, MiniCPMV26Config, MiniCPMV2Config)
}
# What a config without a "version" field (and without 2.0's own fields) is: the first checkpoints (2.5) wrote none.
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


def version_of_dict(config_dict: dict[str, Any]) -> ModelVersion:
    """The version a config.json dict describes: the one its "version" names (UnsupportedVersionError if not
    implemented); without "version", 2.0 when it has 2.0's own fields, else 2.5."""
    return MINICPM_V_2 if is_v2_config(config_dict) else version_named(config_dict.get("version"))


def config_class_for(config_dict: dict[str, Any]) -> type:
    """The config class of the version a config.json dict describes (`version_of_dict`)."""
    return CONFIG_CLASSES[version_of_dict(config_dict).name]


def version_of(config: Any) -> ModelVersion:
    """The version a model config describes: its class's `model_version` (this package's config classes), else
    what its fields say (`version_of_dict`: the hub's own config classes name no version class)."""
    version = getattr(config, "model_version", None)
    if version is not None:
        return version
    fields = {
        name: getattr(config, name) for name in ("version", *V2_FIELDS) if getattr(config, name, None) is not None
    }
    return version_of_dict(fields)


__all__ = [
    "CONFIG_CLASSES", "MINICPM_LLAMA3_V_2_5", "MINICPM_V_2", "MINICPM_V_2_6", "VERSIONS", "MiniCPMV26Config", "MiniCPMV2Config", "MiniCPMVConfig", "ModelVersion", "UnsupportedVersionError",
    "config_class_for", "version_named", "version_of", "version_of_dict",
]  # fmt: skip
