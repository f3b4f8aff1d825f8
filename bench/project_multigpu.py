"""PROJECTION (not a measurement) of the 2 / 4 / 8-GPU table for LoRA, upstream recipe, 2048 tokens, batch 1.

    python bench/project_multigpu.py [--busbw-gbs 350] [--step-s 0.55]

Memory per GPU comes from finetune.plan's memory model (calibrated on 1-GPU H200 measurements; its ZeRO-2
term over-predicted a 1-GPU Trainer run by 14%, its ZeRO-3 terms are unvalidated). Time per step = the measured
1-GPU step time of the same work (`--step-s`, default: bench_train.py text_upstream_suite, 0.548 s) plus the
communication that cannot overlap, from the volume ZeRO moves per step over NCCL at `--busbw-gbs` bus bandwidth:
  ZeRO-2: reduce-scatter of the trainable gradients + all-gather of the updated trainable weights (bf16):
          2 x (N-1)/N x 2 bytes x trainable
  ZeRO-3: the above + all-gather of every bf16 weight in forward, recomputed forward and backward:
          + 3 x (N-1)/N x 2 bytes x all parameters
Counted as fully exposed (no overlap): a lower bound on efficiency. Full fine-tuning is not in the memory model.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from finetune.plan import Setup, parameter_counts, predict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--busbw-gbs", type=float, default=350.0, help="NCCL bus bandwidth per GPU, GB/s (assumed)")
    parser.add_argument("--step-s", type=float, default=0.548, help="measured 1-GPU step time of the same work")
    args = parser.parse_args()
    counts = parameter_counts()
    trainable = counts.lora_per_rank * 64 + counts.resampler + counts.vision
    print("PROJECTION from finetune.plan's memory model and ZeRO's communication volume; nothing here was measured.\n")
    print("| GPUs | ZeRO | offload | predicted peak GiB/GPU | comm GB/step/GPU | step s | tokens/s per GPU | scaling efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for gpus in (2, 4, 8):
        for stage in (2, 3):
            for offload in (False, True):
                peak = predict(Setup(gpus=gpus, zero_stage=stage, offload=offload, tokens_per_sample=2048))["total"]
                share = (gpus - 1) / gpus
                volume = 2 * share * 2 * trainable + (3 * share * 2 * counts.total if stage == 3 else 0)
                comm = volume / (args.busbw_gbs * 1e9)
                step = args.step_s + comm  # offload's CPU optimizer step is not modelled
                print(f"| {gpus} | {stage} | {'optimizer' + (' + params' if stage == 3 else '') if offload else 'no'} | "
                      f"{peak:.1f} | {volume / 1e9:.1f} | {step:.3f}{' + CPU Adam' if offload else ''} | {2048 / step:.0f} | {args.step_s / step:.0%} |")


if __name__ == "__main__":
    main()
