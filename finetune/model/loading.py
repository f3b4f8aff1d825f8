"""Loading a MiniCPM-V checkpoint with the native class or with the checkpoint's own (hub) code.

transformers 5 prefers a class registered explicitly with the Auto classes (ours, once `finetune` is
imported) over a checkpoint's remote code, even with `trust_remote_code=True`. So the remote code is loaded
here directly from the checkpoint's `auto_map` when asked for; everything else goes through AutoModel.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, PretrainedConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module

# The dtypes the commands accept by name.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def looks_like_hub_id(text: str) -> bool:
    """ "org/name" and nothing path-like: absolute, relative ("./", "../", "~") or deeper paths are local paths."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def load_pretrained(path: str, *, trust_remote_code: bool = False, **kwargs):
    """The model at `path` (hub id or directory): native class, or with trust_remote_code the checkpoint's code."""
    if not trust_remote_code:
        return AutoModel.from_pretrained(path, **kwargs)
    config_dict, _ = PretrainedConfig.get_config_dict(path)
    auto_map = config_dict.get("auto_map") or {}
    if "AutoModel" not in auto_map or "AutoConfig" not in auto_map:
        raise ValueError(f"{path}: config.json has no auto_map for AutoConfig/AutoModel: no remote code to trust")
    config_class = get_class_from_dynamic_module(auto_map["AutoConfig"], path)
    model_class = get_class_from_dynamic_module(auto_map["AutoModel"], path)
    config = config_class.from_pretrained(path, trust_remote_code=True)
    return model_class.from_pretrained(path, config=config, trust_remote_code=True, **kwargs)
