"""The benchmark's own tools on CPU: the text set's lengths, the results table, the GPU-gap and memory-peak readers (bench/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from helpers import case_data
from transformers import AutoTokenizer

import finetune  # noqa: F401
from finetune.dataset import DataSettings, SupervisedDataset
from finetune.model.image_processing import SliceSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_train import make_mm_dataset, make_text_dataset, mm_set_stats  # noqa: E402
from gpu_gaps import analyse  # noqa: E402
from memory_at_peak import PhasePeaks  # noqa: E402
from summarize import table  # noqa: E402
from time_by_phase import PhaseTimes, phase_of  # noqa: E402


def test_text_rows_are_as_long_as_asked_and_fit(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    settings = SliceSettings(112, 14, 9, 16)
    path = make_text_dataset(str(tmp_path), 3, tokenizer, settings, length=300)
    dataset = SupervisedDataset(DataSettings(path, model_max_length=300), tokenizer, settings)
    lengths = [len(dataset.prepare(i, load_pixels=False).input_ids) for i in range(len(dataset))]
    assert len(lengths) == 3 and all(276 <= n <= 300 for n in lengths), lengths
    assert all("image" not in sample for sample in json.loads(Path(path).read_text()))


def test_multimodal_set_can_be_made_with_a_given_average_of_views(tiny_model, tmp_path):
    """The upstream-like set's knob: images chosen so the set's mean view count (real slicing rule) is the one asked,
    exchanges within their range; the default set's parameters file keeps its old keys (a cached set stays valid)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    settings = SliceSettings(112, 14, 9, 16)
    free = mm_set_stats(make_mm_dataset(str(tmp_path / "free"), 24, tokenizer, settings, sides=(100, 400), turns=(2, 4)), tokenizer, settings)
    path = make_mm_dataset(str(tmp_path / "shaped"), 24, tokenizer, settings, sides=(100, 400), turns=(2, 4), mean_views=3.0)
    shaped = mm_set_stats(path, tokenizer, settings)
    assert abs(free["mean_views"] - 3.0) > 0.5, free  # the uniform draw alone lands elsewhere
    assert abs(shaped["mean_views"] - 3.0) < 0.1, shaped
    samples = json.loads(Path(path).read_text())
    assert all(2 <= len(sample["conversations"]) // 2 <= 4 for sample in samples)
    assert 2 <= shaped["mean_exchanges"] <= 4 and shaped["samples"] == 24
    default = make_mm_dataset(str(tmp_path / "default"), 2, tokenizer, settings)
    params = json.loads((Path(default).parent / "train.params.json").read_text())
    assert set(params) == {"num", "seed", "min_len", "max_len", "settings", "vocab"}


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


class _FakeMemory:
    """Stands in for torch.cuda's allocated / peak counters."""

    def __init__(self):
        self.now = self.top = 0

    def change(self, amount: int) -> None:
        self.now += amount
        self.top = max(self.top, self.now)

    def reset(self) -> None:
        self.top = self.now


def test_memory_peaks_are_placed_between_the_layer_marks(golden_dir, golden_cases):
    from transformers import AutoModel

    memory = _FakeMemory()
    peaks = PhasePeaks(allocated=lambda: memory.now, peak=lambda: memory.top, reset=memory.reset)
    model = AutoModel.from_pretrained(golden_dir).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # ZeRO-3's parameter attributes, faked on two parameters: lm_head gathered whole (and big), one norm not
    from types import SimpleNamespace

    head, norm = model.llm.lm_head.weight, model.llm.model.norm.weight
    head.ds_status, head.ds_persist, head.ds_numel = SimpleNamespace(name="AVAILABLE"), False, 200_000_000
    norm.ds_status, norm.ds_persist, norm.ds_numel = SimpleNamespace(name="NOT_AVAILABLE"), False, norm.numel()
    peaks.attach(model)
    mlp = model.llm.model.layers[0].mlp  # inside it, 100 bytes come and go, in forward and in recomputation
    mlp.register_forward_pre_hook(lambda *args: memory.change(100))
    mlp.register_forward_hook(lambda *args: memory.change(-100))
    case = golden_cases[3]
    model(data=_text_only(case), labels=case["input_ids"][None].clone()).loss.backward()
    peaks.mark("done")
    assert peaks.gathered[-1] == (200_000_000 * 4, ["llm.lm_head.weight"])
    assert peaks.highest() == 100
    top = [interval for interval in peaks.intervals if interval[4] == 100]
    assert [(start, end) for _, start, end, *_ in top] == [
        ("llm layer 0 begins", "llm layer 1 begins"), ("llm layer 0 begins (backward)", "done")
    ]  # fmt: skip
    assert peaks.report().splitlines()[0] == f"peak allocated over all intervals: {100 / 1024**3:.2f} GiB ({len(peaks.intervals)} intervals)"


def _text_only(case) -> dict:
    ids = case["input_ids"][None]
    empty = torch.zeros(0, 2, dtype=torch.int64)
    return {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None], "pixel_values": [[]], "tgt_sizes": [empty], "image_bound": [empty]}


def test_step_time_is_charged_to_the_phases_of_a_checkpointed_image_step(golden_dir, golden_cases):
    """Marks at every layer's start, in forward and in the recomputation, and where the resampler's gradients
    arrive: on a fake clock that ticks 1 ms a mark, every interval lands in its phase and the phases add up."""
    from types import SimpleNamespace

    from transformers import AutoModel

    clock = iter(range(10_000))
    times = PhaseTimes(record=lambda: next(clock), elapsed_ms=lambda start, end: float(end - start))
    model = AutoModel.from_pretrained(golden_dir, dtype=torch.float32).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    times.attach(model)
    case = next(c for c in golden_cases if len(c["pixel_values"]))
    data = case_data(case)
    for step in (1, 2):
        times.on_step_begin(None, SimpleNamespace(global_step=step - 1), None)
        model(data=data, labels=case["input_ids"][None].clone()).loss.backward()
        times.mark("training_step done")
        times.on_pre_optimizer_step(None, None, None)
        times.on_optimizer_step(None, None, None)
        times.on_step_end(None, None, None)
    labels = [label for step, label, _ in times.marks if step == 2]
    layers = (len(model.llm.model.layers), len(model.vpm.encoder.layers))
    # backward order: the LLM's layers last to first, then the resampler's gradients, then the vision layers
    backward = [label for label in labels if label.endswith("(backward)")]
    llm_backward = [f"llm layer {i} begins (backward)" for i in reversed(range(layers[0]))]
    vision_backward = [f"vision layer {i} begins (backward)" for i in reversed(range(layers[1]))]
    assert [b for b in backward if b.startswith("llm layer")] == llm_backward
    assert [b for b in backward if b.startswith("vision layer")] == vision_backward
    order = [backward.index(x) for x in (llm_backward[-1], "resampler output's gradient (backward)",
                                         "resampler input's gradient (backward)", vision_backward[0])]  # fmt: skip
    assert order == sorted(order)

    phases = times.by_phase(first_step=2)
    marks_in_step = len(labels)  # step 2's intervals: from each of its marks to the next (the last to step 3's none)
    assert sum(phases.values()) == marks_in_step - 1
    assert phases["llm layers: forward"] == layers[0] and phases["llm layers: recompute + backward"] == layers[0]
    assert phases["vision layers: forward"] == layers[1] and phases["vision layers: recompute + backward"] == layers[1]
    assert phases["optimizer step"] == 1 and phases["gradient norm + clipping"] == 1
    assert phase_of("lm_head in (backward)") == "loss (lm_head chunks): recompute + backward"
    assert "| llm layers: forward |" in times.report(first_step=2)


def test_window_timing_synchronises_only_where_the_timed_steps_start_and_end(monkeypatch):
    """BENCH_SYNC=window: the step ends before and at the end of the timed steps wait for the GPU, no other
    (the mean step time over the window stays exact while the host may run ahead inside it)."""
    from types import SimpleNamespace

    import trainer_bench

    synced = []
    monkeypatch.setattr(trainer_bench, "_now", lambda sync=True: synced.append(sync) or 0.0)
    for mode, expected in (("window", [False, False, True, False, False, True]), ("steps", [True] * 6)):
        synced.clear()
        monkeypatch.setattr(trainer_bench, "_SYNC", mode)
        ends = trainer_bench._StepEnds([], first_timed_step=lambda steps: 4)  # steps 4-6 timed, from step 3's end
        for step in range(1, 7):
            ends.on_step_end(None, SimpleNamespace(global_step=step, max_steps=6), None)
        assert synced == expected, mode


def test_the_baseline_without_checkpointing_is_the_plain_path_with_checkpointing_off():
    from types import SimpleNamespace

    from bench_train import ROW_BY_NAME, build_model

    from finetune.run_report import checkpointing_in_effect

    args = SimpleNamespace(tiny=True, fp32_trainable=False, fast_kernels="")
    built = {}
    for name in ("text_lora_baseline", "text_lora_baseline_nogc", "text_lora_suite_nogc"):
        torch.manual_seed(0)
        row = ROW_BY_NAME[name]
        model = build_model(row, args, torch.device("cpu"))
        built[name] = (row.baseline, model.get_base_model().dummy_image_stand_in, checkpointing_in_effect(model))
    # (baseline?, the suite's dummy-image stand-in, gradient checkpointing)
    assert built == {
        "text_lora_baseline": (True, False, True),
        "text_lora_baseline_nogc": (True, False, False),
        "text_lora_suite_nogc": (False, True, False),
    }
