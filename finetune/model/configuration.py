"""The config of a MiniCPM-V model: reads and writes the published (transformers 4.40) config.json layout.

The published config is its LLM's config (a LlamaConfig for MiniCPM-Llama3-V-2.5) with the vision tower's
config nested under `vision_config`, the slicing parameters under `slice_config`, and `rope_theta` at top level.
transformers 5 stores RoPE as `rope_parameters`; we accept both and always write the 4.40 layout back, so the
hub's remote code and other tools keep reading checkpoints this project saves.

What every version's config does is MiniCPMVConfigMixin here; each version's config class, with its LLM's
config class and its field defaults, is in `versions/` (MiniCPM-Llama3-V-2.5's: `MiniCPMVConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from transformers import PretrainedConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

from .image_processing import SliceSettings

if TYPE_CHECKING:
    from .versions.model_version import ModelVersion

# The published vision tower of every version so far: SigLIP-so400m-patch14 at 980 px (70 x 70 learned positions).
DEFAULT_VISION_CONFIG = {
    "hidden_size": 1152,
    "image_size": 980,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
}
DEFAULT_SLICE_CONFIG = {"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 448}
# The hub's remote code, named in config.json so that trust_remote_code=True keeps finding it.
PUBLISHED_AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
    "AutoModel": "modeling_minicpmv.MiniCPMV",
    "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
}


def vision_config_from(value: Any) -> Idefics2VisionConfig:
    """The published checkpoint says model_type "idefics2"; tiny ones say "idefics2_vision": accept both."""
    if isinstance(value, Idefics2VisionConfig):
        return value
    fields = dict(DEFAULT_VISION_CONFIG)
    fields.update({k: v for k, v in (value or {}).items() if k not in ("model_type", "transformers_version")})
    return Idefics2VisionConfig(**fields)


def slice_settings_from_config(config: Any) -> SliceSettings:
    """The slicing settings of a MiniCPM-V config: this project's class or the hub's remote code.

    The data and training path build their settings here, so it reads only what the published config class
    exposes too: `slice_config` (a dict in this project's class, a MiniCPMVSliceConfig object in the hub's) with
    max_slice_nums, scale_resolution and patch_size, then `query_num`, `slice_mode` and `patch_size`. A slice
    field that is absent takes the published MiniCPMVSliceConfig default (DEFAULT_SLICE_CONFIG): the real
    config.json has no scale_resolution, and 448 is what the hub's code then uses.
    """
    slice_config = getattr(config, "slice_config", None)
    slice_config = {} if slice_config is None else slice_config

    def read(name: str, fallback: Any) -> Any:
        value = slice_config.get(name) if isinstance(slice_config, Mapping) else getattr(slice_config, name, None)
        return fallback if value is None else value

    return SliceSettings(
        scale_resolution=int(read("scale_resolution", DEFAULT_SLICE_CONFIG["scale_resolution"])),
        patch_size=int(read("patch_size", getattr(config, "patch_size", DEFAULT_SLICE_CONFIG["patch_size"]))),
        max_slice_nums=int(read("max_slice_nums", DEFAULT_SLICE_CONFIG["max_slice_nums"])),
        query_num=int(config.query_num),
        slicing=bool(getattr(config, "slice_mode", True)),
    )


class MiniCPMVConfigMixin:
    """What every MiniCPM-V config adds to its LLM's config: the vision tower's config under `vision_config`, the
    slicing settings under `slice_config` (missing fields filled with the published defaults), the resampler's
    check on hidden_size, and the published layout on disk.

    A version's config class is `class Config(MiniCPMVConfigMixin, <its LLM's config class>)`, declaring the
    fields (query_num, image_size, patch_size, drop_vision_last_layer, batch_vision_input, slice_mode,
    slice_config, vision_config) with the version's defaults, and its `model_version`."""

    model_version: ClassVar[ModelVersion]

    def __post_init__(self, **kwargs):
        slice_config = dict(DEFAULT_SLICE_CONFIG)
        slice_config.update({k: v for k, v in (self.slice_config or {}).items() if k != "model_type"})
        self.slice_config = slice_config
        self.vision_config = vision_config_from(self.vision_config)
        super().__post_init__(**kwargs)
        if self.hidden_size < 128 or self.hidden_size % 128:
            # The resampler uses hidden // 128 heads (published code): any other size silently breaks it.
            raise ValueError(f"{type(self).__name__}: hidden_size must be a multiple of 128, got {self.hidden_size}")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """The config of the version `config_dict` describes (`versions.version_of_dict`: its "version" field,
        or 2.0's own fields), whichever version's class is asked (AutoConfig maps model_type "minicpmv" to one
        class); any other dict without "version" is read with `cls`, and so is one whose version `cls` already is
        (a subclass: a checkpoint's own remote-code class keeps its name). A version this package does not
        implement raises UnsupportedVersionError before anything is built."""
        from .versions import config_class_for  # (the versions' modules import this one)

        version_class = config_class_for(config_dict)
        describes_version = "version" in config_dict or version_class.model_version.name == "2.0"
        if describes_version and not issubclass(cls, version_class):
            return version_class.from_dict(config_dict, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    # --- what the rest of the project reads ------------------------------------------------------------

    @property
    def slice_settings(self) -> SliceSettings:
        return slice_settings_from_config(self)

    @property
    def llm_config(self) -> PretrainedConfig:
        """A plain config of the version's LLM (LlamaConfig for 2.5), without the multimodal fields."""
        fields = {k: v for k, v in super().to_dict().items() if k not in _MULTIMODAL_KEYS}
        llm_config = self.model_version.llm_config_class(**fields)
        llm_config._attn_implementation = self._attn_implementation
        return llm_config

    # --- the published layout on disk ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        rope = output.pop("rope_parameters", None) or {}
        output["rope_theta"] = float(rope.get("rope_theta", self.model_version.rope_theta))
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        output["rope_scaling"] = dict(scaling, rope_type=rope["rope_type"]) if scaling else None
        if isinstance(output.get("vision_config"), dict):
            output["vision_config"]["model_type"] = self.model_version.vision_config_model_type
        output["slice_config"] = dict(self.slice_config, model_type="minicpmv")
        output.setdefault("auto_map", PUBLISHED_AUTO_MAP)
        output.setdefault("architectures", ["MiniCPMV"])
        if "dtype" in output:  # transformers 4.40 reads torch_dtype
            output["torch_dtype"] = output["dtype"]
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        # The full dict, so that every field the hub code reads is written explicitly.
        output = self.to_dict()
        output.pop("_name_or_path", None)
        return output


_MULTIMODAL_KEYS = {
    "query_num",
    "image_size",
    "patch_size",
    "drop_vision_last_layer",
    "batch_vision_input",
    "slice_mode",
    "slice_config",
    "vision_config",
    "auto_map",
    "architectures",
    "model_type",
    "version",
    "mm_use_im_start_end",
    "rope_theta",
    "rope_scaling",
    "transformers_version",
    "torch_dtype",
}
