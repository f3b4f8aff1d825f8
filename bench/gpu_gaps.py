"""Where the GPU waits on the host: idle gaps in a torch.profiler trace and the Python code running during them.

    python3 bench/gpu_gaps.py TRACE.json [--min-gap-ms 0.05] [--top 25]

TRACE.json is a chrome trace that torch.profiler wrote with `with_stack=True` (trainer_bench.py's
BENCH_PROFILE and bench_train.py's --profile-dir write one beside their tables). The GPU's busy time is the
union of its kernel, memcpy and memset intervals; a gap is a stretch between them with nothing running. At
each gap's midpoint the host thread that launched the most kernels is looked at: the Python frames open there
(innermost first) say what the host was busy with while the GPU had nothing queued. Gaps are summed by their
innermost frames, so a slow host step shows up however many small gaps it causes.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The union of the GPU's activity intervals (microseconds), sorted."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in GPU_CATEGORIES)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_gaps(busy: list[tuple[float, float]], min_gap_us: float) -> list[tuple[float, float]]:
    return [(a_end, b_start) for (_, a_end), (b_start, _) in zip(busy, busy[1:]) if b_start - a_end >= min_gap_us]


def frames_at(python_events: list[dict], moments: list[float], depth: int = 3) -> list[tuple[str, ...]]:
    """For each moment, the innermost `depth` Python frames open then (events sorted by start): one sweep, the
    open frames kept as a list (the innermost frame is the shortest of those containing the moment)."""
    result: list[tuple[str, ...]] = [("(no Python frame open)",)] * len(moments)
    open_frames: list[dict] = []
    next_event = 0
    for index in sorted(range(len(moments)), key=moments.__getitem__):
        moment = moments[index]
        while next_event < len(python_events) and python_events[next_event]["ts"] <= moment:
            open_frames.append(python_events[next_event])
            next_event += 1
        open_frames = [e for e in open_frames if e["ts"] + e.get("dur", 0) >= moment]
        innermost = sorted(open_frames, key=lambda e: e.get("dur", 0))[:depth]
        if innermost:
            result[index] = tuple(e["name"] for e in innermost)
    return result


def launching_thread(events: list[dict]):
    launches = Counter(e["tid"] for e in events if e.get("cat") == "cuda_runtime" and "Launch" in e.get("name", ""))
    return launches.most_common(1)[0][0] if launches else None


def analyse(trace: dict, min_gap_us: float) -> dict:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    busy = busy_intervals(events)
    if not busy:
        return {"window_ms": 0.0, "busy_ms": 0.0, "gaps": [], "by_frames": {}}
    window = busy[-1][1] - busy[0][0]
    busy_total = sum(b - a for a, b in busy)
    gaps = idle_gaps(busy, min_gap_us)
    thread = launching_thread(events)
    python_events = sorted((e for e in events if e.get("cat") == "python_function" and e.get("tid") == thread), key=lambda e: e["ts"])
    by_frames: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0, 0])
    for (start, end), frames in zip(gaps, frames_at(python_events, [(a + b) / 2 for a, b in gaps])):
        entry = by_frames[frames]
        entry[0] += end - start
        entry[1] += 1
    return {"window_ms": window / 1e3, "busy_ms": busy_total / 1e3, "gaps": gaps, "by_frames": by_frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--min-gap-ms", type=float, default=0.05)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with open(args.trace) as handle:
        result = analyse(json.load(handle), args.min_gap_ms * 1e3)
    window, busy = result["window_ms"], result["busy_ms"]
    gap_total = sum(b - a for a, b in result["gaps"]) / 1e3
    print(f"{args.trace}: GPU window {window:.1f} ms, busy {busy:.1f} ms ({busy / max(window, 1e-9):.1%}), "
          f"{len(result['gaps'])} gaps >= {args.min_gap_ms} ms totalling {gap_total:.1f} ms")  # fmt: skip
    print("| idle ms | gaps | Python frames open on the launching thread (innermost first) |")
    print("| ---: | ---: | --- |")
    for frames, (idle, count) in sorted(result["by_frames"].items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {idle / 1e3:.2f} | {count} | {' < '.join(frames)} |")


if __name__ == "__main__":
    main()
