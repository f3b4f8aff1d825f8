"""The benchmark's suites: what each runs, how its rows are run, and the markdown table it prints.

    python -m bench SUITE [--smoke] [--gpus N] [--json PATH] [--markdown PATH] [--calibration PATH] ...
    python -m bench headline|memory --version 2.6|2.0 [...]
    python -m bench --list

Suites (bench/README.md has their current results and how they are measured):

    headline  the plain transformers + PEFT baseline against finetune.py, text and multimodal, in one run
    memory    peak memory of the 1-GPU recipes at 2048 tokens (memory levers, ZeRO-2 offload) against the baseline
    qlora     4-bit NF4 LLM against bf16, LoRA only, with and without the memory levers
    scaling   ZeRO-2 on 1 GPU and on N GPUs (torchrun), text and multimodal
    zero3     ZeRO-3 (lean config, 8-bit AdamW) on N GPUs: peak memory per GPU
    data      data preparation speed on one CPU core

A training suite has two kinds of rows. Baseline rows (bench.loop) run in this process, one after the other.
finetune.py rows (bench.trainer_bench) run finetune.py's whole training in a process of their own, through
`python -m torch.distributed.run` (their peak memory and compile caches are their own). Every number of a table
comes from this one run, and the ratios below it are computed from the table's rows.

`--version 2.6` runs the headline and memory suites on MiniCPM-V 2.6 (default: MiniCPM-Llama3-V-2.5): its
full-size random checkpoint, its demo tokenizer and chat template for the sets, `--llm_type qwen` for
finetune.py; the planner's column is its 2.5 calibration scaled to 2.6's sizes, and `--calibration` records
its rows as `<row>_v2_6`. `--version 2.0` does the same for MiniCPM-V 2.0 (`--llm_type minicpm`, its
`<用户>`/`<AI>` format, records `<row>_v2_0`).

`--smoke` runs every suite on the CPU with the tiny test architecture and a few steps: the same rows, the same
table and ratios, numbers that say nothing. There, finetune.py rows without DeepSpeed run in this process (a
torch start-up a row saved), and rows that need a GPU (QLoRA, CPU-offloaded optimizer) are reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import Workspace
from finetune.plan import PLANNED_VERSIONS

ROOT = Path(__file__).resolve().parent.parent
DS_CONFIGS = ROOT / "finetune"
DEFAULT_WORK_DIR = Path(os.environ.get("BENCH_WORK_DIR", "/tmp/minicpmv-bench"))
UPSTREAM, LORA_ONLY = ("--tune_vision", "true"), ("--tune_vision", "false")
MODEL_VERSIONS = ("2.5", "2.6", "2.0")  # the MiniCPM-V versions (finetune.model.versions names) the suites can run
VERSIONED_SUITES = ("headline", "memory")  # the suites that run on a version other than 2.5
LEVERS = ("--optim", "adamw_bnb_8bit", "--loss_chunk_size", "512")  # 8-bit AdamW states, a 512-label loss chunk


@dataclass(frozen=True)
class BaselineRow:
    """A row of the plain transformers + PEFT loop (bench.loop), run in this process."""

    name: str
    what: str
    loop_row: str  # a bench.loop.ROW_BY_NAME key
    text_rows: int = 1
    mm_set: str = "mm"  # the workspace's multimodal set (bench.data)


@dataclass(frozen=True)
class TrainerRow:
    """A row of finetune.py's own training (bench.trainer_bench): `flags` after the common ones."""

    name: str
    what: str
    data: str  # text | mm | mm_upstream_like
    flags: tuple[str, ...] = ()
    gpus: int = 1
    steps: int = 7  # optimizer steps in all
    warmup: int = 2  # of which untimed
    sync: str = "all"  # bench.trainer_bench.SYNC_MODES
    gpu_only: str = ""  # why the row cannot run on the CPU (skipped in CPU smoke runs)

    @property
    def deepspeed(self) -> bool:
        return "--deepspeed" in self.flags


@dataclass(frozen=True)
class Ratio:
    label: str
    numerator: str  # row names
    denominator: str
    metric: str  # a key of the rows' results


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[dict], str]


@dataclass(frozen=True)
class Suite:
    name: str
    summary: str
    rows: Callable[[int], list[BaselineRow | TrainerRow]]  # N GPUs -> the rows
    ratios: Callable[[int], list[Ratio]]
    columns: tuple[str, ...]


# --- the suites ----------------------------------------------------------------------------------------------


def headline_rows(gpus: int) -> list[BaselineRow | TrainerRow]:
    speed = ("--gradient_checkpointing", "false")  # with finetune.py's other defaults: compiled layers, varlen
    mm = (*LEVERS, "--per_device_train_batch_size", "5")
    return [
        BaselineRow(
            "baseline", "plain transformers + PEFT, LoRA only, checkpointed, 1 text row a step", "text_lora_baseline"
        ),
        BaselineRow("baseline_nogc", "the same without checkpointing", "text_lora_baseline_nogc"),
        BaselineRow(
            "baseline_2rows", "the checkpointed baseline at 2 text rows a step", "text_lora_baseline", text_rows=2
        ),
        TrainerRow(
            "speed_mode",
            "finetune.py as shipped, LoRA only, no checkpointing, 1 text row a step",
            "text",
            (*LORA_ONLY, *speed),
            steps=14,
            warmup=5,
            sync="window",
        ),  # fmt: skip
        TrainerRow(
            "speed_mode_2rows",
            "the same at 2 text rows a step",
            "text",
            (*LORA_ONLY, *speed, "--per_device_train_batch_size", "2"),
            steps=14,
            warmup=5,
            sync="window",
        ),  # fmt: skip
        BaselineRow(
            "mm_baseline_upstream",
            "plain transformers + PEFT, upstream recipe, 4 samples a step padded",
            "mm_upstream_baseline",
            mm_set="mm_upstream_like",
        ),  # fmt: skip
        BaselineRow("mm_baseline_lora", "the same, LoRA only", "mm_lora_baseline", mm_set="mm_upstream_like"),
        TrainerRow(
            "mm_upstream",
            "finetune.py, upstream recipe, 5 samples a step packed, 8-bit AdamW, loss chunk 512",
            "mm_upstream_like",
            (*UPSTREAM, *mm),
            steps=10,
            warmup=4,
        ),  # fmt: skip
        TrainerRow("mm_lora", "the same, LoRA only", "mm_upstream_like", (*LORA_ONLY, *mm), steps=10, warmup=4),
    ]


def headline_ratios(gpus: int) -> list[Ratio]:
    return [
        Ratio(
            "text: speed mode / checkpointed baseline, 1 row a step (tokens/s)",
            "speed_mode",
            "baseline",
            "tokens_per_s",
        ),
        Ratio(
            "text: speed mode at 2 rows / checkpointed baseline at 1 row (tokens/s)",
            "speed_mode_2rows",
            "baseline",
            "tokens_per_s",
        ),
        Ratio(
            "text: speed mode at 2 rows / checkpointed baseline at 2 rows (tokens/s)",
            "speed_mode_2rows",
            "baseline_2rows",
            "tokens_per_s",
        ),
        Ratio(
            "text: speed mode / baseline without checkpointing, 1 row a step (tokens/s)",
            "speed_mode",
            "baseline_nogc",
            "tokens_per_s",
        ),
        Ratio(
            "multimodal, upstream recipe: finetune.py / baseline (samples/s)",
            "mm_upstream",
            "mm_baseline_upstream",
            "samples_per_s",
        ),
        Ratio(
            "multimodal, LoRA only: finetune.py / baseline (samples/s)", "mm_lora", "mm_baseline_lora", "samples_per_s"
        ),
    ]


OFFLOAD_NEEDS = "DeepSpeedCPUAdam is built on first use (a C++ toolchain, minutes)"


def memory_rows(gpus: int) -> list[BaselineRow | TrainerRow]:
    offload = ("--deepspeed", str(DS_CONFIGS / "ds_config_zero2_offload.json"), "--loss_chunk_size", "512")
    return [
        BaselineRow(
            "baseline_upstream", "plain transformers + PEFT, upstream recipe, checkpointed", "text_upstream_baseline"
        ),
        TrainerRow(
            "upstream_adamw",
            "finetune.py, upstream recipe, its defaults (fp32 AdamW states, loss chunk 2048)",
            "text",
            UPSTREAM,
        ),
        TrainerRow("upstream_8bit_c512", "the same with 8-bit AdamW and loss chunk 512", "text", (*UPSTREAM, *LEVERS)),
        TrainerRow(
            "upstream_zero2_offload_c512",
            "the same with ZeRO-2, optimizer offloaded to the CPU, loss chunk 512",
            "text",
            (*UPSTREAM, *offload),
            gpu_only=OFFLOAD_NEEDS,
        ),  # fmt: skip
        BaselineRow("baseline_lora", "plain transformers + PEFT, LoRA only, checkpointed", "text_lora_baseline"),
        TrainerRow("lora_adamw", "finetune.py, LoRA only, its defaults", "text", LORA_ONLY),
        TrainerRow("lora_8bit_c512", "the same with 8-bit AdamW and loss chunk 512", "text", (*LORA_ONLY, *LEVERS)),
    ]


def memory_ratios(gpus: int) -> list[Ratio]:
    pairs = [("upstream_adamw", "baseline_upstream"), ("upstream_8bit_c512", "baseline_upstream"),
             ("upstream_zero2_offload_c512", "baseline_upstream"), ("lora_adamw", "baseline_lora"), ("lora_8bit_c512", "baseline_lora")]  # fmt: skip
    return [
        Ratio(f"peak allocated: {row} / {baseline}", row, baseline, "peak_allocated_gib") for row, baseline in pairs
    ]


QLORA_NEEDS = "finetune.py refuses --q_lora without CUDA (bitsandbytes' 4-bit kernels)"


def qlora_rows(gpus: int) -> list[BaselineRow | TrainerRow]:
    nf4 = ("--q_lora", "true")
    return [
        TrainerRow(
            "lora_adamw",
            "finetune.py, LoRA only, bf16 LLM, its defaults (fp32 AdamW states, loss chunk 2048)",
            "text",
            LORA_ONLY,
        ),
        TrainerRow(
            "lora_nf4_adamw", "the same with the LLM in 4-bit NF4", "text", (*LORA_ONLY, *nf4), gpu_only=QLORA_NEEDS
        ),
        TrainerRow("lora_8bit_c512", "LoRA only, bf16 LLM, 8-bit AdamW, loss chunk 512", "text", (*LORA_ONLY, *LEVERS)),
        TrainerRow(
            "lora_nf4_8bit_c512",
            "the same with the LLM in 4-bit NF4",
            "text",
            (*LORA_ONLY, *nf4, *LEVERS),
            gpu_only=QLORA_NEEDS,
        ),
    ]


def qlora_ratios(gpus: int) -> list[Ratio]:
    return [
        Ratio("defaults: NF4 / bf16, peak allocated", "lora_nf4_adamw", "lora_adamw", "peak_allocated_gib"),
        Ratio("defaults: NF4 / bf16, tokens/s", "lora_nf4_adamw", "lora_adamw", "tokens_per_s"),
        Ratio(
            "8-bit AdamW + chunk 512: NF4 / bf16, peak allocated",
            "lora_nf4_8bit_c512",
            "lora_8bit_c512",
            "peak_allocated_gib",
        ),
        Ratio("8-bit AdamW + chunk 512: NF4 / bf16, tokens/s", "lora_nf4_8bit_c512", "lora_8bit_c512", "tokens_per_s"),
    ]


def scaling_rows(gpus: int) -> list[BaselineRow | TrainerRow]:
    zero2 = (*UPSTREAM, "--deepspeed", str(DS_CONFIGS / "ds_config_zero2.json"))
    plural = lambda n: f"{n} GPU" + ("s" if n > 1 else "")  # noqa: E731
    return [
        TrainerRow(f"text_zero2_{plural(n).replace(' ', '').lower()}", f"finetune.py, upstream recipe, ZeRO-2, {plural(n)}, 1 text row a GPU a step",
                   "text", zero2, gpus=n, steps=10, warmup=4)
        for n in (1, gpus)
    ] + [
        TrainerRow(f"mm_zero2_{plural(n).replace(' ', '').lower()}", f"finetune.py, upstream recipe, ZeRO-2, {plural(n)}, 4 multimodal samples a GPU a step packed",
                   "mm", zero2, gpus=n, steps=10, warmup=4)
        for n in (1, gpus)
    ]  # fmt: skip


def scaling_ratios(gpus: int) -> list[Ratio]:
    return [
        Ratio(f"text: {gpus} GPUs / 1 GPU (tokens/s)", f"text_zero2_{gpus}gpus", "text_zero2_1gpu", "tokens_per_s"),
        Ratio(f"multimodal: {gpus} GPUs / 1 GPU (samples/s)", f"mm_zero2_{gpus}gpus", "mm_zero2_1gpu", "samples_per_s"),
    ]


def zero3_rows(gpus: int) -> list[BaselineRow | TrainerRow]:
    lean = ("--deepspeed", str(DS_CONFIGS / "ds_config_zero3_lean.json"), *LEVERS)
    return [
        TrainerRow(f"upstream_zero3_{gpus}gpus", f"finetune.py, upstream recipe, ZeRO-3 lean config, 8-bit AdamW, loss chunk 512, {gpus} GPUs",
                   "text", (*UPSTREAM, *lean), gpus=gpus),
        TrainerRow(f"lora_zero3_{gpus}gpus", "the same, LoRA only", "text", (*LORA_ONLY, *lean), gpus=gpus),
    ]  # fmt: skip


SUITES = {
    suite.name: suite
    for suite in [
        Suite(
            "headline",
            "the plain transformers + PEFT baseline against finetune.py, text and multimodal",
            headline_rows,
            headline_ratios,
            ("tokens/s", "samples/s", "step s", "MFU", "peak alloc GiB", "data wait"),
        ),
        Suite(
            "memory",
            "peak memory of the 1-GPU recipes, 2048-token text rows",
            memory_rows,
            memory_ratios,
            ("peak alloc GiB", "peak reserved GiB", "planner GiB", "tokens/s"),
        ),
        Suite(
            "qlora",
            "4-bit NF4 LLM against bf16, LoRA only, 2048-token text rows",
            qlora_rows,
            qlora_ratios,
            ("peak alloc GiB", "peak reserved GiB", "planner GiB", "tokens/s"),
        ),
        Suite(
            "scaling",
            "ZeRO-2 on 1 and on N GPUs",
            scaling_rows,
            scaling_ratios,
            ("GPUs", "tokens/s", "samples/s", "peak alloc GiB", "data wait"),
        ),
        Suite(
            "zero3",
            "ZeRO-3 on N GPUs, 2048-token text rows: memory per GPU",
            zero3_rows,
            lambda gpus: [],
            ("GPUs", "peak alloc GiB", "peak reserved GiB", "planner GiB", "tokens/s"),
        ),
    ]  # fmt: skip
}
DATA_SUITE = "data"
DATA_RATIOS = [
    Ratio("per-view PIL path / prepare_sample (mean ms)", "per-view PIL path: decode + slice_image + one strip per view",
          "prepare_sample (decode + slice + strips + tokenize)", "mean_ms"),
    Ratio("float path / prepare_sample (mean ms)", "float path: image_views (decode + slice + normalise)",
          "prepare_sample (decode + slice + strips + tokenize)", "mean_ms"),
]  # fmt: skip


# --- the table ----------------------------------------------------------------------------------------------


def _number(key: str, form: str) -> Callable[[dict], str]:
    return lambda result: "-" if result.get(key) is None else format(result[key], form)


COLUMNS = {
    column.title: column
    for column in [
        Column("GPUs", lambda r: str(r.get("gpus", 1))),
        Column("tokens/s", _number("tokens_per_s", ".0f")),
        Column("samples/s", _number("samples_per_s", ".2f")),
        Column("step s", _number("step_s_mean", ".3f")),
        Column("MFU", _number("mfu", ".1%")),
        Column("peak alloc GiB", _number("peak_allocated_gib", ".2f")),
        Column("peak reserved GiB", _number("peak_reserved_gib", ".2f")),
        Column("planner GiB", _number("planner_gib", ".2f")),
        Column("data wait", _number("data_wait_fraction", ".1%")),
        Column("mean ms", _number("mean_ms", ".2f")),
        Column("p50 ms", _number("p50_ms", ".2f")),
        Column("p95 ms", _number("p95_ms", ".2f")),
        Column("cpu ms", _number("cpu_ms", ".2f")),
    ]
}
DATA_COLUMNS = ("mean ms", "p50 ms", "p95 ms", "cpu ms")


def ratio_values(ratios: list[Ratio], results: list[dict]) -> list[dict]:
    """Each ratio of two rows' metric, from these results (None where a row has no such number)."""
    by_name = {result["row"]: result for result in results}
    out = []
    for ratio in ratios:
        top, bottom = (by_name.get(name, {}).get(ratio.metric) for name in (ratio.numerator, ratio.denominator))
        value = top / bottom if top is not None and bottom else None
        out.append(
            {
                "label": ratio.label,
                "numerator": ratio.numerator,
                "denominator": ratio.denominator,
                "metric": ratio.metric,
                "value": value,
            }
        )
    return out


def markdown(header: dict, columns: tuple[str, ...], results: list[dict], ratios: list[dict]) -> str:
    lines = [f"## python -m bench {header['suite']}", ""]
    lines += [f"- {key}: {header[key]}" for key in ("command", "date", "device", "versions", "workload")]
    described = any("what" in result for result in results)
    lines += ["", "| row |" + (" what runs |" if described else "") + " " + " | ".join(columns) + " |",
              "| --- |" + (" --- |" if described else "") + " ---: |" * len(columns)]  # fmt: skip
    for result in results:
        what = result.get("what", "")
        if "error" in result or "skipped" in result:
            note = f"skipped: {result['skipped']}" if "skipped" in result else f"error: {result['error']}"
            what = f"{what} ({note})" if what else note
            cells = ["-"] * len(columns)
        else:
            cells = [COLUMNS[c].value(result) for c in columns]
        lines.append(f"| {result['row']} |" + (f" {what} |" if described else "") + " " + " | ".join(cells) + " |")
    if ratios:
        lines += ["", "| ratio | value |", "| --- | ---: |"]
        lines += [
            f"| {r['label']} | {'-' if r['value'] is None else format(r['value'], '.2f') + 'x'} |" for r in ratios
        ]
    return "\n".join(lines) + "\n"


def environment(smoke: bool, version: str = "2.5") -> dict:
    import torch
    import transformers

    versions = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    for name in ("peft", "accelerate", "deepspeed", "bitsandbytes"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except Exception:  # noqa: BLE001 - absent or broken: say so, measure the rest
            versions.append(f"{name} -")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device = (
            f"{len(names)} x {names[0]}"
            + ("" if len(set(names)) == 1 else f" ({', '.join(names)})")
            + f", CUDA {torch.version.cuda}"
        )
    else:
        device = f"CPU ({os.cpu_count()} cores{', ' + platform.processor() if platform.processor() else ''})"
    model = {"2.5": "MiniCPM-Llama3-V-2.5", "2.6": "MiniCPM-V 2.6", "2.0": "MiniCPM-V 2.0"}[version]
    workload = (f"SMOKE RUN: the tiny test architecture ({model} layout), a few steps; the numbers say nothing about speed or memory" if smoke
                else f"the full-size {model} architecture with random weights, bf16; 2048-token text rows")  # fmt: skip
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            "versions": ", ".join(versions), "workload": workload}  # fmt: skip


# --- running rows -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One invocation: its options, where its files go, and what it has built so far."""

    suite: str
    smoke: bool
    gpus: int
    work_dir: Path
    phases: str | None = None
    row_timeout: int = 1800
    version: str = "2.5"  # the MiniCPM-V version (MODEL_VERSIONS)
    workspace: Workspace | None = None
    logs: Path = field(init=False)

    def __post_init__(self):
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def trainer_argv(row: TrainerRow, run: Run, output_dir: Path) -> list[str]:
    """finetune.py's arguments for a row: the common ones (the version's --llm_type among them), the data's, the
    row's, then the smoke run's."""
    from finetune.model.versions import VERSIONS

    argv = ["--model_name_or_path", str(run.workspace.checkpoint), "--llm_type", VERSIONS[run.version].llm_type,
            "--data_path", str(run.workspace.data(row.data)),
            "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--use_lora", "true", "--model_max_length", "2048",
            "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--max_steps", str(row.steps)]  # fmt: skip
    if row.data == "text":
        argv += ["--per_device_train_batch_size", "1", "--dataloader_num_workers", "2"]
    else:
        argv += ["--per_device_train_batch_size", "4", "--max_slice_nums", "9", "--dataloader_num_workers", "6"]
    argv += list(row.flags)
    if run.smoke:
        argv += ["--max_steps", "3", "--dataloader_num_workers", "0"]
    return argv


def run_trainer_row(row: TrainerRow, run: Run) -> dict:
    import torch

    from bench.trainer_bench import BenchSettings
    from bench.trainer_bench import run as run_in_process

    if run.smoke and row.gpu_only and not torch.cuda.is_available():
        return {"skipped": row.gpu_only}
    output_dir = run.work_dir / "out" / row.name
    report_path = run.logs / f"{run.suite}_{row.name}.json"
    report_path.unlink(missing_ok=True)
    phase_path = run.logs / f"{run.suite}_{row.name}.{run.phases}.md"
    settings = BenchSettings(
        warmup=1 if run.smoke else row.warmup,
        sync=row.sync,
        report_path=str(report_path),
        memory_report=str(phase_path) if run.phases == "memory" else None,
        phase_report=str(phase_path) if run.phases == "time" else None,
    )
    argv = trainer_argv(row, run, output_dir)
    try:
        if run.smoke and row.gpus == 1 and not row.deepspeed:
            # (its prints into the row's log, not into the table on stdout; its logging stays on stderr)
            with open(run.logs / f"{run.suite}_{row.name}.log", "w") as log, redirect_stdout(log):
                report = run_in_process(argv, settings)
        else:
            report = _run_in_subprocess(row, run, argv, settings, report_path)
    except Exception as error:  # noqa: BLE001 - one failed row must not lose the others' numbers
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)  # the saved adapter (GBs for the upstream recipe)
    peaks, reserved = report.get("peak_allocated_gib_per_rank"), report.get("peak_reserved_gib_per_rank")
    result = {
        "gpus": report["world_size"],
        "tokens_per_s": report["tokens_per_s"],
        "samples_per_s": report["samples_per_s"],
        "step_s_mean": report["step_s_mean"],
        "mfu": report["mfu"],
        "peak_allocated_gib": max(peaks) if peaks else None,
        "peak_reserved_gib": max(reserved) if reserved else None,
        "data_wait_fraction": report["data_wait_fraction"],
        "losses": report["losses"],
        "report": report,
    }
    if peaks and run.version in PLANNED_VERSIONS:
        from bench.calibration import setup_of_report
        from finetune.plan import predict

        result["planner_gib"] = predict(setup_of_report(report, run.version)[0])["total"]
    return result


def _run_in_subprocess(row: TrainerRow, run: Run, argv: list[str], settings, report_path: Path) -> dict:
    """torch.distributed.run with `row.gpus` processes of bench.trainer_bench; its output in the row's log."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(row.gpus), "--master_port", str(_free_port()),
               "-m", "bench.trainer_bench", *argv]  # fmt: skip
    environ = dict(os.environ, **settings.environment(), TOKENIZERS_PARALLELISM="false")
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    log = run.logs / f"{run.suite}_{row.name}.log"
    with open(log, "w") as handle:
        handle.write(shlex.join(command) + "\n\n")
        handle.flush()
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=environ, stdout=handle, stderr=subprocess.STDOUT, timeout=run.row_timeout
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {run.row_timeout} s (log: {log})") from None
    if not report_path.is_file():
        raise RuntimeError(f"exit status {done.returncode}, no report (log: {log})")
    return json.loads(report_path.read_text())


def run_baseline_row(row: BaselineRow, run: Run) -> dict:
    import torch

    from bench import loop

    if run.smoke:
        settings = loop.LoopSettings(
            steps=2, warmup=1, text_len=128, text_rows=row.text_rows, workers=0, tiny=True, version=run.version
        )
    else:
        settings = loop.LoopSettings(text_rows=row.text_rows, version=run.version)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loop_row = loop.ROW_BY_NAME[row.loop_row]
    dataset, pad_id = None, 0
    if loop_row.workload == "mm":
        dataset, pad_id = _mm_dataset(run, row.mm_set)
    try:
        result = loop.run_row(loop_row, settings, device, dataset, pad_id)
    except Exception as error:  # noqa: BLE001 - one failed row (out of memory, say) must not lose the others' numbers
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    result.pop("row")
    return dict(result, gpus=1)


def _mm_dataset(run: Run, name: str):
    from bench.data import slice_settings
    from finetune.dataset import DataSettings, SupervisedDataset
    from finetune.model.tokenization import MiniCPMVTokenizerFast, SpecialTokens

    tokenizer = MiniCPMVTokenizerFast.from_pretrained(str(run.workspace.tokenizer))
    dataset = SupervisedDataset(
        DataSettings(str(run.workspace.data(name)), model_max_length=2048),
        tokenizer,
        slice_settings(run.smoke, run.version),
    )
    return dataset, SpecialTokens.from_tokenizer(tokenizer).pad


def run_suite(suite: Suite, run: Run, only: list[str] | None = None) -> list[dict]:
    from bench.data import prepare_workspace

    rows = [row for row in suite.rows(run.gpus) if not only or row.name in only]
    start = time.perf_counter()
    checkpoint = any(isinstance(row, TrainerRow) for row in rows)
    run.workspace = prepare_workspace(
        run.work_dir, tiny=run.smoke, mm_samples=8 if run.smoke else 64, checkpoint=checkpoint, version=run.version
    )
    _progress(f"checkpoint and data ready in {run.work_dir} ({time.perf_counter() - start:.0f} s)")
    results = []
    for row in rows:
        start = time.perf_counter()
        _progress(f"{row.name}: {row.what} ...")
        result = run_trainer_row(row, run) if isinstance(row, TrainerRow) else run_baseline_row(row, run)
        results.append({"row": row.name, "what": row.what, "kind": type(row).__name__, **result})
        outcome = result.get("error") or (f"skipped: {result['skipped']}" if "skipped" in result else "done")
        _progress(f"{row.name}: {outcome} ({time.perf_counter() - start:.0f} s)")
    return results


# --- the command --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("suite", nargs="?", choices=[*SUITES, DATA_SUITE], help="the suite to run")
    parser.add_argument("--list", action="store_true", help="the suites and their rows")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, a few steps, CPU works: checks the tool, measures nothing"
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="N of the multi-GPU suites (default: every visible GPU; 2 in smoke runs)"
    )
    parser.add_argument("--rows", default=None, help="only these rows (comma-separated names)")
    parser.add_argument(
        "--version",
        "--model-version",
        dest="version",
        choices=MODEL_VERSIONS,
        default="2.5",
        help=f"MiniCPM-V version: 2.5 (MiniCPM-Llama3-V-2.5, the default), 2.6 or 2.0 "
        f"({' and '.join(VERSIONED_SUITES)} suites)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"checkpoint (16 GB), data, logs, reports (default: $BENCH_WORK_DIR or {DEFAULT_WORK_DIR}; a temporary one in smoke runs)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the header, every row's numbers and the ratios here"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="write the printed table here too")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="refresh the memory planner's records (finetune/plan_calibration.json) with the measured peaks of finetune.py rows",
    )
    parser.add_argument(
        "--phases",
        choices=["memory", "time"],
        default=None,
        help="finetune.py rows also write where the step's memory peaks / its GPU time goes, by phase (bench.phases), into the logs",
    )
    parser.add_argument("--row-timeout", type=int, default=1800, help="seconds a finetune.py row may take")
    parser.add_argument("--iters", type=int, default=50, help="data suite: timed calls per case")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for suite in SUITES.values():
            print(f"{suite.name}: {suite.summary}")
            for row in suite.rows(args.gpus or 2):
                print(f"    {row.name}: {row.what}")
        print(f"{DATA_SUITE}: data preparation speed on one CPU core")
        return 0
    if args.suite is None:
        parser.error("name a suite (or --list)")
    if args.version != "2.5" and args.suite not in VERSIONED_SUITES:
        parser.error(f"--version {args.version}: only the {' and '.join(VERSIONED_SUITES)} suites run on it")
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = {"suite": args.suite, "command": command, **environment(args.smoke, args.version)}
    if args.suite == DATA_SUITE:
        from bench.data_prep import time_cases

        header["workload"] = (
            "one 1344 x 1344 JPEG sample, full-size slicing (10 views), the tiny test tokenizer; one thread"
        )
        results = time_cases(2 if args.smoke else args.iters)
        columns, ratios = DATA_COLUMNS, ratio_values(DATA_RATIOS, results)
    else:
        import torch

        suite = SUITES[args.suite]
        gpus = args.gpus or (2 if args.smoke or not torch.cuda.is_available() else max(1, torch.cuda.device_count()))
        if args.suite == "scaling" and gpus < 2:
            parser.error("scaling compares 1 GPU with N >= 2: --gpus 2 or more (one GPU visible)")
        temporary = tempfile.TemporaryDirectory(prefix="bench-smoke-") if args.smoke and args.work_dir is None else None
        work_dir = (Path(temporary.name) if temporary else (args.work_dir or DEFAULT_WORK_DIR)).resolve()
        only = args.rows.split(",") if args.rows else None
        unknown = sorted(set(only or []) - {row.name for row in suite.rows(gpus)})
        if unknown:
            parser.error(f"{args.suite} has no rows {', '.join(unknown)} (see --list)")
        run = Run(args.suite, args.smoke, gpus, work_dir, args.phases, args.row_timeout, args.version)
        results = run_suite(suite, run, only)
        columns, ratios = suite.columns, ratio_values(suite.ratios(gpus), results)
        if args.calibration:
            _refresh_calibration(args.calibration, header, results, args.version)
        if temporary:
            temporary.cleanup()
    text = markdown(header, columns, results, ratios)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({**header, "rows": results, "ratios": ratios}, indent=1, default=str) + "\n")
    return 0 if not any("error" in result for result in results) else 1


def _refresh_calibration(path: Path, header: dict, results: list[dict], version: str) -> None:
    from bench.calibration import measurement_of_report, refresh_calibration

    source = f"{header['command']} ({header['date']})"
    date = header["date"].split()[0]
    suffix = "" if version == "2.5" else "_v" + version.replace(".", "_")  # one record name per row and version
    measurements = [measurement_of_report(r["row"] + suffix, r["report"], header["device"], date, header["versions"],
                                          source, version) for r in results if "report" in r]  # fmt: skip
    measurements = [m for m in measurements if m is not None]
    refresh_calibration(path, measurements)
    _progress(f"{len(measurements)} record(s) refreshed in {path}")
