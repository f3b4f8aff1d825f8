"""A newcomer's mistakes end in one line, early: the launcher's preflight (before torchrun), the tools' --model and
--adapter checks, and unknown flags with the closest known one."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LAUNCHER, PYTHON_BIN

from finetune.arguments import UsageError, parse_arguments
from finetune.preflight import preflight


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(4, 2)


def args(model: Path | str, data: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        *extra,
    ]


# --- unknown flags ---------------------------------------------------------------------------------------------------


def test_an_unknown_training_flag_names_the_closest_known_one(tmp_path):
    with pytest.raises(UsageError, match=r"^unknown flag --lora_rank \(did you mean --lora_r\?\)$"):
        parse_arguments(args("org/model", "x.json", tmp_path, "--lora_rank", "8"))
    with pytest.raises(UsageError, match=r"--max_steps.*invalid int value"):  # argparse's error, not its usage block
        parse_arguments(args("org/model", "x.json", tmp_path, "--max_steps", "ten"))


@pytest.mark.parametrize("tool", ["chat", "evaluate", "check_data"])
def test_the_tools_answer_an_unknown_flag_in_one_line_with_the_closest(tool, capsys):
    module = __import__(f"finetune.{tool}", fromlist=["build_parser"])
    with pytest.raises(SystemExit) as stop:
        module.build_parser().parse_args(["q", "--model", "m", "--data", "d", "--adaptor", "a"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    close = "--adapter" if tool != "check_data" else None
    assert "unknown flag --adaptor" in err and (close is None or f"did you mean {close}?" in err), err


# --- the tools' --model / --adapter -----------------------------------------------------------------------------


def run_tool(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    module = __import__(f"finetune.{tool}", fromlist=["main"])
    entry = getattr(module, "cli", None) or module.main
    try:
        code = entry(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("tool", ["chat", "evaluate", "check_data"])
def test_the_tools_check_model_and_adapter_first(tool, tiny_model, tiny_adapter, demo, tmp_path, capsys):
    data = str(demo / "train.json")
    extra = {"chat": ["hello"], "evaluate": ["--data", data], "check_data": ["--data", data]}[tool]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--model", str(tmp_path / "mistyped")], f"--model {tmp_path / 'mistyped'}: no such directory"),
        (["--model", "mistyped-model"], "--model mistyped-model: no such directory"),
        (["--model", str(empty)], f"--model {empty}: not a model directory: missing config.json"),
    ]
    if tool != "check_data":
        cases.append(
            (
                ["--model", str(tiny_model), "--adapter", str(tmp_path / "nope")],
                f"--adapter {tmp_path / 'nope'}: no such directory",
            )
        )
        cases.append(
            (["--model", str(tiny_model), "--adapter", str(empty)], f"--adapter {empty}: no adapter_config.json there")
        )
    for flags, expected in cases:
        code, err = run_tool(tool, [*extra, *flags], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (flags, err)
        assert "sentencepiece" not in err and "Traceback" not in err


# --- the preflight ------------------------------------------------------------------------------------------------


def test_preflight_stops_each_mistake_without_touching_the_output_dir(tiny_model, demo, tmp_path):
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    data = demo / "train.json"
    mistakes = [
        (args(tiny_model, tmp_path / "missing.json", out), "data file not found"),
        (args(empty, data, out), f"--model_name_or_path {empty}: not a model directory: missing config.json"),
        (args(tmp_path / "typo", data, out), "no such directory"),
        (args(tiny_model, data, out, "--lora_rank", "8"), "did you mean --lora_r?"),
    ]
    for argv, expected in mistakes:
        with pytest.raises(UsageError, match=None) as error:
            preflight(argv)
        assert expected in str(error.value)
    preflight(args(tiny_model, data, out))
    assert not out.exists(), "the preflight must not create the output directory"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError, match="holds another run"):
        preflight(args(tiny_model, data, tmp_path / "taken"))
    preflight(args(tiny_model, data, tmp_path / "taken", "--overwrite_output_dir", "true"))
    assert (tmp_path / "taken" / "adapter_model.safetensors").exists(), "the preflight removes nothing"


def launcher_env(tmp_path: Path, **extra: str) -> tuple[dict, Path]:
    """An environment for finetune_lora.sh with a torchrun that only records that it was started."""
    fake, started = tmp_path / "bin", tmp_path / "torchrun-started"
    fake.mkdir()
    torchrun = fake / "torchrun"
    torchrun.write_text(f'#!/bin/sh\ntouch "{started}"\n')
    torchrun.chmod(torchrun.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{fake}:{PYTHON_BIN}:{os.environ['PATH']}", PYTHON=sys.executable, GPUS_PER_NODE="1",
               OUTPUT_DIR=str(tmp_path / "out"), **extra)  # fmt: skip
    return env, started


@pytest.mark.slow
def test_launcher_stops_an_empty_model_folder_in_one_line_before_torchrun(demo, tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    env, started = launcher_env(tmp_path, MODEL=str(empty), DATA=str(demo / "train.json"))
    result = subprocess.run(["sh", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        == f"finetune.py: error: --model_name_or_path {empty}: not a model directory: missing config.json"
    )
    assert not started.exists() and not (tmp_path / "out").exists()
    result = subprocess.run(
        ["sh", str(LAUNCHER), "--lora_rank", "8"],
        env=dict(env, PREFLIGHT="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and started.exists(), "PREFLIGHT=0 goes straight to torchrun"
