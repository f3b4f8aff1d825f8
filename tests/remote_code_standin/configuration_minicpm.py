"""Stand-in for the hub's configuration_minicpm.py of MiniCPM-Llama3-V-2.5 (see modeling_minicpmv.py beside it).

It has the published classes' surface and nothing more, so that a test on it fails wherever the suite reads a
field only the native config has (`slice_settings`, a dict `slice_config`, ...):
- `MiniCPMVSliceConfig(PretrainedConfig)`: `patch_size` (14), `max_slice_nums` (9), `scale_resolution` (448).
- `MiniCPMVConfig(LlamaConfig)`: `use_cache`, `query_num` (64), `image_size` (448), `drop_vision_last_layer`
  (True), `batch_vision_input` (True), `slice_config` (a MiniCPMVSliceConfig object; `max_slice_nums=1` when
  config.json has none), `slice_mode` (always True), `vision_config` (an Idefics2VisionConfig), `patch_size`
  (always 14); every other config.json key lands as a plain attribute (LlamaConfig's kwargs handling).
"""

from transformers import LlamaConfig, PretrainedConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig


class MiniCPMVSliceConfig(PretrainedConfig):
    model_type = "minicpmv"

    def __init__(self, patch_size=14, max_slice_nums=9, scale_resolution=448, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution


class MiniCPMVConfig(LlamaConfig):
    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    default_vision_config = {
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "model_type": "idefics2",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    }

    def __init__(
        self,
        use_cache=True,
        query_num=64,
        image_size=448,
        drop_vision_last_layer=True,
        batch_vision_input=True,
        slice_config=None,
        vision_config=None,
        **kwargs,
    ):
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input

        if slice_config is None:
            self.slice_config = MiniCPMVSliceConfig(max_slice_nums=1)
        else:
            self.slice_config = MiniCPMVSliceConfig(**slice_config)
        self.slice_mode = True

        if vision_config is None:
            self.vision_config = Idefics2VisionConfig(**self.default_vision_config)
        elif isinstance(vision_config, dict):
            self.vision_config = Idefics2VisionConfig(**vision_config)
        elif isinstance(vision_config, Idefics2VisionConfig):
            self.vision_config = vision_config

        self.patch_size = 14

        super().__init__(**kwargs)
