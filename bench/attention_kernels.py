"""The attention kernels torch ships, on the shapes of a multimodal training step (H200), forward and backward.

    python3 bench/attention_kernels.py [--json out.json]

Part 26's profile (bench/README.md, "Update 9") put the vision tower's attention at ~14% of the upstream recipe's
GPU time: torch's flash kernel (`minicpmv::varlen_flash_attention`, FlashAttention-2 built into torch) runs
SigLIP's 72-wide heads with its 96-wide tiles. Each sample's views share one length (the views of a sample are
padded to its longest, as when it runs alone: `MiniCPMV.vision_features`), so the vision tower's attention
is also a handful of dense calls, one per sample, that other kernels can take. This times, on a step's worth
of views:

- `varlen flash`: the current call, all views packed, one varlen flash call;
- `dense <backend>`: one `scaled_dot_product_attention` call per sample ([views, heads, length, 72]), with
  SDPA held to one backend (flash, cuDNN, memory-efficient);

and the LLM's causal packed rows the same way; then the text speed mode's row (one 2048-token sample), where
the dense calls also run with the grouped key / value heads handed over as they are (`enable_gqa`, and
torch's cuDNN operator called directly), and where each method's first forward + backward at a new length
is timed too (cuDNN builds a plan per shape). FLOPs: 4 * length^2 * head_dim per head and sequence forward
(halved when causal), backward 2.5x forward. Every method's output and input gradients are compared with the
varlen flash call's (max abs difference, bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from finetune.model.attention import _flash_forward

# A step of part 24's best setting: 5 samples, 28 views; each sample's views padded to its longest (patches).
VISION_SAMPLES = [(6, 1024), (5, 1015), (7, 1024), (4, 986), (6, 1020)]
VISION_HEADS, VISION_HEAD_DIM = 16, 72
# The same step's LLM rows: 5 samples packed (tokens each), Llama-3-8B's heads.
LLM_SAMPLES = [(1, 700), (1, 900), (1, 1100), (1, 600), (1, 930)]
# The text speed mode's row: one 2048-token sample.
TEXT_ROW = [(1, 2048)]
LLM_HEADS, LLM_KV_HEADS, LLM_HEAD_DIM = 32, 8, 128

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def packed_inputs(samples, heads, kv_heads, head_dim, device):
    total = sum(n * length for n, length in samples)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(total, heads, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
    k = torch.randn(total, kv_heads, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
    v = torch.randn(total, kv_heads, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
    grad = torch.randn(total, heads, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
    return q, k, v, grad


def varlen_flash(q, k, v, samples, causal):
    lengths = [length for n, length in samples for _ in range(n)]
    cu = torch.tensor([0] + lengths, device=q.device).cumsum(0).to(torch.int32)
    return _flash_forward(q, k, v, cu, max(lengths), q.shape[-1] ** -0.5, causal)[0]


def dense_per_sample(q, k, v, samples, causal, backend, gqa: bool = False):
    """One SDPA call per sample on one backend; grouped key / value heads repeated to the query heads, or with `gqa`
    handed over as they are (enable_gqa)."""
    outputs, start = [], 0
    for n, length in samples:
        end = start + n * length
        # [n*L, H, D] -> [n, H, L, D]: a strided view, as the attention module hands it over
        dq, dk, dv = (t[start:end].view(n, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        if dk.shape[1] != dq.shape[1] and not gqa:
            dk, dv = (t.repeat_interleave(dq.shape[1] // t.shape[1], dim=1) for t in (dk, dv))
        with sdpa_kernel(BACKENDS[backend]):
            out = F.scaled_dot_product_attention(dq, dk, dv, is_causal=causal, enable_gqa=gqa)
        outputs.append(out.transpose(1, 2).reshape(n * length, dq.shape[1], dq.shape[3]))
        start = end
    return torch.cat(outputs)


def cudnn_op(q, k, v, causal):
    """One sequence through torch's cuDNN attention operator itself ([L, H, D] in and out), the key / value heads
    not repeated: what a custom op around it would call."""
    dq, dk, dv = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(dq, dk, dv, None, True, 0.0, causal, False, scale=q.shape[-1] ** -0.5)[0]
    return out[0].transpose(0, 1)


def timed(fn, iterations: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def first_call_ms(fn_at_length, lengths) -> float:
    """The mean time of a forward + backward at each of `lengths`, none seen before: what a backend that plans
    per shape (cuDNN) pays at every new sequence length."""
    times = []
    for length in lengths:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn_at_length(length)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sum(times) / len(times)


def measure(name, samples, heads, kv_heads, head_dim, causal, device) -> list[dict]:
    q, k, v, grad = packed_inputs(samples, heads, kv_heads, head_dim, device)
    forward_flops = sum(n * 4 * length**2 * head_dim * heads for n, length in samples) / (2 if causal else 1)
    methods = {"varlen flash": lambda q, k, v, samples=samples: varlen_flash(q, k, v, samples, causal)}
    methods.update({f"dense {b}": (lambda q, k, v, b=b, samples=samples: dense_per_sample(q, k, v, samples, causal, b)) for b in BACKENDS})
    if kv_heads != heads:
        methods.update({f"dense {b}, enable_gqa": (lambda q, k, v, b=b, samples=samples: dense_per_sample(q, k, v, samples, causal, b, gqa=True)) for b in BACKENDS})
    if len(samples) == 1 and samples[0][0] == 1:
        methods["aten cuDNN op, grouped heads as they are"] = lambda q, k, v, samples=samples: cudnn_op(q, k, v, causal)
    reference = None
    rows = []
    for method, fn in methods.items():
        row = {"shape": name, "method": method}
        try:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = fn(*leaves)
            out.backward(grad)
            result = [out.detach()] + [t.grad for t in leaves]
            if reference is None:
                reference = result
            row["max_abs_diff_out_dq_dk_dv"] = [float((a.float() - b.float()).abs().max()) for a, b in zip(result, reference)]
            with torch.no_grad():
                row["forward_ms"] = timed(lambda: fn(q, k, v))

            def forward_backward():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                fn(*leaves).backward(grad)

            row["forward_backward_ms"] = timed(forward_backward)
            if len(samples) == 1 and samples[0][0] == 1:  # one sequence: its length changed by 1..3 tokens

                def at_length(length, fn=fn):
                    leaves = [t[:length].detach().requires_grad_() for t in (q, k, v)]
                    fn(*leaves, samples=[(1, length)]).backward(grad[:length])

                row["new_length_first_call_ms"] = first_call_ms(at_length, [samples[0][1] - d for d in (1, 2, 3)])
            row["forward_tflops"] = forward_flops / row["forward_ms"] / 1e9
            row["forward_backward_tflops"] = 3.5 * forward_flops / row["forward_backward_ms"] / 1e9
        except RuntimeError as error:  # a backend that refuses the shape says why
            row["error"] = str(error).splitlines()[0][:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | method | forward ms | TFLOP/s | forward + backward ms | TFLOP/s | max abs diff (out, dq, dk, dv) | first forward + backward at a new length, ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | error: {r['error'][:90]} | | | | | |")
            continue
        diffs = ", ".join(f"{d:.3g}" for d in r["max_abs_diff_out_dq_dk_dv"])
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['forward_ms']:.3f} | {r['forward_tflops']:.0f} | "
            f"{r['forward_backward_ms']:.3f} | {r['forward_backward_tflops']:.0f} | {diffs} | {r.get('new_length_first_call_ms', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = measure("vision tower, 28 views x 16 heads x 72", VISION_SAMPLES, VISION_HEADS, VISION_HEADS, VISION_HEAD_DIM, False, device)
    rows += measure("LLM, 5 causal samples x 32 heads x 128 (8 KV)", LLM_SAMPLES, LLM_HEADS, LLM_KV_HEADS, LLM_HEAD_DIM, True, device)
    rows += measure("LLM, one 2048-token causal row x 32 heads x 128 (8 KV)", TEXT_ROW, LLM_HEADS, LLM_KV_HEADS, LLM_HEAD_DIM, True, device)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
