"""Seeing a training run: `loss.png` and `run_summary.txt` in the output directory when training ends.

finetune.py registers `RunReportCallback` with the trainer, so nothing has to be run by hand. At the end of
training, on the main process only, it writes:

    OUTPUT_DIR/loss.png          training loss and eval loss over steps (top), learning rate (bottom)
    OUTPUT_DIR/run_summary.txt   `key: value` lines: steps, tokens seen (input and label tokens, in total and
                                 per optimizer step), wall time, peak GPU memory, final train / eval loss

TensorBoard (finetune.py's default `--report_to tensorboard`): transformers 5 has no `logging_dir` argument any
more; its TensorBoardCallback writes to `$TENSORBOARD_LOGGING_DIR` when that is set, else to
`OUTPUT_DIR/runs/<Mon DD_HH-MM-SS>_<hostname>/` (one folder per run). View it with
`tensorboard --logdir OUTPUT_DIR/runs`. The summary names the folder.

Tokens: the Trainer's own counter (`--include_num_input_tokens_seen`) looks for `input_ids` at the top level of
a batch; ours sit inside `batch["data"]`, so the Trainer only warns and counts nothing. The callback therefore
counts on the model itself: a forward pre-hook on the trained model (training-mode calls only; evaluation is not
counted) adds the non-padding input tokens (attention_mask, or every token of a packed row) and the label tokens
(labels != -100) of every micro-batch; the counts are summed over ranks at the end.

The plot and summary can also be made from a finished run's `trainer_state.json`:
`python -m finetune.run_report OUTPUT_DIR`.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from finetune.model.attention import llm_attention, vision_attention
from finetune.model.kernels import compiled_layer_count, native_model
from finetune.model_setup import vocab_sharded

if TYPE_CHECKING:
    from finetune.trainer import MiniCPMVTrainer

PLOT_NAME = "loss.png"
SUMMARY_NAME = "run_summary.txt"


# --- pure pieces (tests call them) ------------------------------------------------------------------------------


def series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every log entry that has `key`, skipping non-finite values."""
    steps, values = [], []
    for entry in log_history:
        if key in entry and "step" in entry:
            try:
                value = float(entry[key])
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                steps.append(int(entry["step"]))
                values.append(value)
    return steps, values


def plot_losses(log_history: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the loss / learning-rate figure as PNG with the Agg canvas (no display, pyplot state untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    train_steps, train_loss = series(log_history, "loss")
    eval_steps, eval_loss = series(log_history, "eval_loss")
    lr_steps, lr = series(log_history, "learning_rate")
    if train_steps:
        top.plot(train_steps, train_loss, label="train loss", color="tab:blue", linewidth=1.2)
    if eval_steps:
        top.plot(eval_steps, eval_loss, label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    if not train_steps and not eval_steps:
        top.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=top.transAxes)
    top.set_ylabel("loss")
    top.grid(alpha=0.3)
    if train_steps or eval_steps:
        top.legend(loc="upper right")
    top.set_title("MiniCPM-V fine-tuning")
    if lr_steps:
        bottom.plot(lr_steps, lr, color="tab:green", linewidth=1.2)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_summary(fields: dict[str, Any], path: str | Path) -> Path:
    """`key: value` lines, in order."""
    path = Path(path)
    path.write_text("".join(f"{key}: {_fmt(value)}\n" for key, value in fields.items()))
    return path


def tensorboard_dir(args) -> str | None:
    """Where transformers' TensorBoardCallback writes for these TrainingArguments (None when not enabled)."""
    report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    if not any(r in ("tensorboard", "all") for r in report_to):
        return None
    explicit = os.getenv("TENSORBOARD_LOGGING_DIR")
    if explicit:
        return os.path.expanduser(explicit)
    runs = sorted(glob.glob(os.path.join(args.output_dir, "runs", "*")), key=os.path.getmtime)
    return runs[-1] if runs else os.path.join(args.output_dir, "runs")


def peak_gpu_memory() -> str:
    if not torch.cuda.is_available():
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (this process, torch.cuda.max_memory_allocated)"


# --- the callback ----------------------------------------------------------------------------------------------------


class RunReportCallback(TrainerCallback):
    """Counts tokens during training and writes loss.png and run_summary.txt into args.output_dir at the end."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.micro_batches = 0
        self.input_tokens: torch.Tensor | int = 0
        self.label_tokens: torch.Tensor | int = 0
        self._hook = None
        self.first_step: int | None = None  # global_step when this session's first step began (resume: > 0)
        self.plot_path: Path | None = None
        self.summary_path: Path | None = None

    # counting ----------------------------------------------------------------------------------------------

    def _count(self, module, args, kwargs) -> None:
        if not module.training:
            return
        data = kwargs.get("data")
        input_ids = data.get("input_ids") if isinstance(data, dict) else kwargs.get("input_ids")
        if input_ids is None:
            return
        mask = kwargs.get("attention_mask")
        inputs = mask.sum() if mask is not None else torch.tensor(input_ids.numel(), device=input_ids.device)
        labels = kwargs.get("labels")
        labelled = (
            (labels != -100).sum()
            if labels is not None
            else torch.zeros((), dtype=torch.int64, device=input_ids.device)
        )
        # Kept as tensors on the batch's device: no host sync per micro-batch.
        self.input_tokens = self.input_tokens + inputs.detach().to(torch.int64)
        self.label_tokens = self.label_tokens + labelled.detach().to(torch.int64)
        self.micro_batches += 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = time.perf_counter()
        self.micro_batches, self.input_tokens, self.label_tokens = 0, 0, 0
        self.first_step = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step is None:  # the trainer state of a resumed run is loaded after on_train_begin
            self.first_step = state.global_step

    def _totals(self, args) -> tuple[int, int]:
        counts = torch.tensor([int(self.input_tokens), int(self.label_tokens)], dtype=torch.int64)
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            backend = torch.distributed.get_backend()
            device = args.device if backend == "nccl" else torch.device("cpu")
            counts = counts.to(device)
            torch.distributed.all_reduce(counts)
        return int(counts[0]), int(counts[1])

    # writing -----------------------------------------------------------------------------------------------------

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        input_tokens, label_tokens = self._totals(args)  # every rank takes part in the reduction
        if not state.is_world_process_zero:
            return
        wall = time.perf_counter() - self.start if self.start is not None else None
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        history = state.log_history
        _, train_losses = series(history, "loss")
        _, eval_losses = series(history, "eval_loss")
        _, mean_losses = series(history, "train_loss")
        steps = state.global_step
        session_steps = steps - (self.first_step or 0)
        trainer_count = getattr(state, "num_input_tokens_seen", 0)
        fields = {
            "steps": steps,
            "steps_this_session": session_steps,
            "max_steps": state.max_steps,
            "epochs": round(float(state.epoch or 0.0), 4),
            "micro_batches (rank 0, this session)": self.micro_batches,
            "input_tokens_seen (non-padding, all ranks)": input_tokens,
            "label_tokens_seen (all ranks)": label_tokens,
            "input_tokens_per_step": round(input_tokens / session_steps, 1) if session_steps else None,
            "label_tokens_per_step": round(label_tokens / session_steps, 1) if session_steps else None,
            "trainer_num_input_tokens_seen": trainer_count
            if trainer_count
            else "not counted by the Trainer (input_ids sit inside batch['data'])",
            "wall_time_s": round(wall, 2) if wall is not None else None,
            "wall_time": str(timedelta(seconds=round(wall))) if wall is not None else None,
            "peak_gpu_memory": peak_gpu_memory(),
            "final_train_loss": train_losses[-1] if train_losses else None,
            "mean_train_loss": mean_losses[-1] if mean_losses else None,
            "final_eval_loss": eval_losses[-1] if eval_losses else "n/a (no evaluation)",
            "tensorboard_logdir": tensorboard_dir(args) or f"not enabled (report_to={args.report_to})",
            "loss_plot": str((out / PLOT_NAME).resolve()),
        }
        self.plot_path = plot_losses(history, out / PLOT_NAME)
        self.summary_path = write_summary(fields, out / SUMMARY_NAME)


# --- from a finished run ---------------------------------------------------------------------------------------------


def report_from_state(output_dir: str | Path) -> tuple[Path, Path]:
    """loss.png and a short run_summary.txt from OUTPUT_DIR/trainer_state.json (no token counts / wall time)."""
    output_dir = Path(output_dir)
    state_path = output_dir / "trainer_state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: missing (is {output_dir} a training output_dir?)")
    state = json.loads(state_path.read_text())
    history = state.get("log_history", [])
    _, train_losses = series(history, "loss")
    _, eval_losses = series(history, "eval_loss")
    fields = {
        "steps": state.get("global_step"),
        "max_steps": state.get("max_steps"),
        "epochs": state.get("epoch"),
        "input_tokens_seen (non-padding, all ranks)": "n/a (only counted during training)",
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else "n/a (no evaluation)",
    }
    summary = output_dir / SUMMARY_NAME
    if summary.is_file():  # keep the one written during training: it has more
        summary = output_dir / "run_summary_from_state.txt"
    return plot_losses(history, output_dir / PLOT_NAME), write_summary(fields, summary)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.run_report", description="loss.png + summary from trainer_state.json"
    )
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    try:
        plot, summary = report_from_state(args.output_dir)
    except (FileNotFoundError, json.JSONDecodeError) as error:
        print(f"finetune.run_report: error: {error}", file=sys.stderr)
        return 2
    print(f"[report] {plot}\n[report] {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())


# --- how the run really trained: one JSON per rank (FINETUNE_RUN_REPORT) ---------------------------------


def innermost_optimizer_name(optimizer) -> str:
    """The class that really updates the weights, under accelerate's and DeepSpeed's wrappers, with its state
    precision where bitsandbytes says it (e.g. "bitsandbytes.optim.adamw.AdamW 8-bit")."""
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    bits = getattr(getattr(optimizer, "args", None), "optim_bits", None)
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}" + (f" {bits}-bit" if bits else "")


def checkpointing_in_effect(model: torch.nn.Module) -> bool:
    """Whether any module of the model recomputes its activations in backward (what transformers'
    `is_activation_checkpointing` reads; spelled out, as its name differs across transformers 5 releases)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def fast_paths_in_effect(model) -> dict:
    """The fast paths as the model has them (finetune.model.kernels and .attention), whatever the flags said:
    the run report's fields, and bench/trainer_bench.py's."""
    native = native_model(model)
    options = getattr(native, "runtime_options", None)  # the hub's class has none
    return {
        "loss_kernel": options.loss_kernel if options is not None else None,
        "vocab_sharded_loss": vocab_sharded(model),
        "liger_rms_norm": "Liger" in getattr(native.llm.model.norm.forward, "__qualname__", ""),
        "compiled_layers": compiled_layer_count(native),
        "compiled_vision_layers": compiled_layer_count(native, "vision"),
        "llm_attention": llm_attention(native),
        "vision_attention": vision_attention(native),
    }


def write_run_report(trainer: MiniCPMVTrainer, directory: Path) -> None:
    """One JSON per rank saying how this process really trained (tests assert on it, not on exit codes)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = trainer.accelerator.state
    native = native_model(trainer.model)
    report = {
        "process_index": trainer.args.process_index,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(state.distributed_type),
        "backend": getattr(state, "backend", None),
        "wrapper": type(trainer.model_wrapped).__name__,
        "optimizer": innermost_optimizer_name(trainer.optimizer),
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_checkpointing": checkpointing_in_effect(native),
        "vision_trained": any(p.requires_grad for p in native.vpm.parameters()),
        **fast_paths_in_effect(trainer.model),
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
    }
    (directory / f"rank{trainer.args.process_index}.json").write_text(json.dumps(report, indent=1, default=str))
