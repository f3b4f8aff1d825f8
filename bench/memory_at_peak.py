"""What is alive at the CUDA memory peak, grouped by the code that allocated it.

    start_recording()            # before the steps of interest (returns bytes already allocated)
    ... train ...
    write_report(path, start)    # replays the allocator's trace and writes the table

`bench/trainer_bench.py` does both when BENCH_MEMORY=path is set. The caching allocator's trace (torch's
`_record_memory_history`, Python stacks only) is replayed: +size at every `alloc`, -size at every
`free_completed`; the peak is the largest running total, and the blocks alive at that moment are grouped by
(the innermost frame that is not torch plumbing, the innermost frame of this repository). Blocks allocated
before recording started (the loaded weights) are one line of their own, "before recording".
"""

from __future__ import annotations

from collections import defaultdict

import torch

GiB = 1024**3
# Frames that say nothing about who wanted the memory.
_PLUMBING = (
    "torch/nn/modules/module.py", "torch/utils/_contextlib.py", "contextlib.py", "functools.py",
    "torch/_tensor.py", "torch/autograd/graph.py", "torch/autograd/__init__.py", "torch/_ops.py",
    "torch/_compile.py", "torch/_dynamo/eval_frame.py", "torch/_library/", "torch/utils/_device.py",
)  # fmt: skip
_OURS = ("/finetune/", "/bench/")


def start_recording(max_entries: int = 2_000_000) -> int:
    torch.cuda.memory._record_memory_history("all", context="all", stacks="python", max_entries=max_entries)
    return torch.cuda.memory_allocated()


def _short(frame: dict) -> str:
    name = frame["filename"]
    if "site-packages/" in name:
        name = name.split("site-packages/", 1)[1]
    else:  # this repository's files from their folder on (finetune/..., bench/...)
        for ours in _OURS:
            if ours in name:
                name = name[name.rindex(ours) + 1 :]
                break
    return f"{name}:{frame['line']}({frame['name']})"


def owner(frames: list[dict]) -> tuple[str, str]:
    """(innermost frame outside torch plumbing, innermost frame of this repository); frames innermost first."""
    inner = next((f for f in frames if not any(p in f["filename"] for p in _PLUMBING)), frames[0] if frames else None)
    ours = next((f for f in frames if any(p in f["filename"] for p in _OURS)), None)
    return (_short(inner) if inner else "?", _short(ours) if ours else "-")


def live_at_peak(events: list[dict]) -> tuple[int, int, dict[int, dict]]:
    """(peak of the running total over the trace, index of the event that reached it, blocks alive then)."""
    running, peak, peak_index = 0, 0, -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            running += event["size"]
            if running > peak:
                peak, peak_index = running, index
        elif event["action"] == "free_completed":
            running -= event["size"]
    live: dict[int, dict] = {}
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    return peak, peak_index, live


def report(snapshot: dict, allocated_at_start: int, top: int = 30) -> str:
    device = torch.cuda.current_device()
    events = snapshot["device_traces"][device]
    peak, peak_index, live = live_at_peak(events)
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        group = groups[owner(event.get("frames", []))]
        group[0] += event["size"]
        group[1] += 1
    lines = [
        f"trace events: {len(events)} (the trace keeps the newest only; a full one starts at recording)",
        f"allocated before recording: {allocated_at_start / GiB:.2f} GiB",
        f"peak in the trace: {(allocated_at_start + peak) / GiB:.2f} GiB "
        f"(torch.cuda.max_memory_allocated: {torch.cuda.max_memory_allocated() / GiB:.2f} GiB)",
        f"allocation that reached it: {owner(events[peak_index].get('frames', [])) if peak_index >= 0 else '-'}",
        "",
        "| GiB alive at the peak | blocks | allocated at (innermost non-plumbing frame) | our frame |",
        "| ---: | ---: | --- | --- |",
        f"| {allocated_at_start / GiB:.3f} | - | before recording (weights and whatever the set-up left) | - |",
    ]
    for (inner, ours), (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {size / GiB:.3f} | {count} | {inner} | {ours} |")
    rest = sorted(groups.values(), key=lambda v: -v[0])[top:]
    if rest:
        lines.append(f"| {sum(v[0] for v in rest) / GiB:.3f} | {sum(v[1] for v in rest)} | {len(rest)} other places | |")
    return "\n".join(lines) + "\n"


def write_report(path: str, allocated_at_start: int) -> None:
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(None)
    with open(path, "w") as handle:
        handle.write(report(snapshot, allocated_at_start))
