"""The benchmark on CPU: every suite end to end in its smoke mode (the table, its rows and the ratios computed from
them), and the measuring pieces it is built from (bench/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import case_data
from transformers import AutoTokenizer

import finetune  # noqa: F401
from bench.data import make_mm_dataset, make_text_dataset, mm_set_stats, prepare_workspace
from bench.phases import PhasePeaks, PhaseTimes, phase_of
from bench.suites import SUITES, main
from finetune.dataset import DataSettings, SupervisedDataset
from finetune.model.image_processing import SliceSettings


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
    free = mm_set_stats(
        make_mm_dataset(str(tmp_path / "free"), 24, tokenizer, settings, sides=(100, 400), turns=(2, 4)),
        tokenizer,
        settings,
    )
    path = make_mm_dataset(
        str(tmp_path / "shaped"), 24, tokenizer, settings, sides=(100, 400), turns=(2, 4), mean_views=3.0
    )
    shaped = mm_set_stats(path, tokenizer, settings)
    assert abs(free["mean_views"] - 3.0) > 0.5, free  # the uniform draw alone lands elsewhere
    assert abs(shaped["mean_views"] - 3.0) < 0.1, shaped
    samples = json.loads(Path(path).read_text())
    assert all(2 <= len(sample["conversations"]) // 2 <= 4 for sample in samples)
    assert 2 <= shaped["mean_exchanges"] <= 4 and shaped["samples"] == 24
    default = make_mm_dataset(str(tmp_path / "default"), 2, tokenizer, settings)
    params = json.loads((Path(default).parent / "train.params.json").read_text())
    assert set(params) == {"num", "seed", "min_len", "max_len", "settings", "vocab"}


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
    assert (
        peaks.report().splitlines()[0]
        == f"peak allocated over all intervals: {100 / 1024**3:.2f} GiB ({len(peaks.intervals)} intervals)"
    )


def _text_only(case) -> dict:
    ids = case["input_ids"][None]
    empty = torch.zeros(0, 2, dtype=torch.int64)
    return {
        "input_ids": ids,
        "position_ids": torch.arange(ids.shape[1])[None],
        "pixel_values": [[]],
        "tgt_sizes": [empty],
        "image_bound": [empty],
    }


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
    (the mean step time stays exact while the host may run ahead inside it)."""
    from types import SimpleNamespace

    from bench import trainer_bench

    synced = []
    monkeypatch.setattr(trainer_bench, "_now", lambda sync=True: synced.append(sync) or 0.0)
    for mode, expected in (("window", [False, False, True, False, False, True]), ("steps", [True] * 6)):
        synced.clear()
        ends = trainer_bench._StepEnds(
            [], first_timed_step=lambda steps: 4, sync=mode
        )  # steps 4-6 timed, from step 3's end
        for step in range(1, 7):
            ends.on_step_end(None, SimpleNamespace(global_step=step, max_steps=6), None)
        assert synced == expected, mode


def test_the_baseline_runs_the_dummy_image_and_checkpoints_as_its_row_says():
    from bench.loop import ROW_BY_NAME, build_model
    from finetune.run_report import checkpointing_in_effect

    built = {}
    for name in ("text_lora_baseline", "text_lora_baseline_nogc", "mm_upstream_baseline"):
        torch.manual_seed(0)
        model = build_model(ROW_BY_NAME[name], torch.device("cpu"), tiny=True)
        vision_trained = any(p.requires_grad for p in model.get_base_model().vpm.parameters())
        built[name] = (
            model.get_base_model().runtime_options.dummy_image_stand_in,
            checkpointing_in_effect(model),
            vision_trained,
        )
    # (the suite's dummy-image stand-in, gradient checkpointing, vision tower trained)
    assert built == {
        "text_lora_baseline": (False, True, False),
        "text_lora_baseline_nogc": (False, False, False),
        "mm_upstream_baseline": (False, True, True),
    }


# --- the suites end to end (smoke runs: the tiny model, a few steps, on the CPU) --------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The tiny checkpoint and data sets, built once for every smoke run of this module."""
    folder = tmp_path_factory.mktemp("bench")
    prepare_workspace(folder, tiny=True, mm_samples=8)
    return folder


def smoke_run(argv: list[str], workspace: Path, tmp_path: Path, capsys) -> tuple[int, list[str], dict]:
    """`python -m bench ARGV --smoke`: (exit status, the printed lines, the --json record)."""
    record = tmp_path / "run.json"
    status = main([*argv, "--smoke", "--work-dir", str(workspace), "--json", str(record)])
    return status, capsys.readouterr().out.splitlines(), json.loads(record.read_text())


def table(lines: list[str]) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """(the table's column titles, its rows by name, the ratios by label) of a printed suite."""
    cells = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = {cells(line)[0]: cells(line)[1:] for line in lines[start + 2 : end]}
    ratios = {cells(line)[0]: cells(line)[1] for line in lines if line.startswith("| ") and line.rstrip().endswith(("x |", "- |"))
              and line not in lines[start:end] and not line.startswith("| ratio")}  # fmt: skip
    return cells(lines[start]), rows, ratios


def check_header(lines: list[str], suite: str) -> None:
    assert lines[0] == f"## python -m bench {suite}"
    header = dict(line[2:].split(": ", 1) for line in lines[1:8] if line.startswith("- "))
    assert header["command"].startswith(f"python -m bench {suite} ") and "--smoke" in header["command"]
    assert header["device"].startswith("CPU") and f"torch {torch.__version__}" in header["versions"]
    assert header["date"].endswith("UTC") and header["workload"].startswith("SMOKE RUN")


def check_ratios(record: dict, printed: dict[str, str]) -> None:
    """Every ratio is the quotient of its two rows' numbers in this run, printed as such ('-' where either is missing)."""
    rows = {row["row"]: row for row in record["rows"]}
    assert list(printed) == [ratio["label"] for ratio in record["ratios"]]
    for ratio in record["ratios"]:
        top, bottom = (rows.get(ratio[name], {}).get(ratio["metric"]) for name in ("numerator", "denominator"))
        expected = top / bottom if top is not None and bottom else None
        assert ratio["value"] == expected
        assert printed[ratio["label"]] == ("-" if expected is None else f"{expected:.2f}x")


@pytest.mark.slow
def test_headline_smoke_run_prints_baseline_and_finetune_py_rows_with_ratios_from_the_same_run(
    workspace, tmp_path, capsys
):
    status, lines, record = smoke_run(["headline"], workspace, tmp_path, capsys)
    assert status == 0
    check_header(lines, "headline")
    columns, rows, ratios = table(lines)
    assert columns == ["row", "what runs", "tokens/s", "samples/s", "step s", "MFU", "peak alloc GiB", "data wait"]
    assert list(rows) == ["baseline", "baseline_nogc", "baseline_2rows", "speed_mode", "speed_mode_2rows",
                          "mm_baseline_upstream", "mm_baseline_lora", "mm_upstream", "mm_lora"]  # fmt: skip
    by_name = {row["row"]: row for row in record["rows"]}
    for name, cells in rows.items():
        row = by_name[name]
        assert (
            row["tokens_per_s"] > 0 and cells[1] == f"{row['tokens_per_s']:.0f}" and cells[-2] == "-"
        )  # no GPU: no peak
        assert row["kind"] == (
            "TrainerRow" if name in ("speed_mode", "speed_mode_2rows", "mm_upstream", "mm_lora") else "BaselineRow"
        )
    # finetune.py rows report what the Trainer ran: the speed mode without checkpointing, 2 samples a step at 2 rows
    speed, two_rows = by_name["speed_mode"]["report"], by_name["speed_mode_2rows"]["report"]
    assert not speed["gradient_checkpointing"] and speed["synchronised"] == "the timed window's ends"
    assert two_rows["samples_per_s"] == pytest.approx(2 / two_rows["step_s_mean"])
    assert (
        by_name["mm_upstream"]["report"]["optim"] == "adamw_bnb_8bit"
        and by_name["mm_upstream"]["report"]["tune_vision"]
    )
    assert all(ratio["value"] is not None for ratio in record["ratios"]) and len(ratios) == 6
    check_ratios(record, ratios)


@pytest.mark.parametrize(
    "suite, skipped", [("memory", {"upstream_zero2_offload_c512"}), ("qlora", {"lora_nf4_adamw", "lora_nf4_8bit_c512"})]
)
@pytest.mark.slow
def test_memory_suites_smoke_run_skip_only_what_needs_a_gpu(suite, skipped, workspace, tmp_path, capsys):
    status, lines, record = smoke_run([suite], workspace, tmp_path, capsys)
    assert status == 0
    check_header(lines, suite)
    columns, rows, ratios = table(lines)
    assert (
        columns[2:] == list(SUITES[suite].columns) == ["peak alloc GiB", "peak reserved GiB", "planner GiB", "tokens/s"]
    )
    assert list(rows) == [row.name for row in SUITES[suite].rows(2)]
    for name, cells in rows.items():
        if name in skipped:
            assert "(skipped: " in cells[0] and cells[1:] == ["-"] * 4
        else:
            assert cells[1:4] == ["-", "-", "-"] and float(cells[4]) > 0  # the CPU has no peak to read or to plan
    check_ratios(record, ratios)  # peak ratios: '-' without a GPU


@pytest.mark.slow
def test_multi_gpu_suites_smoke_run_their_rows_under_torchrun(workspace, tmp_path, capsys):
    status, lines, record = smoke_run(
        ["scaling", "--rows", "text_zero2_1gpu,text_zero2_2gpus"], workspace, tmp_path, capsys
    )
    assert status == 0
    check_header(lines, "scaling")
    columns, rows, ratios = table(lines)
    assert columns[2:] == ["GPUs", "tokens/s", "samples/s", "peak alloc GiB", "data wait"]
    assert list(rows) == ["text_zero2_1gpu", "text_zero2_2gpus"] and [rows[name][1] for name in rows] == ["1", "2"]
    reports = {row["row"]: row["report"] for row in record["rows"]}
    assert [reports[name]["world_size"] for name in rows] == [1, 2]
    assert all("ds_config_zero2.json" in reports[name]["deepspeed"] for name in rows)
    # two processes, one text row each a step: twice the samples of one process a step
    two = reports["text_zero2_2gpus"]
    assert two["samples_per_s"] == pytest.approx(2 / two["step_s_mean"])
    assert ratios == {"text: 2 GPUs / 1 GPU (tokens/s)": f"{two['tokens_per_s'] / reports['text_zero2_1gpu']['tokens_per_s']:.2f}x",
                      "multimodal: 2 GPUs / 1 GPU (samples/s)": "-"}  # fmt: skip
    check_ratios(record, ratios)


def test_zero3_suite_rows_run_finetune_py_with_the_lean_config_and_8bit_states(tmp_path):
    """The zero3 suite's rows take the scaling suite's torchrun path (run above); what is their own is
    finetune.py's arguments, which its parser must read as the lean ZeRO-3 recipe. (That recipe trains on two
    processes in tests/test_training.py.)"""
    from bench.suites import SUITES, Run, trainer_argv
    from finetune.arguments import parse_arguments

    run = Run("zero3", smoke=True, gpus=2, work_dir=tmp_path)
    run.workspace = prepare_workspace(tmp_path / "workspace", tiny=True, mm_samples=2, text_samples=2, checkpoint=False)
    rows = {row.name: row for row in SUITES["zero3"].rows(2)}
    assert set(rows) == {"upstream_zero3_2gpus", "lora_zero3_2gpus"}
    for name, tuned in (("upstream_zero3_2gpus", True), ("lora_zero3_2gpus", False)):
        assert rows[name].gpus == 2
        _, _, training, _ = parse_arguments(trainer_argv(rows[name], run, tmp_path / "out"))
        assert Path(training.deepspeed).name == "ds_config_zero3_lean.json"
        assert training.optim == "adamw_bnb_8bit" and training.tune_vision is tuned


def test_data_smoke_run_times_every_case_of_the_sample(tmp_path, capsys):
    status, lines, record = smoke_run(["data"], tmp_path, tmp_path, capsys)
    assert status == 0
    columns, rows, ratios = table(lines)
    assert columns == ["row", "mean ms", "p50 ms", "p95 ms", "cpu ms"]
    assert next(iter(rows)) == "prepare_sample (decode + slice + strips + tokenize)" and len(rows) == 9
    assert all(float(cells[0]) > 0 for cells in rows.values())
    check_ratios(record, ratios)


def test_a_trainer_report_becomes_the_planners_setup_and_refreshes_its_record(tmp_path):
    """What `--calibration FILE` writes: each finetune.py row's report as the Setup it ran (the largest micro-batch,
    the worst rank's peak), replacing the record of the same name, appending new ones; the planner reads it back."""
    from bench.calibration import measurement_of_report, refresh_calibration
    from finetune.plan import Setup, load_calibration

    reports = [
        {"world_size": 1, "deepspeed": None, "optim": "adamw_bnb_8bit", "loss_chunk_size": 512, "gradient_checkpointing": True,
         "q_lora": False, "tune_vision": True, "largest_micro_batch_tokens": 2048, "largest_micro_batch_views": 0,
         "peak_allocated_gib_per_rank": [20.48]},
        {"world_size": 2, "deepspeed": "finetune/ds_config_zero3_lean.json", "optim": "adamw_bnb_8bit", "loss_chunk_size": 512,
         "gradient_checkpointing": True, "q_lora": False, "tune_vision": False, "largest_micro_batch_tokens": 4000,
         "largest_micro_batch_views": 12, "peak_allocated_gib_per_rank": [10.0, 10.5], "vocab_sharded_loss": True},
    ]  # fmt: skip
    first, second = (measurement_of_report(name, report, "1 x GPU", "2030-01-01", "torch x", "a test")
                     for name, report in zip(("upstream_8bit_c512", "lora_zero3_2gpus"), reports, strict=True))  # fmt: skip
    assert first.setup == Setup(
        1, 0, False, True, 1, 2048, 0.0, False, True, loss_chunk=512, optim_8bit=True, vocab_shards=False
    )
    assert second.setup == Setup(
        2, 3, False, True, 1, 4000, 12.0, False, False, loss_chunk=512, optim_8bit=True, lean=True, vocab_shards=True
    )
    assert second.peak_gib == 10.5 and second.note == "largest micro-batch: 4000 tokens, 12 views"  # the worst rank
    assert measurement_of_report("cpu", dict(reports[0], peak_allocated_gib_per_rank=None), "cpu", "", "", "") is None

    path = tmp_path / "calibration.json"
    path.write_text(
        json.dumps(
            {
                "about": "kept",
                "records": [dict(first.record(), measured_peak_gib=99.0), {**first.record(), "name": "other"}],
            }
        )
    )
    refresh_calibration(path, [first, second])
    assert json.loads(path.read_text())["about"] == "kept"
    assert [(m.name, m.peak_gib) for m in load_calibration(path)] == [
        ("upstream_8bit_c512", 20.48),
        ("other", 20.48),
        ("lora_zero3_2gpus", 10.5),
    ]


# --- MiniCPM-V 2.6 and 2.0 (--version 2.6, --version 2.0) -------------------------------------------------------


def test_the_baseline_builds_the_full_size_2_6_with_its_own_dimensions():
    """The GPU path's model, on the meta device: the published 2.6 architecture, trainable as the row says, and
    the FLOP count's shapes read from it (hidden 3584, 28 layers, 4 KV heads, vocabulary 151666, 64 queries)."""
    from bench.loop import ROW_BY_NAME, build_model, model_shapes
    from finetune.model.versions import MINICPM_V_2_6, version_of

    model = build_model(ROW_BY_NAME["mm_upstream_baseline"], torch.device("meta"), version="2.6")
    base = model.get_base_model()
    assert version_of(base.config) is MINICPM_V_2_6 and type(base.llm).__name__ == "Qwen2ForCausalLM"
    assert base.config.num_key_value_heads == 4 and tuple(base.resampler.query.shape) == (64, 3584)
    assert any(p.requires_grad for p in base.vpm.parameters())  # the upstream recipe trains the vision tower
    shapes = model_shapes(model)
    assert (shapes["llm_layers"], shapes["llm_attn_width"]) == (28, 3584)
    assert shapes["lm_head_params"] == 151666 * 3584
    assert shapes["llm_layer_params"] == 28 * (3584 * 3584 * 2 + 3584 * 512 * 2 + 3 * 3584 * 18944)


def test_the_baseline_builds_the_full_size_2_0_with_its_own_dimensions():
    """The same for 2.0: MiniCPM-2.4B (40 MHA layers of 2304, vocabulary 122753), 64 queries of width 2304, and the
    timm-style tower's 26 blocks of width 1152 (27 built, the last dropped) in the FLOP count."""
    from bench.loop import ROW_BY_NAME, build_model, model_shapes
    from finetune.model.kernels import tower_layers
    from finetune.model.versions import MINICPM_V_2, version_of

    model = build_model(ROW_BY_NAME["mm_upstream_baseline"], torch.device("meta"), version="2.0")
    base = model.get_base_model()
    assert version_of(base.config) is MINICPM_V_2 and type(base.llm).__name__ == "MiniCPMForCausalLM"
    assert base.config.num_key_value_heads == 36 and tuple(base.resampler.query.shape) == (64, 2304)
    assert any(p.requires_grad for p in base.vpm.parameters())
    shapes = model_shapes(model)
    assert (shapes["llm_layers"], shapes["llm_attn_width"]) == (40, 2304)
    assert shapes["lm_head_params"] == 122753 * 2304
    assert shapes["llm_layer_params"] == 40 * (2304 * 2304 * 4 + 3 * 2304 * 5760)
    blocks = len(tower_layers(model, "vision"))
    assert (shapes["vision_layers"], shapes["vision_width"]) == (blocks, 1152) and blocks == 26
    assert shapes["vision_layer_params"] == 26 * (4 * 1152**2 + 2 * 1152 * 4304)


@pytest.mark.parametrize("version, query_num, llm_type", [("2.6", 64, "qwen"), ("2.0", 64, "minicpm")])
def test_version_settings_and_refusals(version, query_num, llm_type, tmp_path, capsys):
    from bench.data import Workspace, slice_settings
    from bench.suites import Run, TrainerRow, environment, trainer_argv

    assert slice_settings(False, version).query_num == query_num and slice_settings(False).query_num == 96
    assert slice_settings(True, version).query_num == 16
    run = Run("headline", True, 1, tmp_path, version=version)
    run.workspace = Workspace(
        tmp_path / "c", tmp_path / "t", tmp_path / "m", tmp_path / "u", True, tmp_path / "k", version
    )
    argv = trainer_argv(TrainerRow("r", "a row", "text"), run, tmp_path / "out")
    assert argv[argv.index("--llm_type") + 1] == llm_type
    assert f"MiniCPM-V {version} layout" in environment(True, version)["workload"]
    with pytest.raises(SystemExit) as stop:
        main(["qlora", "--version", version, "--smoke", "--work-dir", str(tmp_path)])
    assert (
        stop.value.code == 2
        and f"--version {version}: only the headline and memory suites run on it" in capsys.readouterr().err
    )


# version -> (--llm_type, the start of a text sample in its chat format)
VERSION_FORMATS = {"2.6": ("qwen", "<|im_start|>system\n"), "2.0": ("minicpm", "<s><用户>")}


@pytest.fixture(scope="module", params=list(VERSION_FORMATS))
def versioned_workspace(request, tmp_path_factory) -> tuple[str, Path]:
    """(version, folder): the version's tiny checkpoint, its tokenizer and data sets, built once for its smoke runs."""
    folder = tmp_path_factory.mktemp("bench_v" + request.param.replace(".", "_"))
    prepare_workspace(folder, tiny=True, mm_samples=8, version=request.param)
    return request.param, folder


@pytest.fixture
def versions_trained(monkeypatch) -> dict[str, list]:
    """Records what each row trained: the baseline's model version, finetune.py's command line."""
    from bench import loop, trainer_bench
    from finetune.model.versions import version_of

    seen: dict[str, list] = {"baseline": [], "finetune.py": []}
    build_model, run = loop.build_model, trainer_bench.run

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        seen["baseline"].append(version_of(model.get_base_model().config).name)
        return model

    def recording_run(argv, settings):
        seen["finetune.py"].append(list(argv))
        return run(argv, settings)

    monkeypatch.setattr(loop, "build_model", recording_build_model)
    monkeypatch.setattr(trainer_bench, "run", recording_run)
    return seen


def check_version_rows(
    seen: dict[str, list], version: str, workspace: Path, baseline_rows: int, trainer_rows: int
) -> None:
    from finetune.model.versions import version_of_dict

    suffix = "_v" + version.replace(".", "_")
    assert seen["baseline"] == [version] * baseline_rows
    assert len(seen["finetune.py"]) == trainer_rows
    for argv in seen["finetune.py"]:
        assert argv[argv.index("--llm_type") + 1] == VERSION_FORMATS[version][0]
        assert argv[argv.index("--model_name_or_path") + 1] == str(workspace / f"checkpoint_tiny{suffix}")
        assert Path(argv[argv.index("--data_path") + 1]).parent.parent == workspace / f"data_tiny{suffix}"
    config = json.loads((workspace / f"checkpoint_tiny{suffix}" / "config.json").read_text())
    assert version_of_dict(config).name == version


@pytest.mark.slow
def test_headline_smoke_run_on_a_version(versioned_workspace, versions_trained, tmp_path, capsys):
    version, workspace = versioned_workspace
    suffix = "_v" + version.replace(".", "_")
    status, lines, record = smoke_run(["headline", "--version", version], workspace, tmp_path, capsys)
    assert status == 0
    check_header(lines, "headline")
    assert f"MiniCPM-V {version}" in next(line for line in lines if line.startswith("- workload: "))
    _, rows, ratios = table(lines)
    assert list(rows) == [row.name for row in SUITES["headline"].rows(2)]
    assert all(row["tokens_per_s"] > 0 and all(map(math.isfinite, row["losses"])) for row in record["rows"])
    check_version_rows(versions_trained, version, workspace, baseline_rows=5, trainer_rows=4)
    # the text set is written in the version's chat format (2.6: ChatML with the default system turn, no BOS;
    # 2.0: BOS, then <用户>)
    text_path = workspace / f"data_tiny{suffix}" / "text" / "train.json"
    tokenizer = AutoTokenizer.from_pretrained(workspace / f"tokenizer{suffix}")
    dataset = SupervisedDataset(
        DataSettings(str(text_path), model_max_length=256), tokenizer, SliceSettings(112, 14, 9, 16)
    )
    ids = dataset.prepare(0, load_pixels=False).input_ids
    assert len(json.loads(text_path.read_text())) == 96
    assert tokenizer.decode(ids[:5]).startswith(VERSION_FORMATS[version][1])
    assert all(ratio["value"] is not None for ratio in record["ratios"])
    check_ratios(record, ratios)


@pytest.mark.slow
def test_memory_smoke_run_on_a_version(versioned_workspace, versions_trained, tmp_path, capsys):
    version, workspace = versioned_workspace
    status, lines, record = smoke_run(["memory", "--version", version], workspace, tmp_path, capsys)
    assert status == 0
    check_header(lines, "memory")
    _, rows, ratios = table(lines)
    assert list(rows) == [row.name for row in SUITES["memory"].rows(2)]
    for name, cells in rows.items():
        if name == "upstream_zero2_offload_c512":
            assert "(skipped: " in cells[0]
        else:
            assert cells[1:4] == ["-", "-", "-"] and float(cells[4]) > 0
    check_version_rows(versions_trained, version, workspace, baseline_rows=2, trainer_rows=4)
    check_ratios(record, ratios)


def test_the_planner_column_and_calibration_records_are_the_rows_version(tmp_path, monkeypatch):
    """A row with a measured peak gets the planner's prediction for the version it ran (a finetune.py report as a
    GPU run writes it, the training itself stood in for), and --calibration records it under that version, a 2.6
    row named <row>_v2_6 beside the 2.5 record of the same row."""
    import dataclasses

    from bench import trainer_bench
    from bench.calibration import setup_of_report
    from bench.data import Workspace
    from bench.suites import Run, TrainerRow, _refresh_calibration, run_trainer_row
    from finetune.plan import load_calibration, predict

    report = {"world_size": 1, "deepspeed": None, "optim": "adamw_torch", "loss_chunk_size": 2048, "gradient_checkpointing": True,
              "q_lora": False, "tune_vision": False, "largest_micro_batch_tokens": 2048, "largest_micro_batch_views": 0,
              "peak_allocated_gib_per_rank": [21.0], "peak_reserved_gib_per_rank": [23.0], "tokens_per_s": 5000.0,
              "samples_per_s": 2.4, "step_s_mean": 0.4, "mfu": 0.3, "data_wait_fraction": 0.0, "losses": [1.0]}  # fmt: skip
    monkeypatch.setattr(trainer_bench, "run", lambda argv, settings: report)
    planned, calibration = {}, tmp_path / "calibration.json"
    header = {"command": "python -m bench memory", "date": "2026-12-02 23:55 UTC", "device": "1 x GPU", "versions": "v"}
    for version in ("2.5", "2.6", "2.0"):
        run = Run("memory", True, 1, tmp_path / version, version=version)
        run.workspace = Workspace(*(tmp_path / name for name in "ctmu"), True, tmp_path / "k", version)
        result = run_trainer_row(TrainerRow("lora_adamw", "a row", "text"), run)
        planned[version] = result["planner_gib"]
        _refresh_calibration(calibration, header, [{"row": "lora_adamw", **result}], version)  # as run_suite lists it
    setup = setup_of_report(report)[0]
    assert planned["2.5"] == predict(setup)["total"]
    assert planned["2.6"] == predict(dataclasses.replace(setup, version="2.6"))["total"] != planned["2.5"]
    assert planned["2.0"] == predict(dataclasses.replace(setup, version="2.0"))["total"] < planned["2.5"]
    records = {m.name: m for m in load_calibration(calibration)}
    assert set(records) == {"lora_adamw", "lora_adamw_v2_6", "lora_adamw_v2_0"}
    assert records["lora_adamw_v2_6"].setup.version == "2.6" and records["lora_adamw_v2_0"].setup.version == "2.0"
    assert records["lora_adamw"].setup.version == "2.5" and records["lora_adamw_v2_6"].peak_gib == 21.0
