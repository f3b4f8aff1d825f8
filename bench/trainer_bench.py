"""finetune/finetune.py with step timing: the REAL Trainer path (DeepSpeed ZeRO-2/3, torchrun), measured.

    torchrun --nproc_per_node 2 bench/trainer_bench.py <finetune.py arguments> [--deepspeed ...]
    env BENCH_TRAINER_JSON=out.json (rank 0 writes it), BENCH_WARMUP=2 (steps left out of the timing)

It runs finetune.finetune.cli() unchanged, with MiniCPMVTrainer replaced by a subclass that only adds timing:
at the start of every training_step it synchronises the GPU and takes a timestamp, so the interval between two
consecutive starts is one whole optimizer step (data loading, forward, backward, ZeRO communication, optimizer).
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

import finetune.finetune as ft  # noqa: E402
from bench_train import PEAK_BF16_FLOPS, batch_stats, flops_of_batch, model_shapes  # noqa: E402


class TimedTrainer(ft.MiniCPMVTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bench_starts: list[float] = []
        self._bench_ends: list[float] = []
        self._bench_stats: list[tuple[int, int, float]] = []  # (tokens, samples, flops) of this rank's micro-batch
        self._bench_shapes = model_shapes(self.model)
        self._bench_vision = bool(self.args.tune_vision)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._bench_starts.append(time.perf_counter())
        lengths, label_tokens, patches, samples = batch_stats(inputs)
        self._bench_stats.append((sum(lengths), samples, flops_of_batch(self._bench_shapes, lengths, label_tokens, patches, self._bench_vision)))
        self._bench_profile_step(len(self._bench_starts) - 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._bench_ends.append(time.perf_counter())  # start of the next step minus this = data wait + optimizer step
        return loss

    def _bench_profile_step(self, index: int) -> None:
        """BENCH_PROFILE=path: torch.profiler over steps 3..5 (rank 0), tables of the top ops written to path."""
        path = os.environ.get("BENCH_PROFILE")
        if not path or self.args.process_index != 0:
            return
        if index == 3:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._bench_profiler = torch.profiler.profile(activities=activities)
            self._bench_profiler.__enter__()
        elif index == 6 and getattr(self, "_bench_profiler", None) is not None:
            self._bench_profiler.__exit__(None, None, None)
            averages = self._bench_profiler.key_averages()
            with open(path, "w") as handle:
                for key in ("self_cuda_time_total", "self_cpu_time_total", "cpu_time_total"):
                    handle.write(f"=== sorted by {key} (steps 3-5) ===\n")
                    handle.write(averages.table(sort_by=key, row_limit=30, max_name_column_width=70) + "\n")
            self._bench_profiler = None

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._bench_starts.append(time.perf_counter())  # end of the last step (includes its optimizer step)
        self._bench_report()
        return output

    def _bench_report(self) -> None:
        warmup = int(os.environ.get("BENCH_WARMUP", "2"))
        accum = self.args.gradient_accumulation_steps
        starts = self._bench_starts[::accum] if accum > 1 else self._bench_starts
        stats = torch.tensor(self._bench_stats, dtype=torch.float64)
        cuda = torch.cuda.is_available()
        peak = torch.tensor(
            [torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0, torch.cuda.max_memory_reserved() / 1024**3 if cuda else 0.0],
            dtype=torch.float64,
        )
        world = self.args.world_size
        if world > 1 and torch.distributed.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            gathered_stats = [torch.zeros_like(stats, device=device) for _ in range(world)]
            torch.distributed.all_gather(gathered_stats, stats.to(device))
            gathered_peak = [torch.zeros_like(peak, device=device) for _ in range(world)]
            torch.distributed.all_gather(gathered_peak, peak.to(device))
            stats = sum(s.cpu() for s in gathered_stats)
            peaks = [p.cpu().tolist() for p in gathered_peak]
        else:
            peaks = [peak.tolist()]
        if self.args.process_index != 0:
            return
        steps = len(starts) - 1
        timed = range(min(warmup, steps - 1), steps)
        total = starts[timed[-1] + 1] - starts[timed[0]]
        micro = [stats[i * accum : (i + 1) * accum].sum(0).tolist() for i in timed]
        tokens, samples, flops = (sum(m[k] for m in micro) for k in range(3))
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
            "step_times": [starts[i + 1] - starts[i] for i in range(steps)],
            "between_steps_s": [self._bench_starts[i + 1] - self._bench_ends[i] for i in range(len(self._bench_ends) - 1)],
            "tune_vision": self._bench_vision,
        }
        print("[bench] " + json.dumps(report), flush=True)
        path = os.environ.get("BENCH_TRAINER_JSON")
        if path:
            with open(path, "w") as handle:
                json.dump(report, handle, indent=1)


ft.MiniCPMVTrainer = TimedTrainer

if os.environ.get("BENCH_NO_CUDNN_SDPA"):
    # Experiment: torch's cuDNN attention plans every new shape on the CPU (packed lengths change every step).
    torch.backends.cuda.enable_cudnn_sdp(False)

if __name__ == "__main__":
    ft.cli()
