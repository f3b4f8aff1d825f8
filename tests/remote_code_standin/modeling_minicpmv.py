"""A stand-in for the hub's remote code (modeling_minicpmv.py), used only to test that
`trust_remote_code=True` dispatches to the checkpoint's own code and that training runs on such a class.
The real published file does not load on transformers 5; this one exposes the same interface."""

from finetune.model.modeling import MiniCPMV as _Native

from .configuration_minicpm import MiniCPMVConfig


class MiniCPMV(_Native):
    config_class = MiniCPMVConfig
    is_remote_code_standin = True
