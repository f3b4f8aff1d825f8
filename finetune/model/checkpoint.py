"""Checking a checkpoint directory before loading, so that nothing is ever half-loaded with random weights.

transformers warns and initialises randomly when tensors are missing; a fine-tune on such a model wastes a
GPU-day before anyone notices. We read only the safetensors headers (no tensor data) and compare every name
and shape with the architecture the config describes: the version's, as config.json's "version" names it (so a
MiniCPM-V 2.6 checkpoint is expected to hold its Qwen2 q/k/v biases, and a 2.5 one none).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel

from .versions import UnsupportedVersionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded faithfully; the message names the file or tensor."""


def expected_shapes(config: PretrainedConfig, model_class: type[PreTrainedModel]) -> dict[str, tuple[int, ...]]:
    """Every persistent tensor of `model_class` built from `config`, on the meta device (no memory)."""
    return dict(_expected_shapes_cached(config.to_json_string(use_diff=False), model_class))


@lru_cache(maxsize=4)
def _expected_shapes_cached(
    config_json: str, model_class: type[PreTrainedModel]
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    config = model_class.config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = model_class(config)
    return tuple((name, tuple(t.shape)) for name, t in model.state_dict().items())


def stored_shapes(directory: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, file) for every tensor in the directory's safetensors file(s), headers only."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{directory / INDEX_FILE}: not a safetensors index ({error})") from error
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}: not a MiniCPM-V checkpoint directory")

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = (tuple(handle.get_slice(key).get_shape()), name)
        except CheckpointError:
            raise
        except Exception as error:  # safetensors raises its own types for truncated or corrupt headers
            raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from error
    if weight_map is not None:
        for key, file in weight_map.items():
            if key not in shapes:
                raise CheckpointError(f"{directory / file}: tensor {key} is listed in {INDEX_FILE} but not stored")
    return shapes


def validate_checkpoint_dir(
    directory: str | Path, model_class: type[PreTrainedModel], config: PretrainedConfig | None = None
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Raise CheckpointError unless `directory` holds exactly the tensors of `model_class` (the native MiniCPMV)
    built from `config` (default: the directory's config.json, read with `model_class.config_class`); returns
    what was read on the way, `stored_shapes(directory)`. The model class is a parameter, not an import, so that
    the model can run this check while loading without this module depending on it."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if config is None:
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing: not a model directory")
        raw = json.loads(config_path.read_text())
        model_type = model_class.config_class.model_type
        if raw.get("model_type") != model_type:
            raise CheckpointError(
                f"{config_path}: model_type is {raw.get('model_type')!r}, expected {model_type!r} (MiniCPM-V)"
            )
        try:  # the config class of the version config.json names; a version not implemented is refused here
            config = model_class.config_class.from_dict(raw)
        except UnsupportedVersionError as error:
            raise CheckpointError(f"{config_path}: {error}") from error
    stored = stored_shapes(directory)
    if getattr(config, "quantization_config", None) is not None:
        return stored  # packed tensors of other shapes: transformers checks those
    expected = expected_shapes(config, model_class)
    problems = []
    for name, shape in expected.items():
        if name not in stored:
            problems.append(f"tensor {name} {list(shape)} is missing")
        elif stored[name][0] != shape:
            problems.append(
                f"tensor {name} in {stored[name][1]} has shape {list(stored[name][0])}, expected {list(shape)}"
            )
    for name in stored.keys() - expected.keys():
        problems.append(f"tensor {name} in {stored[name][1]} is not part of MiniCPM-V")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{directory}: " + "; ".join(problems[:5]) + more)
    return stored
