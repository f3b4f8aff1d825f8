"""finetune.py's training run, timed: the real Trainer path (no DeepSpeed, or ZeRO-2 / ZeRO-3 under torchrun).

    python -m bench.trainer_bench <finetune.py arguments>
    python -m torch.distributed.run --nproc_per_node N -m bench.trainer_bench <finetune.py arguments>

`python -m bench` runs it for its Trainer rows. By hand, the environment says what to measure:

    BENCH_TRAINER_JSON=path    rank 0 writes the report there (it also prints it on a `[bench] {...}` line)
    BENCH_WARMUP=2             optimizer steps left out of the timing
    BENCH_SYNC=all             where the benchmark synchronises the GPU: all, steps or window (below)
    BENCH_MEMORY=path          rank 0 writes the peak allocated memory between marks (bench.phases.PhasePeaks)
    BENCH_PHASES=path          rank 0 writes the GPU time by phase over the timed steps (bench.phases.PhaseTimes)

It runs finetune.train.train(argv) unchanged, with its MiniCPMVTrainer replaced by a subclass that only adds
measuring: a timestamp at the start and end of every training_step (forward + backward) and at every optimizer
step's end (the on_step_end callback, after the optimizer, scheduler and zero_grad). One step's time is the
interval between two consecutive step ends: data loading, forward, backward, ZeRO communication and optimizer,
nothing of the run's start-up or wrap-up. "data wait" is from a step's end to the next training_step's start
(the next batch is fetched there); "optimizer" from the last backward of a step to its end.

Synchronisation: `all` synchronises the GPU at every one of those timestamps, so the host cannot queue work ahead
of the GPU and the per-phase fractions are GPU times. `steps` synchronises at step ends only: step times are the
Trainer's own, the fractions host-side times. `window` synchronises only where the timed steps start and end:
in between the host may queue a step while the GPU runs the one before, as in a run that logs every few steps;
the mean step time stays exact, per-step times and fractions are host-side.

Tokens per step are the real (non-pad) tokens of the micro-batches, summed over ranks; the FLOP count is
bench.loop.flops_of_batch; peak memory is torch.cuda.max_memory_allocated / _reserved per rank.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

import finetune.train as training
from bench.loop import PEAK_BF16_FLOPS, batch_stats, flops_of_batch, model_shapes
from bench.phases import PhasePeaks, PhaseTimes
from finetune.model.kernels import native_model
from finetune.run_report import fast_paths_in_effect

SYNC_MODES = {"all": "training_step and step ends", "steps": "step ends", "window": "the timed window's ends"}


@dataclass(frozen=True)
class BenchSettings:
    """What a timed run measures (see the module docstring)."""

    warmup: int = 2
    sync: str = "all"
    report_path: str | None = None
    memory_report: str | None = None
    phase_report: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> BenchSettings:
        sync = environ.get("BENCH_SYNC", "all")
        if sync not in SYNC_MODES:
            raise ValueError(f"BENCH_SYNC={sync}: one of {', '.join(SYNC_MODES)}")
        return cls(int(environ.get("BENCH_WARMUP", "2")), sync, environ.get("BENCH_TRAINER_JSON"),
                   environ.get("BENCH_MEMORY"), environ.get("BENCH_PHASES"))  # fmt: skip

    def environment(self) -> dict[str, str]:
        """The same settings as environment variables, for a run in another process."""
        pairs = {"BENCH_WARMUP": str(self.warmup), "BENCH_SYNC": self.sync, "BENCH_TRAINER_JSON": self.report_path,
                 "BENCH_MEMORY": self.memory_report, "BENCH_PHASES": self.phase_report}  # fmt: skip
        return {key: value for key, value in pairs.items() if value is not None}


def _now(sync: bool = True) -> float:
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class _StepEnds(TrainerCallback):
    """A timestamp at every optimizer step's end; synchronised unless the mode is `window` and the step is not
    one of the timed window's ends."""

    def __init__(self, times: list[float], first_timed_step: Callable[[int], int], sync: str):
        self.times = times
        self.first_timed_step = first_timed_step  # -> the first timed step (1-based), once the steps are known
        self.sync = sync

    def on_step_end(self, args, state, control, **kwargs):
        window_end = state.global_step in (self.first_timed_step(state.max_steps) - 1, state.max_steps)
        self.times.append(_now(sync=self.sync != "window" or window_end))


class TimedTrainer(training.MiniCPMVTrainer):
    """finetune.py's trainer, measured; `settings` is set by `run` before the run builds it."""

    settings = BenchSettings()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bench_report: dict | None = None
        self._bench_starts: list[float] = []  # per micro-batch: training_step entered
        self._bench_ends: list[float] = []  # per micro-batch: forward + backward done
        self._bench_step_ends: list[float] = []  # per optimizer step: optimizer step done
        self.add_callback(_StepEnds(self._bench_step_ends, self._bench_first_timed_step, self.settings.sync))
        self._bench_stats: list[tuple[int, int, float]] = []  # (tokens, samples, flops) of this rank's micro-batch
        self._bench_largest = [0, 0]  # this rank's largest micro-batch: tokens, image views
        self._bench_shapes = model_shapes(self.model)
        self._bench_vision = bool(self.args.tune_vision)
        main_process = self.args.process_index == 0
        self._bench_peaks = None
        if self.settings.memory_report and torch.cuda.is_available() and main_process:
            self._bench_peaks = PhasePeaks()
            self._bench_peaks.attach(native_model(self.model))
            self.add_callback(self._bench_peaks)
        self._bench_phases = None
        if self.settings.phase_report and main_process:
            self._bench_phases = PhaseTimes()
            self._bench_phases.attach(native_model(self.model))
            self.add_callback(self._bench_phases)

    def training_step(self, model, inputs, num_items_in_batch=None):
        in_step = self.settings.sync == "all"
        self._bench_starts.append(_now(in_step))
        lengths, label_tokens, patches, samples = batch_stats(inputs)
        self._bench_stats.append(
            (
                sum(lengths),
                samples,
                flops_of_batch(self._bench_shapes, lengths, label_tokens, patches, self._bench_vision),
            )
        )
        self._bench_largest[0] = max(self._bench_largest[0], sum(lengths))
        self._bench_largest[1] = max(self._bench_largest[1], len(patches))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._bench_phases is not None:
            self._bench_phases.mark("training_step done")
        self._bench_ends.append(_now(in_step))
        return loss

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self._bench_write_report()
        if self._bench_peaks is not None:
            with open(self.settings.memory_report, "w") as handle:
                handle.write(self._bench_peaks.report())
        if self._bench_phases is not None:
            with open(self.settings.phase_report, "w") as handle:
                handle.write(self._bench_phases.report(first_step=self._bench_first_timed_step()))
        return output

    def _bench_first_timed_step(self, steps: int | None = None) -> int:
        """The first timed step, numbered from 1 as state.global_step (the timing starts at the end of the one
        before), of `steps` steps (by default those that ran): at least one step before it, at least one timed."""
        steps = len(self._bench_step_ends) if steps is None else steps
        return min(max(1, self.settings.warmup), steps - 1) + 1

    def _bench_write_report(self) -> None:
        accum = self.args.gradient_accumulation_steps
        stats = torch.tensor(self._bench_stats, dtype=torch.float64)
        cuda = torch.cuda.is_available()
        peak = torch.tensor(
            # (the memory marks reset the peak statistics at every mark: their own record has the peak)
            [
                (self._bench_peaks.highest() if self._bench_peaks else torch.cuda.max_memory_allocated()) / 1024**3
                if cuda
                else 0.0,
                torch.cuda.max_memory_reserved() / 1024**3 if cuda else 0.0,
            ]
            + self._bench_largest,
            dtype=torch.float64,
        )
        world = self.args.world_size
        if world > 1 and torch.distributed.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            stats = stats.to(device)
            torch.distributed.all_reduce(stats)  # tokens, samples, flops per micro-batch: summed over ranks
            stats = stats.cpu()
            gathered_peak = [torch.zeros_like(peak, device=device) for _ in range(world)]  # reported per rank
            torch.distributed.all_gather(gathered_peak, peak.to(device))
            peaks = [p.cpu().tolist() for p in gathered_peak]
        else:
            peaks = [peak.tolist()]
        if self.args.process_index != 0:
            return
        ends = self._bench_step_ends
        steps = len(ends)
        first = (
            self._bench_first_timed_step() - 1
        )  # timed: steps first..steps-1 (0-based), from the end of step first-1
        timed = range(first, steps)
        total = ends[-1] - ends[first - 1]
        step_times = [ends[0] - self._bench_starts[0]] + [b - a for a, b in zip(ends, ends[1:], strict=False)]
        micro = [stats[i * accum : (i + 1) * accum].sum(0).tolist() for i in timed]
        tokens, samples, flops = (sum(m[k] for m in micro) for k in range(3))
        data_wait = [self._bench_starts[k * accum] - ends[k - 1] for k in range(1, steps)]
        optimizer = [ends[k] - self._bench_ends[(k + 1) * accum - 1] for k in range(steps)]
        report = {
            "world_size": world,
            "deepspeed": getattr(self.args, "deepspeed", None),
            "steps": steps,
            "steps_timed": len(timed),
            "step_s_mean": total / len(timed),
            "tokens_per_s": tokens / total,
            "samples_per_s": samples / total,
            "tokens_per_s_per_gpu": tokens / total / world,
            "mfu": flops / total / PEAK_BF16_FLOPS / world,
            "tflops_per_s_per_gpu": flops / total / 1e12 / world,
            "peak_allocated_gib_per_rank": [p[0] for p in peaks] if cuda else None,
            "peak_reserved_gib_per_rank": [p[1] for p in peaks] if cuda else None,
            "largest_micro_batch_tokens": max(p[2] for p in peaks),
            "largest_micro_batch_views": max(p[3] for p in peaks),
            "optim": str(getattr(self.args.optim, "value", self.args.optim)),
            "synchronised": SYNC_MODES[self.settings.sync],
            "loss_chunk_size": self.args.loss_chunk_size,
            "gradient_checkpointing": bool(self.args.gradient_checkpointing),
            "q_lora": any(type(m).__name__ == "Linear4bit" for m in self.model.modules()),
            "tune_vision": self._bench_vision,
            "data_wait_fraction": sum(data_wait[k - 1] for k in timed) / total,
            "optimizer_fraction": sum(optimizer[k] for k in timed) / total,
            "step_times": step_times,
            "losses": [entry["loss"] for entry in self.state.log_history if "loss" in entry],
            "phase_ms": self._bench_phases.by_phase(self._bench_first_timed_step()) if self._bench_phases else None,
            **fast_paths_in_effect(self.model),
        }
        self.bench_report = report
        print("[bench] " + json.dumps(report), flush=True)
        if self.settings.report_path:
            with open(self.settings.report_path, "w") as handle:
                json.dump(report, handle, indent=1)


def run(argv: list[str], settings: BenchSettings) -> dict | None:
    """One training run of finetune.py with these arguments, measured; the report (None on ranks other than 0)."""
    untimed = training.MiniCPMVTrainer
    TimedTrainer.settings = settings
    training.MiniCPMVTrainer = TimedTrainer
    try:
        trainer = training.train(argv)
    finally:
        training.MiniCPMVTrainer = untimed
    return trainer.bench_report


def main(argv: list[str] | None = None) -> int:
    from finetune.arguments import UsageError

    try:
        run(sys.argv[1:] if argv is None else argv, BenchSettings.from_environment())
    except UsageError as error:
        print(f"trainer_bench: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
