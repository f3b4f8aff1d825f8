"""MiniCPM-V fine-tuning suite.

Importing the package registers the native MiniCPM-Llama3-V-2.5 with transformers' Auto classes for
model_type "minicpmv", so `AutoModel.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)` load a
published checkpoint directory without network access or trust_remote_code. With `trust_remote_code=True` and
the hub's code files present, transformers uses the hub classes instead.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .model import MiniCPMV, MiniCPMVConfig, MiniCPMVTokenizerFast


def _register() -> None:
    AutoConfig.register("minicpmv", MiniCPMVConfig, exist_ok=True)
    AutoModel.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
    AutoTokenizer.register(MiniCPMVConfig, fast_tokenizer_class=MiniCPMVTokenizerFast, exist_ok=True)


_register()

__all__ = ["MiniCPMV", "MiniCPMVConfig", "MiniCPMVTokenizerFast"]
