"""What every command line of the suite shares: unknown flags answered with the closest known one, argparse errors
in one line (no usage block), and the model / adapter directory checked before anything is loaded, so that a
mistyped path is one line naming the flag, not a hub traceback. Cheap to import: no model code runs."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

UNRECOGNIZED = "unrecognized arguments: "


def did_you_mean(flag: str, options: Iterable[str]) -> str:
    """' (did you mean --x?)' for the known long option closest to `flag` (its value after '=' ignored), or ''.
    Of difflib's close matches the one sharing the longest start with `flag` wins (`--lora_rank` -> `--lora_r`,
    not the equally similar `--local_rank`): a mistyped flag usually goes wrong at its end."""
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, [o for o in options if o.startswith("--")], n=5, cutoff=0.6)
    if not close:
        return ""
    best = max(close, key=lambda option: len(os.path.commonprefix([name, option])))  # max keeps difflib's order on ties
    return f" (did you mean {best}?)"


def unknown_flags_message(unknown: list[str], options: Iterable[str]) -> str:
    """One line for the arguments a parser did not use, each flag with its closest known option."""
    options = list(options)
    flags = [arg for arg in unknown if arg.startswith("-")]
    if not flags:
        return f"unexpected arguments: {' '.join(unknown)}"
    return "; ".join(f"unknown flag {flag.split('=', 1)[0]}{did_you_mean(flag, options)}" for flag in flags)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `PROG: error: MESSAGE`, exit status 2, without the usage block; an
    unknown flag names the closest known one (`--adaptor` -> did you mean --adapter?)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith(UNRECOGNIZED):
            message = unknown_flags_message(message[len(UNRECOGNIZED) :].split(), self._option_string_actions)
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


class FlagParser(ArgumentParser):
    """An ArgumentParser whose long options take both spellings, `--gpu-mem` and `--gpu_mem` (finetune.py's flags
    are underscored, the planner's and the tuner's were dashed: either works for every one of them)."""

    def add_argument(self, *names, **kwargs):
        spellings: list[str] = []
        for name in names:
            variants = [name]
            if name.startswith("--"):
                variants += ["--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")]
            spellings += [v for v in variants if v not in spellings]
        return super().add_argument(*spellings, **kwargs)


def model_dir_problem(path: str, weights: bool = True) -> str | None:
    """What is wrong with `path` as a model (a hub id or a checkpoint directory), or None. A local directory must
    hold config.json (and, with `weights`, exactly the native model's tensors); anything that is neither an
    existing directory nor shaped like a hub id ("org/name") is a mistyped path."""
    from finetune.model.loading import looks_like_hub_id

    directory = Path(path)
    if not directory.is_dir():
        if directory.exists():
            return f"{path}: not a directory"
        return None if looks_like_hub_id(path) else f"{path}: no such directory"
    if not (directory / "config.json").is_file():
        return f"{path}: not a model directory: missing config.json"
    if not weights:
        return None
    from finetune.model.checkpoint import CheckpointError, validate_checkpoint_dir
    from finetune.model.modeling import MiniCPMV

    try:
        validate_checkpoint_dir(directory, MiniCPMV)
    except CheckpointError as error:
        return str(error)
    return None


def adapter_dir_problem(path: str) -> str | None:
    """What is wrong with `path` as a LoRA adapter (a training output_dir), or None."""
    directory = Path(path)
    if not directory.is_dir():
        return f"{path}: no such directory"
    if not (directory / "adapter_config.json").is_file():
        return f"{path}: no adapter_config.json there (expected a training output_dir)"
    return None


def check_model_flags(prog: str, model: str, adapter: str | None = None, weights: bool = True) -> None:
    """Exit 2 with one line naming --model / --adapter when either cannot be loaded, before anything is."""
    for flag, problem in (
        ("--model", model_dir_problem(model, weights)),
        ("--adapter", adapter and adapter_dir_problem(adapter)),
    ):
        if problem:
            print(f"{prog}: error: {flag} {problem}", file=sys.stderr)
            sys.exit(2)
