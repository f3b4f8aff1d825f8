"""Stand-in for the hub's configuration_minicpm.py (see modeling_minicpmv.py beside it)."""

from finetune.model.configuration import MiniCPMVConfig as _Native


class MiniCPMVConfig(_Native):
    is_remote_code_standin = True
