"""finetune/finetune.py with step timing: the REAL Trainer path (DeepSpeed ZeRO-2/3, torchrun), measured.

    torchrun --nproc_per_node 2 bench/trainer_bench.py <finetune.py arguments> [--deepspeed ...]
    env BENCH_TRAINER_JSON=out.json (rank 0 writes it), BENCH_WARMUP=2 (steps left out of the timing),
        BENCH_SYNC=steps (synchronise at optimizer-step ends only) or BENCH_SYNC=window (only where the timed
        steps start and end: in between, the Trainer's own synchronisations alone), BENCH_PROFILE=path (profile steps 3-5:
        tables in path, the chrome trace with Python stacks in path.trace.json; the timing then starts at
        step 8 at the earliest); for A/B rows of the vision tower's fast paths, BENCH_VISION_ATTENTION=sdpa (the
        vision tower back on sdpa) and BENCH_VISION_COMPILE=0 (its layers not compiled), applied to the model
        finetune.py built; BENCH_DUMMY_IMAGE=run (text-only steps run the published dummy image through the
        vision tower instead of its zero-gradient stand-in); BENCH_VOCAB_SHARDS=off (under ZeRO-3 the loss
        gathers lm_head per chunk instead of using each rank's rows of it); BENCH_INPUT_GRADS=library
        (transformers' checkpointing hooks: a frozen vision tower's embeddings marked as requiring grad too);
        BENCH_BNB_SYNCS=each (bitsandbytes' device sync after every parameter's update kept);
        BENCH_VISION_RESIDUAL=fp32 (a trained fp32 vision tower's residual stream left in fp32 under autocast);
        BENCH_MODEL_TRAIN=library (the Trainer's model.train() before every step walks every module again, as
        nn.Module.train does, instead of MiniCPMV.train's skip when nothing would change);
        BENCH_MEMORY=path (rank 0 writes the peak allocated memory between marks at every layer's start and
        the step's phases, bench/memory_at_peak.py; the peak reserved figure is then meaningless, and the hooks
        cost host time); BENCH_PHASES=path (rank 0 writes the GPU time per step by phase between the same marks,
        bench/time_by_phase.py, over the timed steps; the report gets it as phase_ms; the marks break compiled
        layers' graphs, which can slow the row)

It runs finetune.finetune.cli() unchanged, with MiniCPMVTrainer replaced by a subclass that only adds timing:
the GPU is synchronised and a timestamp taken at the start and end of every training_step (forward + backward)
and at every optimizer step's end (the Trainer's on_step_end callback, after the optimizer, scheduler and
zero_grad). One step's time = the interval between two consecutive step ends: data loading, forward, backward,
ZeRO communication and optimizer, nothing of the Trainer's start-up or wrap-up (loss plot, summary).
"data wait" = from a step's end to the next training_step's start (the next batch is fetched there).
The synchronisations around training_step keep the CPU from queueing work ahead of the GPU, which the Trainer
alone would do between its own synchronisations (the logged loss); with BENCH_SYNC=steps only the step ends
are synchronised: step times are then the Trainer's own, and data wait / optimizer fractions host-side times.
With BENCH_SYNC=window the host may queue one step's work while the GPU still runs the one before, as in a run
that logs every few steps: the mean step time stays exact (the window's ends are synchronised), the per-step
times and the fractions are host-side.
Tokens per step are the real (non-pad) tokens of the micro-batch, summed over ranks; patches per view come from
tgt_sizes (for the FLOP count, see bench_train.flops_of_batch). Peak memory is torch.cuda.max_memory_* per rank.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import PreTrainedModel, Trainer, TrainerCallback  # noqa: E402

import finetune.finetune as ft  # noqa: E402
from bench_train import PEAK_BF16_FLOPS, batch_stats, flops_of_batch, model_shapes  # noqa: E402
from memory_at_peak import PhasePeaks  # noqa: E402
from time_by_phase import PhaseTimes  # noqa: E402
from finetune.model.attention import set_vision_attention  # noqa: E402
from finetune.model.kernels import native_model, tower_layers  # noqa: E402


def _now(sync: bool = True) -> float:
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


_SYNC = os.environ.get("BENCH_SYNC", "all")
_SYNC_IN_STEP = _SYNC == "all"


class _StepEnds(TrainerCallback):
    def __init__(self, times: list[float], first_timed_step):
        self.times = times
        self.first_timed_step = first_timed_step  # -> the first timed step (1-based), once the steps are known

    def on_step_end(self, args, state, control, **kwargs):
        window_end = state.global_step in (self.first_timed_step(state.max_steps) - 1, state.max_steps)
        self.times.append(_now(sync=_SYNC != "window" or window_end))


class TimedTrainer(ft.MiniCPMVTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if os.environ.get("BENCH_VISION_ATTENTION"):
            set_vision_attention(self.model, os.environ["BENCH_VISION_ATTENTION"])
        if os.environ.get("BENCH_DUMMY_IMAGE") == "run":
            native_model(self.model).dummy_image_stand_in = False
        if os.environ.get("BENCH_INPUT_GRADS") == "library":
            native = native_model(self.model)
            native.disable_input_require_grads()
            type(native).enable_input_require_grads = PreTrainedModel.enable_input_require_grads
        if os.environ.get("BENCH_VISION_RESIDUAL") == "fp32":
            type(native_model(self.model)).vision_residual_in_autocast_dtype = False
        if os.environ.get("BENCH_MODEL_TRAIN") == "library":
            type(native_model(self.model)).train = PreTrainedModel.train
        if os.environ.get("BENCH_VOCAB_SHARDS") == "off":
            native_model(self.model).vocab_sharded_loss = False
        if os.environ.get("BENCH_VISION_COMPILE") == "0":
            for layer in tower_layers(self.model, "vision"):
                layer._compiled_call_impl = None  # what nn.Module.compile set: plain calls again
        self._bench_starts: list[float] = []  # per micro-batch: training_step entered
        self._bench_ends: list[float] = []  # per micro-batch: forward + backward done
        self._bench_step_ends: list[float] = []  # per optimizer step: optimizer step done
        self.add_callback(_StepEnds(self._bench_step_ends, self._bench_first_timed_step))
        self._bench_stats: list[tuple[int, int, float]] = []  # (tokens, samples, flops) of this rank's micro-batch
        self._bench_largest = [0, 0]  # this rank's largest micro-batch: tokens, image views
        self._bench_shapes = model_shapes(self.model)
        self._bench_vision = bool(self.args.tune_vision)
        self._bench_peaks = None
        if os.environ.get("BENCH_MEMORY") and torch.cuda.is_available() and self.args.process_index == 0:
            self._bench_peaks = PhasePeaks()
            self._bench_peaks.attach(native_model(self.model))
            self.add_callback(self._bench_peaks)
        self._bench_phases = None
        if os.environ.get("BENCH_PHASES") and self.args.process_index == 0:
            self._bench_phases = PhaseTimes()
            self._bench_phases.attach(native_model(self.model))
            self.add_callback(self._bench_phases)

    def create_optimizer(self, model=None):
        if os.environ.get("BENCH_BNB_SYNCS") == "each":  # bitsandbytes as shipped: a device sync after every parameter
            return Trainer.create_optimizer(self, model)
        return super().create_optimizer(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._bench_starts.append(_now(_SYNC_IN_STEP))
        lengths, label_tokens, patches, samples = batch_stats(inputs)
        self._bench_stats.append((sum(lengths), samples, flops_of_batch(self._bench_shapes, lengths, label_tokens, patches, self._bench_vision)))
        self._bench_largest[0] = max(self._bench_largest[0], sum(lengths))
        self._bench_largest[1] = max(self._bench_largest[1], len(patches))
        self._bench_profile_step(len(self._bench_starts) - 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._bench_phases is not None:
            self._bench_phases.mark("training_step done")
        self._bench_ends.append(_now(_SYNC_IN_STEP))
        return loss

    def _bench_profile_step(self, index: int) -> None:
        """BENCH_PROFILE=path: torch.profiler over steps 3..5 (rank 0), tables of the top ops written to path."""
        path = os.environ.get("BENCH_PROFILE")
        if not path or self.args.process_index != 0:
            return
        if index == 3:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            # with_stack: the trace gets the Python frames that bench/gpu_gaps.py reads the GPU's idle gaps with
            self._bench_profiler = torch.profiler.profile(activities=activities, with_stack=True)
            self._bench_profiler.__enter__()
        elif index == 6 and getattr(self, "_bench_profiler", None) is not None:
            self._bench_profiler.__exit__(None, None, None)
            self._bench_profiler.export_chrome_trace(path + ".trace.json")
            averages = self._bench_profiler.key_averages()
            with open(path, "w") as handle:
                for key in ("self_cuda_time_total", "self_cpu_time_total", "cpu_time_total"):
                    handle.write(f"=== sorted by {key} (steps 3-5) ===\n")
                    handle.write(averages.table(sort_by=key, row_limit=30, max_name_column_width=70) + "\n")
            self._bench_profiler = None

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self._bench_report()
        if self._bench_peaks is not None:
            with open(os.environ["BENCH_MEMORY"], "w") as handle:
                handle.write(self._bench_peaks.report())
        if self._bench_phases is not None:
            with open(os.environ["BENCH_PHASES"], "w") as handle:
                handle.write(self._bench_phases.report(first_step=self._bench_first_timed_step()))
        return output

    @staticmethod
    def _bench_warmup() -> int:
        warmup = int(os.environ.get("BENCH_WARMUP", "2"))
        if os.environ.get("BENCH_PROFILE"):
            # The profiler stops, and writes its tables (seconds), inside the 7th step: never time that step.
            warmup = max(warmup, 7)
        return warmup

    def _bench_first_timed_step(self, steps: int | None = None) -> int:
        """The first timed step, numbered from 1 as state.global_step (the timing starts at the end of the one before),
        of `steps` steps (by default those that ran)."""
        steps = len(self._bench_step_ends) if steps is None else steps
        return min(max(1, self._bench_warmup()), steps - 1) + 1

    def _bench_report(self) -> None:
        accum = self.args.gradient_accumulation_steps
        stats = torch.tensor(self._bench_stats, dtype=torch.float64)
        cuda = torch.cuda.is_available()
        peak = torch.tensor(
            # (BENCH_MEMORY resets the peak statistics at every mark: its own record has the peak)
            [(self._bench_peaks.highest() if self._bench_peaks else torch.cuda.max_memory_allocated()) / 1024**3 if cuda else 0.0,
             torch.cuda.max_memory_reserved() / 1024**3 if cuda else 0.0]
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
        first = self._bench_first_timed_step() - 1  # timed: steps first..steps-1 (0-based), from the end of step first-1
        timed = range(first, steps)
        total = ends[-1] - ends[first - 1]
        step_times = [ends[0] - self._bench_starts[0]] + [b - a for a, b in zip(ends, ends[1:])]
        micro = [stats[i * accum : (i + 1) * accum].sum(0).tolist() for i in timed]
        tokens, samples, flops = (sum(m[k] for m in micro) for k in range(3))
        # From a step's end to the next training_step: the GPU waits for the next batch (and Trainer bookkeeping).
        data_wait = [self._bench_starts[k * accum] - ends[k - 1] for k in range(1, steps)]
        # From the last backward of a step to its end: gradient clipping, optimizer step, scheduler, zero_grad.
        optimizer = [ends[k] - self._bench_ends[(k + 1) * accum - 1] for k in range(steps)]
        ds = getattr(self.args, "deepspeed", None)
        report = {
            "world_size": world,
            "deepspeed": ds,
            "steps": steps,
            "steps_timed": len(timed),
            "step_s_mean": total / len(timed),
            "tokens_per_s": tokens / total,
            "samples_per_s": samples / total,
            "tokens_per_s_per_gpu": tokens / total / world,
            "mfu": flops / total / PEAK_BF16_FLOPS / world,
            "tflops_per_s_per_gpu": flops / total / 1e12 / world,
            "peak_allocated_gib_per_rank": [p[0] for p in peaks],
            "peak_reserved_gib_per_rank": [p[1] for p in peaks],
            "largest_micro_batch_tokens": max(p[2] for p in peaks),
            "largest_micro_batch_views": max(p[3] for p in peaks),
            "optim": str(getattr(self.args.optim, "value", self.args.optim)),
            "synchronised": {"all": "training_step and step ends", "steps": "step ends", "window": "the timed window's ends"}.get(_SYNC, _SYNC),
            "loss_chunk_size": self.args.loss_chunk_size,
            "gradient_checkpointing": bool(self.args.gradient_checkpointing),
            "q_lora": any(type(m).__name__ == "Linear4bit" for m in self.model.modules()),
            "data_wait_fraction": sum(data_wait[k - 1] for k in timed) / total,
            "optimizer_fraction": sum(optimizer[k] for k in timed) / total,
            "step_times": step_times,
            "data_wait_s": data_wait,
            "optimizer_s": optimizer,
            "tune_vision": self._bench_vision,
            "losses": [entry["loss"] for entry in self.state.log_history if "loss" in entry],
            "phase_ms": self._bench_phases.by_phase(self._bench_first_timed_step()) if self._bench_phases else None,
            **ft.fast_paths_in_effect(self.model),
        }
        print("[bench] " + json.dumps(report), flush=True)
        path = os.environ.get("BENCH_TRAINER_JSON")
        if path:
            with open(path, "w") as handle:
                json.dump(report, handle, indent=1)


if __name__ == "__main__":
    ft.MiniCPMVTrainer = TimedTrainer  # (only when run: importing this module changes nothing in finetune.py)
    ft.cli()
