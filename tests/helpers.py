"""finetune.py command lines for the tiny model, the launcher's environment and a two-process DeepSpeed run, a free
port for process groups and a golden case as model input: shared by the test files.

(pytest puts tests/ on sys.path, as it does for conftest.py: test files import this as `from helpers import ...`.)
Later flags override earlier ones (argparse keeps the last value), so a test passes the value it needs as an extra.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "finetune" / "finetune_lora.sh"
PYTHON_BIN = Path(sys.executable).parent  # the venv running the tests: its torchrun, its python


def path_flags(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The three paths every run names; with nothing else, finetune.py's own defaults apply."""
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out), *extra]


def training_flags(*extra: str) -> list[str]:
    """Quick, quiet, reproducible CPU training: batch 2, a learning rate the tiny model visibly learns at, seed 0,
    a loss logged every step, nothing saved but the final adapter, no reporting, no data-loader workers."""
    return [
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none",
        "--save_strategy", "no", "--learning_rate", "2e-3", "--warmup_steps", "0", "--seed", "0",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The paths and the standard training flags, then the test's own."""
    return path_flags(model, data, out, *training_flags(*extra))


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous (other runs may hold the default)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def case_data(case: dict) -> dict:
    """A golden case as the published `data` argument: one row, position ids 0.., its images (if any)."""
    return {
        "input_ids": case["input_ids"][None],
        "position_ids": torch.arange(len(case["input_ids"]))[None],
        "pixel_values": [case.get("pixel_values", [])],
        "tgt_sizes": [case["tgt_sizes"]],
        "image_bound": [case["image_bound"]],
    }


def quick_launcher_env(model: Path, data: Path, out: Path, **settings: str) -> dict:
    """finetune_lora.sh's environment for a quick CPU run: one process, no DeepSpeed, 2 steps; LLM_TYPE only if
    given in `settings` (which override the rest)."""
    env = {name: value for name, value in os.environ.items() if name != "LLM_TYPE"}
    env.update(MODEL=str(model), DATA=str(data), OUTPUT_DIR=str(out), MAX_STEPS="2", REPORT_TO="none",
               SAVE_STEPS="100", GPUS_PER_NODE="1", DS_CONFIG="", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PATH=f"{PYTHON_BIN}:{os.environ['PATH']}", **settings)  # fmt: skip
    return env


def deepspeed_two_process_run(model: Path, data: Path, work: Path, stage: str) -> Path:
    """finetune.py under torchrun on two CPU processes with ds_config_<stage>.json, 2 steps of one sample each;
    checks both ranks ran DeepSpeed in one group to the end and the saved adapter holds whole LoRA tensors (ZeRO-3
    gathers its partitions for saving). Returns the output directory."""
    from safetensors.torch import load_file

    out, report = work / "out", work / "report"
    args = base_args(model, data, out, "--max_steps", "2", "--per_device_train_batch_size", "1",
                     "--loss_chunk_size", "4", "--deepspeed", str(ROOT / "finetune" / f"ds_config_{stage}.json"))  # fmt: skip
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "finetune" / "finetune.py"), *args]  # fmt: skip
    env = dict(
        os.environ, FINETUNE_RUN_REPORT=str(report), PATH=f"{PYTHON_BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1"
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(report.glob("rank*.json"))]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["wrapper"] == "DeepSpeedEngine" and rank["num_processes"] == 2 and rank["global_step"] == 2
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(tensor.numel() > 0 for tensor in saved.values())
    assert any("q_proj.lora_A" in name for name in saved)
    return out
