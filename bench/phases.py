"""Where a training step's memory and GPU time go: marks inside the step, and what happens between them.

    peaks = PhasePeaks(); peaks.attach(native_model)   # the peak allocated memory between consecutive marks
    times = PhaseTimes(); times.attach(native_model)   # the GPU time between them, summed by phase
    trainer.add_callback(peaks)                        # marks at step begin, optimizer step, step end
    ... train ...
    open(path, "w").write(peaks.report())              # or times.report(first_step=5)

bench/trainer_bench.py attaches them when asked (`--phases memory` / `--phases time` of `python -m bench`).
The marks (StepMarks) sit at the entry and exit of the embeddings, the vision tower, the resampler, lm_head and
the whole model, at the start of every LLM decoder layer and vision encoder layer, and where the resampler's
output and input gradients arrive; a mark made during backward says so (checkpointed layers run their forward
again there, which marks the backward's progress layer by layer).

PhasePeaks: a mark reads torch.cuda.memory_allocated and max_memory_allocated, then resets the peak statistic,
so each interval between two marks gets its own peak (the run's peak reserved figure is then meaningless, and
the hooks cost host time). Under ZeRO-3 every mark also records how many bytes of partitioned parameters are
held gathered at that moment. (The allocator's own trace with Python stacks would name the tensors, but it
fails inside checkpoint recomputation on torch 2.11.)

PhaseTimes: a mark records a CUDA event on the current stream, so the time between two marks is the GPU's time
between the work launched before each: kernels, and any time the GPU sat idle waiting for the host, in stream
order. Nothing is synchronised until the report. Intervals are charged to the phase of the mark they start at
(`phase_of`): a checkpointed layer's interval in backward holds its recomputation and its backward.
trainer_bench.py adds a mark where training_step returns (backward done), so gradient clipping gets its own
phase. On CPU the marks read time.perf_counter instead. The marks inside compiled layers break their graphs
(StepMarks._mark_here) and dynamo recompiles the hook per layer name up to its limit, so an instrumented run
can be slower than the same run without marks.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

GiB = 1024**3


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class StepMarks(TrainerCallback):
    """Marks at fixed points of a training step; a subclass says what a mark records (`mark`)."""

    step = 0

    def mark(self, label: str) -> None:
        raise NotImplementedError

    def attach(self, native: nn.Module) -> None:
        """Marks in a (PEFT-unwrapped) MiniCPMV: around the embeddings, the vision tower, the resampler and the
        whole model; at the start of every decoder / encoder layer, on its first norm, which (unlike the layer's
        own hooks) runs again when a checkpointed layer is recomputed in backward; and in backward where the
        resampler's output gradient arrives (the LLM's backward is done) and where its input's does (the vision
        tower's backward begins), when those require grad."""
        around = [
            ("embed_tokens", native.llm.get_input_embeddings()), ("vision tower", native.vpm), ("resampler", native.resampler),
            ("lm_head", native.llm.get_output_embeddings()), ("model", native),
        ]  # fmt: skip
        for name, module in around:
            module.register_forward_pre_hook(lambda _m, _a, name=name: self._mark_here(f"{name} in"))
            module.register_forward_hook(lambda _m, _a, _o, name=name: self._mark_here(f"{name} out"))
        native.resampler.register_forward_hook(self._mark_resampler_gradients)
        starts = [(f"llm layer {i}", layer.input_layernorm) for i, layer in enumerate(native.llm.model.layers)]
        starts += [(f"vision layer {i}", layer.layer_norm1) for i, layer in enumerate(native.vpm.encoder.layers)]
        for name, first_norm in starts:
            first_norm.register_forward_pre_hook(lambda _m, _a, name=name: self._mark_here(f"{name} begins"))

    def _mark_resampler_gradients(self, _module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda _grad: self._mark_here("resampler output's gradient"))
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].requires_grad:
            inputs[0].register_hook(lambda _grad: self._mark_here("resampler input's gradient"))

    @torch.compiler.disable
    def _mark_here(self, text: str) -> None:
        """A mark from a hook. Hooks inside compiled layers are traced by dynamo; disabled here, the mark breaks
        the graph and runs at run time (a traced CUDA event record would never run)."""
        self.mark(text + (" (backward)" if _in_backward() else ""))

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1
        self.mark("step begin")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mark("optimizer step begins")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.mark("optimizer step done")

    def on_step_end(self, args, state, control, **kwargs):
        self.mark("step end")


class PhasePeaks(StepMarks):
    def __init__(
        self,
        allocated: Callable[[], int] = torch.cuda.memory_allocated,
        peak: Callable[[], int] = torch.cuda.max_memory_allocated,
        reset: Callable[[], None] = torch.cuda.reset_peak_memory_stats,
    ):
        self._allocated, self._peak, self._reset = allocated, peak, reset
        self.last = ("start", allocated())
        # (step, from label, to label, allocated at the first mark, peak between them, allocated at the second)
        self.intervals: list[tuple[int, str, str, int, int, int]] = []
        self.gathered: list[tuple[int, list[str]]] = []  # per mark under ZeRO-3: gathered bytes, the big ones named
        self._partitioned: list[tuple[str, nn.Parameter]] = []

    def mark(self, label: str) -> None:
        now, top = self._allocated(), self._peak()
        self.intervals.append((self.step, self.last[0], label, self.last[1], top, now))
        self.gathered.append(self._gathered())
        self._reset()
        self.last = (label, now)

    def _gathered(self) -> tuple[int, list[str]]:
        """ZeRO-3: the bytes of partitioned parameters gathered whole right now (not the persistent small ones),
        and the names of those over 100 M elements."""
        total, big = 0, []
        for name, parameter in self._partitioned:
            if parameter.ds_status.name == "AVAILABLE" and not parameter.ds_persist:
                total += parameter.ds_numel * parameter.element_size()
                if parameter.ds_numel > 100_000_000:
                    big.append(name)
        return total, big

    def attach(self, native: nn.Module) -> None:
        self._partitioned = [(name, p) for name, p in native.named_parameters() if hasattr(p, "ds_status")]
        super().attach(native)

    def highest(self) -> int:
        return max((interval[4] for interval in self.intervals), default=0)

    def report(self, top: int = 25) -> str:
        lines = [
            f"peak allocated over all intervals: {self.highest() / GiB:.2f} GiB ({len(self.intervals)} intervals)",
            "",
            "| peak GiB | step | from mark | to mark | allocated at the first mark | at the second |",
            "| ---: | ---: | --- | --- | ---: | ---: |",
        ]
        for step, start, end, before, top_bytes, after in sorted(self.intervals, key=lambda i: -i[4])[:top]:
            lines.append(
                f"| {top_bytes / GiB:.3f} | {step} | {start} | {end} | {before / GiB:.3f} | {after / GiB:.3f} |"
            )
        steps = sorted({interval[0] for interval in self.intervals})
        if steps:  # one whole step in order: the one before the last (warmed up, not the wrap-up)
            shown = steps[-2] if len(steps) > 1 else steps[-1]
            lines += ["", f"Step {shown} in order (gathered: ZeRO-3 parameters held whole at the mark):", "",
                      "| to mark | peak GiB since the previous mark | allocated GiB at the mark | gathered GiB | gathered, over 100 M |",
                      "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
            lines += [
                f"| {end} | {top_bytes / GiB:.3f} | {after / GiB:.3f} | {held / GiB:.3f} | {', '.join(big)} |"
                for (step, _, end, _, top_bytes, after), (held, big) in zip(self.intervals, self.gathered, strict=True) if step == shown
            ]  # fmt: skip
        return "\n".join(lines) + "\n"


# --- GPU time by phase ---------------------------------------------------------------------------------------


def _cuda_event() -> Any:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _cuda_elapsed_ms(start: Any, end: Any) -> float:
    return start.elapsed_time(end)


def phase_of(label: str) -> str:
    """The phase an interval belongs to, from the mark it starts at."""
    backward = label.endswith(" (backward)")
    name = label.removesuffix(" (backward)")
    if re.fullmatch(r"(llm|vision) layer \d+ begins", name):
        tower = name.split()[0]
        if backward:
            return f"{tower} layers: recompute + backward"
        return f"{tower} layers: forward"
    if name == "resampler output's gradient":  # (the image features' scatter into the embeddings came before it)
        return "resampler: backward"
    if name == "resampler input's gradient":
        return "vision tower after its layers: backward"  # post_layernorm, then its last layer's mark
    if name in ("lm_head in", "lm_head out"):
        return "loss (lm_head chunks)" + (": recompute + backward" if backward else "")
    if name == "training_step done":
        return "gradient norm + clipping"
    if name == "optimizer step begins":
        return "optimizer step"
    if name in ("optimizer step done", "step end"):
        return "scheduler, zero_grad, next batch, Trainer bookkeeping"
    return name + (" (backward)" if backward else "")


class PhaseTimes(StepMarks):
    def __init__(
        self,
        record: Callable[[], Any] | None = None,
        elapsed_ms: Callable[[Any, Any], float] | None = None,
    ):
        if (record is None) != (elapsed_ms is None):
            raise ValueError("give both record and elapsed_ms, or neither")
        if record is None:
            cuda = torch.cuda.is_available()
            record = _cuda_event if cuda else time.perf_counter
            elapsed_ms = _cuda_elapsed_ms if cuda else (lambda start, end: (end - start) * 1e3)
        self._record, self._elapsed_ms = record, elapsed_ms
        self.marks: list[tuple[int, str, Any]] = []  # (step, label, event)

    def mark(self, label: str) -> None:
        self.marks.append((self.step, label, self._record()))

    def intervals(self) -> list[tuple[int, str, str, float]]:
        """(step of the first mark, from label, to label, ms between), for consecutive marks."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return [
            (step, label, next_label, self._elapsed_ms(event, next_event))
            for (step, label, event), (_, next_label, next_event) in zip(self.marks, self.marks[1:], strict=False)
        ]

    def _ended_steps(self, first_step: int) -> list[int]:
        return sorted({step for step, label, _ in self.marks if label == "step end" and step >= first_step})

    def by_phase(self, first_step: int) -> dict[str, float]:
        """Mean ms per optimizer step of each phase, over the steps from first_step on that have ended."""
        ended = set(self._ended_steps(first_step))
        totals: dict[str, float] = defaultdict(float)
        for step, label, _, ms in self.intervals():
            # the interval from a step's end to the next step's begin is charged to the step that ended
            if step in ended:
                totals[phase_of(label)] += ms
        return {phase: total / len(ended) for phase, total in totals.items()} if ended else {}

    def report(self, first_step: int) -> str:
        phases = self.by_phase(first_step)
        total = sum(phases.values())
        steps = self._ended_steps(first_step)
        lines = [
            f"GPU time per optimizer step by phase, steps {steps[0]}-{steps[-1]}: {total:.1f} ms a step (mean)"
            if steps
            else "GPU time by phase: no step ended from the first timed step on",
            "",
            "| phase | ms a step | share |",
            "| --- | ---: | ---: |",
        ]
        for phase, ms in sorted(phases.items(), key=lambda item: -item[1]):
            lines.append(f"| {phase} | {ms:.1f} | {ms / total:.1%} |")
        return "\n".join(lines) + "\n"
