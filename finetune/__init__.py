"""MiniCPM-V fine-tuning suite.

Importing the package registers the native MiniCPM-V models (MiniCPM-Llama3-V-2.5, MiniCPM-V 2.6 and 2.0) with transformers' Auto classes for
model_type "minicpmv", so `AutoModel.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)` load a
published checkpoint directory without network access or trust_remote_code. With `trust_remote_code=True` and
the hub's code files present, transformers uses the hub classes instead.
"""

import logging
import os
import warnings

# transformers 5.2x renamed gradient_checkpointing -> activation_checkpointing; the old names are what 5.17
# understands (and what PEFT calls), so they stay, without the rename notice in every command's output.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
# bitsandbytes' CPU backend (the optional --q_lora extra) warns at import that an optional hub-downloaded kernel
# package is missing; that kernel is never used here and the warning would land in every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402

# DeepSpeed warns in every process that imports it on a machine without a GPU that it is "unable to detect" one;
# naming the CPU accelerator up front (inherited by torchrun's workers) says the same without the warning.
if "DS_ACCELERATOR" not in os.environ and not (
    torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
):
    os.environ["DS_ACCELERATOR"] = "cpu"

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .model import MiniCPMV, MiniCPMVConfig, MiniCPMVTokenizerFast  # noqa: E402
from .model.tokenization import LlamaTokenizerWrapper  # noqa: E402
from .model.versions import CONFIG_CLASSES, MiniCPMV2Config  # noqa: E402


def _register() -> None:
    # One config class per model_type: MiniCPMVConfig.from_dict hands a config.json to the class of the version
    # its "version" field names (refusing versions not implemented); every version's class maps to MiniCPMV.
    AutoConfig.register("minicpmv", MiniCPMVConfig, exist_ok=True)
    for config_class in CONFIG_CLASSES.values():
        AutoModel.register(config_class, MiniCPMV, exist_ok=True)
        AutoModelForCausalLM.register(config_class, MiniCPMV, exist_ok=True)
        AutoTokenizer.register(config_class, fast_tokenizer_class=MiniCPMVTokenizerFast, exist_ok=True)
    # MiniCPM-V 2.0's tokenizer_config.json names its own class: registered under that name (see the class).
    AutoTokenizer.register(MiniCPMV2Config, fast_tokenizer_class=LlamaTokenizerWrapper, exist_ok=True)


_register()

__all__ = ["MiniCPMV", "MiniCPMVConfig", "MiniCPMVTokenizerFast"]
