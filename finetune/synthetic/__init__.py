"""MiniCPM-V checkpoints made locally with random weights, for the demo, the tests, the planner and benchmarks.

`make demo` starts from a tiny checkpoint in the published layout (`python -m finetune.build_tiny`); the tests
build the same one; `finetune.plan` and the benchmarks build the full-size architecture on the meta device or
straight on the GPU. None of it needs the network or the real weights. The model itself is `finetune.model`.
"""

from .checkpoints import (
    DEMO_CONFIG_OVERRIDES,
    REFERENCE_CONFIG,
    build_full_size_random,
    build_tiny_checkpoint,
    build_tiny_model,
    full_size_config,
    tiny_config,
    write_published_shards,
    write_sidecar_files,
)
from .tokenizer import SPECIAL_TOKENS, build_tokenizer

__all__ = [
    "DEMO_CONFIG_OVERRIDES", "REFERENCE_CONFIG", "SPECIAL_TOKENS", "build_full_size_random", "build_tiny_checkpoint", "build_tiny_model",
    "build_tokenizer", "full_size_config", "tiny_config", "write_published_shards", "write_sidecar_files",
]  # fmt: skip
