"""The benchmark's own tools on CPU: the text set's lengths, the results table, the GPU-gap and memory-peak readers (bench/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

import finetune  # noqa: F401
from finetune.dataset import SupervisedDataset
from finetune.model.image_processing import SliceSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_train import make_text_dataset  # noqa: E402
from gpu_gaps import analyse  # noqa: E402
from memory_at_peak import live_at_peak, owner  # noqa: E402
from summarize import table  # noqa: E402


def test_text_rows_are_as_long_as_asked_and_fit(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    settings = SliceSettings(112, 14, 9, 16)
    path = make_text_dataset(str(tmp_path), 3, tokenizer, settings, length=300)
    dataset = SupervisedDataset(path, tokenizer, settings=settings, model_max_length=300)
    lengths = [len(dataset.prepare(i, load_pixels=False).input_ids) for i in range(len(dataset))]
    assert len(lengths) == 3 and all(276 <= n <= 300 for n in lengths), lengths
    assert all("image" not in sample for sample in json.loads(Path(path).read_text()))


def test_summary_table_has_a_row_per_report():
    report = {"name": "t2_z3", "world_size": 2, "deepspeed": "finetune/ds_config_zero3_offload.json", "optim": "adamw_bnb_8bit",
              "loss_chunk_size": 512, "tokens_per_s": 1555.4, "samples_per_s": 0.76, "mfu": 0.025,
              "peak_allocated_gib_per_rank": [15.0, 15.88], "peak_reserved_gib_per_rank": [20.8, 20.7],
              "data_wait_fraction": 0.004, "optimizer_fraction": 0.008}  # fmt: skip
    fast = dict(report, name="fast", deepspeed=None, gradient_checkpointing=False, liger_rms_norm=True, loss_kernel="liger", compiled_layers=32)
    lines = table([report, dict(report, name="other", deepspeed=None), fast]).splitlines()
    assert len(lines) == 5
    assert lines[2] == "| t2_z3 | 2 | ZeRO-3 offload | 8-bit AdamW | 512 | GC | 1555 | 0.76 | 2.5% | 15.88 | 20.80 | 0.4% | 0.8% |"
    assert "| other | 2 | - |" in lines[3]
    assert "| fast | 2 | - | 8-bit AdamW | 512 | no GC, liger + fused CE, compiled layers | 1555 |" in lines[4]


def _event(category: str, name: str, start: float, duration: float, thread: int = 1) -> dict:
    return {"ph": "X", "cat": category, "name": name, "ts": start, "dur": duration, "tid": thread}


def test_gpu_gaps_are_charged_to_the_python_frames_open_on_the_launching_thread():
    trace = {"traceEvents": [
        _event("kernel", "gemm", 0, 10, thread=7), _event("kernel", "gemm", 5, 10, thread=7),  # overlap: busy 0-15
        _event("kernel", "norm", 40, 10, thread=7), _event("kernel", "add", 50.5, 1, thread=7),  # 0.5 us: below the floor
        _event("kernel", "gemm", 80, 20, thread=7),
        _event("cuda_runtime", "cudaLaunchKernel", 38, 1), _event("cuda_runtime", "cudaLaunchKernel", 78, 1),
        _event("cuda_runtime", "cudaLaunchKernel", 1, 1, thread=2),  # another thread, fewer launches: not read
        _event("python_function", "train_step", 0, 100), _event("python_function", "zero_grad", 16, 20),
        _event("python_function", "model.train", 55, 22), _event("python_function", "other thread", 0, 100, thread=2),
    ]}  # fmt: skip
    result = analyse(trace, min_gap_us=5)
    assert result["window_ms"] == 0.1 and result["busy_ms"] == (15 + 10 + 1 + 20) / 1e3
    assert result["gaps"] == [(15, 40), (51.5, 80)]
    assert dict(result["by_frames"]) == {
        ("zero_grad", "train_step"): [25.0, 1],
        ("model.train", "train_step"): [28.5, 1],
    }


def test_memory_peak_replays_allocations_and_frees():
    frames = [{"filename": "/x/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
              {"filename": "/x/site-packages/transformers/models/llama/modeling_llama.py", "line": 9, "name": "forward"},
              {"filename": "/work/main/finetune/model/modeling.py", "line": 3, "name": "forward"}]  # fmt: skip
    events = [
        {"action": "free_completed", "addr": 99, "size": 50},  # a block from before recording: lowers the total
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames},
        {"action": "alloc", "addr": 2, "size": 30, "frames": frames[2:]},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 10, "frames": []},  # 90: the peak (block 1 is not free yet)
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},  # 50
    ]  # fmt: skip
    peak, index, live = live_at_peak(events)
    assert (peak, index, sorted(live)) == (90, 4, [1, 2, 3])
    assert owner(frames) == ("transformers/models/llama/modeling_llama.py:9(forward)", "finetune/model/modeling.py:3(forward)")
