"""MiniCPM-V checkpoints made locally with random weights, for the demo, the tests, the planner and benchmarks.

`make demo` starts from a tiny checkpoint in the published layout (`python -m finetune.build_tiny`); the tests
build the same one (and its MiniCPM-V 2.6 and 2.0 counterparts, `version="2.6"` / `"2.0"`); `finetune.plan` and
the benchmarks build the full-size architecture on the meta device or straight on the GPU. None of it needs the
network or the real weights. The model itself is `finetune.model`.
"""

from .checkpoints import (
    DEMO_CONFIG_OVERRIDES,
    REFERENCE_CONFIG,
    REFERENCE_CONFIG_V2,
    REFERENCE_CONFIG_V2_6,
    REFERENCE_CONFIGS,
    build_full_size_random,
    build_tiny_checkpoint,
    build_tiny_model,
    full_size_config,
    tiny_config,
    tiny_config_fields,
    write_published_shards,
    write_sidecar_files,
)
from .tokenizer import SPECIAL_TOKENS, build_tokenizer
from .tokenizer_v2 import ROLE_MARKERS, SPECIAL_IDS_V2
from .tokenizer_v2_6 import ADDED_TOKENS_V2_6

__all__ = [
    "ADDED_TOKENS_V2_6", "DEMO_CONFIG_OVERRIDES", "REFERENCE_CONFIG", "REFERENCE_CONFIGS", "REFERENCE_CONFIG_V2",
    "REFERENCE_CONFIG_V2_6", "ROLE_MARKERS", "SPECIAL_IDS_V2", "SPECIAL_TOKENS", "build_full_size_random",
    "build_tiny_checkpoint", "build_tiny_model", "build_tokenizer", "full_size_config", "tiny_config",
    "tiny_config_fields", "write_published_shards", "write_sidecar_files",
]  # fmt: skip
