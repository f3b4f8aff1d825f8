"""Where a training step's GPU time goes: the time between consecutive marks, summed by phase.

    times = PhaseTimes(); times.attach(native_model)   # the marks of memory_at_peak.StepMarks
    trainer.add_callback(times)
    ... train ...
    open(path, "w").write(times.report(first_step=5))

`bench/trainer_bench.py` does this when BENCH_PHASES=path is set. A mark records a CUDA event on the current
stream, so the time between two marks is the GPU's time between the work launched before each: kernels, and
any time the GPU sat idle waiting for the host, in stream order, whatever the host ran ahead. Nothing is
synchronised until the report. Intervals are charged to the phase of the mark they start at (`phase_of`):
a checkpointed layer's interval in backward holds its recomputation and its backward. trainer_bench.py adds a
mark where training_step returns (backward done), so gradient clipping gets its own phase. On CPU the marks read
time.perf_counter instead.

The marks inside compiled layers break their graphs (StepMarks._mark_here), and dynamo recompiles the hook per
layer name up to its recompile limit: an instrumented run can be slower than the same run without marks
(bench/README.md, "Update 9": 4.37 against 4.89 samples/s for the upstream recipe, LoRA only unchanged).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from memory_at_peak import StepMarks


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
            for (step, label, event), (_, next_label, next_event) in zip(self.marks, self.marks[1:])
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
            if steps else "GPU time by phase: no step ended from the first timed step on",
            "",
            "| phase | ms a step | share |",
            "| --- | ---: | ---: |",
        ]
        for phase, ms in sorted(phases.items(), key=lambda item: -item[1]):
            lines.append(f"| {phase} | {ms:.1f} | {ms / total:.1%} |")
        return "\n".join(lines) + "\n"
