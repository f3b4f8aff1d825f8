"""finetune.plan: the memory model, the recommended settings, --emit-args, and AUTO=1 in the launcher (CPU only)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PYTHON_BIN, ROOT
from transformers import HfArgumentParser

from finetune.arguments import DataArguments, LoraArguments, ModelArguments, TrainingArguments
from finetune.plan import CONSTANTS, Setup, activation_scales, main, make_plan, parameter_counts, predict, vision_scale


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(12, 4)


def parse_flags(flags: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    base = ["--data_path", "x.json", "--output_dir", "/tmp/plan-out", "--report_to", "none"]
    return parser.parse_args_into_dataclasses(args=base + flags)


def test_parameter_counts_from_the_meta_model():
    counts = parameter_counts()
    assert round(counts.total / 1e9, 2) == 8.54
    assert round(counts.vision / 1e6) == 418 and round(counts.resampler / 1e6) == 89
    assert counts.lora_per_rank * 64 == 54_525_952  # r64 on q/k/v/o of 32 layers


def test_weights_terms():
    bf16 = predict(Setup(q_lora=False, tune_vision=False, fp32_trainable=False))["weights"]
    nf4 = predict(Setup(q_lora=True, tune_vision=False, fp32_trainable=False))["weights"]
    assert 15.9 < bf16 < 16.2  # 15.9 GiB + the resampler's modules_to_save copy
    assert 6.2 < nf4 < 6.6


@pytest.mark.parametrize(
    "gpus, mem, q_lora, stage_expected",
    [
        (1, 24, False, {0}),
        (1, 80, False, {0}),
        (2, 24, False, {2}),
        (8, 80, False, {2}),
        (1, 24, True, {0}),
        (1, 80, True, {0}),
        (2, 24, True, {2}),
        (8, 80, True, {2}),
    ],
)
def test_plans_for_common_cards(gpus, mem, q_lora, stage_expected):
    plan = make_plan(gpus, mem, q_lora=q_lora, target_global_batch=16)
    assert plan.fits, plan.message
    assert plan.setup.zero_stage in stage_expected
    assert plan.predicted["total"] + 1.5 <= mem
    assert (
        plan.global_batch >= 16
        and plan.global_batch == gpus * plan.setup.micro_batch * plan.gradient_accumulation_steps
    )
    assert not (q_lora and plan.setup.zero_stage == 3), "bnb 4-bit weights cannot be sharded by ZeRO-3"
    text = plan.format()
    assert "predicted peak per GPU" in text and "--per_device_train_batch_size" in text


def test_predictions_are_monotone():
    zero3 = [predict(Setup(gpus=n, zero_stage=3))["total"] for n in (1, 2, 4, 8)]
    assert zero3 == sorted(zero3, reverse=True) and zero3[-1] < zero3[0]
    zero2 = [predict(Setup(gpus=n, zero_stage=2))["total"] for n in (1, 2, 4, 8)]
    assert zero2 == sorted(zero2, reverse=True)
    for kwargs in ({}, {"q_lora": True}, {"zero_stage": 2, "gpus": 2}):
        assert (
            predict(Setup(gradient_checkpointing=True, **kwargs))["total"]
            < predict(Setup(gradient_checkpointing=False, **kwargs))["total"]
        )
    assert predict(Setup(q_lora=True))["total"] < predict(Setup())["total"]
    assert predict(Setup(tune_vision=False))["total"] < predict(Setup())["total"]
    assert predict(Setup(zero_stage=2, offload=True, gpus=2))["total"] < predict(Setup(zero_stage=2, gpus=2))["total"]
    sizes = [predict(Setup(micro_batch=b))["total"] for b in (1, 2, 4)]
    assert sizes == sorted(sizes)


def test_memory_levers_and_their_flags():
    """The 8-bit optimizer and the small loss chunk are priced and emitted as finetune.py flags."""
    plain, small_chunk = predict(Setup(loss_chunk=2048)), predict(Setup(loss_chunk=512))
    assert plain["logits"] - small_chunk["logits"] > 1.5 and plain["weights"] == small_chunk["weights"]
    eight_bit = predict(Setup(loss_chunk=512, optim_8bit=True))
    trained = parameter_counts().resampler + parameter_counts().vision + parameter_counts().lora_per_rank * 64
    assert eight_bit["optimizer_and_grads"] == pytest.approx(small_chunk["optimizer_and_grads"] - trained * 6 / 1024**3)
    # Between "fits in fp32 Adam" and "needs offload" there is a card size where 8-bit states are the plan
    # (make_plan's worst case without data: one image of 9 slices + its overview per sample).
    worst_case = predict(Setup(loss_chunk=512, optim_8bit=True, views_per_sample=10.0))["total"]
    plan = make_plan(1, worst_case + 1.5 + 0.1)
    assert plan.fits and plan.setup.optim_8bit and plan.setup.zero_stage == 0 and not plan.setup.offload
    _, _, training_args, _ = parse_flags(plan.flags())
    assert str(getattr(training_args.optim, "value", training_args.optim)) == "adamw_bnb_8bit"
    assert training_args.loss_chunk_size == 512 and not training_args.deepspeed


def test_lean_zero3_with_8bit_states_is_the_multi_gpu_lever_before_offload():
    """ds_config_zero3_lean.json + --optim adamw_bnb_8bit: 6 bytes less per trained parameter (sharded) and fewer
    live parameters; emitted flags that finetune.py accepts (the lean config has no optimizer of its own)."""
    from finetune.arguments import check_optimizer_choice

    standard, lean = (
        predict(Setup(gpus=2, zero_stage=3)),
        predict(Setup(gpus=2, zero_stage=3, optim_8bit=True, lean=True)),
    )
    assert standard["total"] - lean["total"] > 2.0
    fit = predict(Setup(gpus=2, zero_stage=3, loss_chunk=512, optim_8bit=True, lean=True, views_per_sample=10.0))[
        "total"
    ]
    plan = make_plan(2, fit + 1.5 + 0.05)
    assert (
        plan.fits
        and plan.setup.zero_stage == 3
        and plan.setup.lean
        and plan.setup.optim_8bit
        and not plan.setup.offload
    )
    _, _, training_args, _ = parse_flags(plan.flags())
    assert Path(training_args.deepspeed).name == "ds_config_zero3_lean.json"
    check_optimizer_choice(training_args)  # no "--optim has no effect" error: DeepSpeed wraps the Trainer's optimizer
    assert "ZeRO-3 (lean" in plan.format()


def test_zero3_plans_count_lm_head_as_never_gathered_only_where_the_loss_runs_on_its_vocabulary_shards():
    """Measured on 2 x H200 (bench/README.md): 0.94 GiB less per GPU with the loss on the shards. The shards need
    the parameters on the GPU and N dividing the 128,256-row vocabulary; elsewhere lm_head is gathered."""
    lm_head_gib = 128256 * 4096 * 2 / 2**30
    for gpus in (2, 8):
        sharded, gathered = (
            predict(Setup(gpus=gpus, zero_stage=3, loss_chunk=512, vocab_shards=v))["total"] for v in (True, False)
        )
        assert gathered - sharded == pytest.approx(lm_head_gib + 512 * 128256 * 10 * (1 - 1 / gpus) / 2**30)
    for setup in (Setup(gpus=5, zero_stage=3), Setup(gpus=2, zero_stage=3, offload=True), Setup(gpus=2, zero_stage=2)):
        assert predict(setup) == predict(dataclasses.replace(setup, vocab_shards=False))


def test_more_memory_never_gives_a_slower_plan():
    smallest, small, large = make_plan(1, 21), make_plan(1, 24), make_plan(1, 141)
    assert smallest.setup.offload and not small.setup.offload  # offload only where nothing faster fits
    assert small.setup.optim_8bit and not large.setup.optim_8bit and large.setup.loss_chunk == 2048
    assert large.setup.zero_stage == 0 and not large.setup.gradient_checkpointing


@pytest.mark.parametrize("argv", [["--gpus", "1", "--gpu-mem", "24"], ["--gpus", "2", "--gpu-mem", "24"],
                                  ["--gpus", "8", "--gpu-mem", "80"], ["--gpus", "1", "--gpu-mem", "24", "--q_lora"]])  # fmt: skip
def test_emit_args_parse_with_finetune_parser(argv, capsys):
    assert main([*argv, "--emit-args"]) == 0
    line = capsys.readouterr().out.strip()
    flags = shlex.split(line)
    _, data_args, training_args, lora_args = parse_flags(flags)
    plan = make_plan(int(argv[1]), float(argv[3]), q_lora="--q_lora" in argv)
    assert training_args.per_device_train_batch_size == plan.setup.micro_batch
    assert training_args.gradient_accumulation_steps == plan.gradient_accumulation_steps
    assert training_args.gradient_checkpointing == plan.setup.gradient_checkpointing
    assert data_args.max_slice_nums == plan.max_slice_nums
    assert lora_args.q_lora == ("--q_lora" in argv)
    if plan.setup.zero_stage:
        assert Path(training_args.deepspeed).is_file() and f"zero{plan.setup.zero_stage}" in training_args.deepspeed
    else:
        assert not training_args.deepspeed


def test_a_plan_that_cannot_fit_says_so(capsys):
    assert main(["--gpus", "1", "--gpu-mem", "6"]) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "--q_lora" in err
    assert main(["--gpus", "1", "--gpu-mem", "6", "--q_lora", "--emit-args"]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_plan_from_data_lengths(tiny_model, demo, capsys):
    assert main(["--gpus", "1", "--gpu-mem", "80", "--model", str(tiny_model), "--data", str(demo / "train.json")]) == 0
    out = capsys.readouterr().out
    assert "data token lengths" in out
    length = int(out.split("model_max_length:")[1].split()[0])
    assert length % 64 == 0 and length < 2048  # demo samples are short: the plan shrinks model_max_length


@pytest.mark.slow
def test_launcher_auto_applies_the_plan_and_user_flags_win(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    torchrun = fake / "torchrun"
    torchrun.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    torchrun.chmod(torchrun.stat().st_mode | stat.S_IEXEC)
    # A GPU machine (the launcher's DeepSpeed default is ZeRO-2 only where nvidia-smi lists a GPU).
    nvidia_smi = fake / "nvidia-smi"
    nvidia_smi.write_text('#!/bin/sh\necho "GPU 0: stand-in"\necho "GPU 1: stand-in"\n')
    nvidia_smi.chmod(nvidia_smi.stat().st_mode | stat.S_IEXEC)
    env = dict(
        os.environ,
        PATH=f"{fake}:{PYTHON_BIN}:{os.environ['PATH']}",
        AUTO="1",
        GPU_MEM="24",
        GPUS_PER_NODE="2",
        PYTHON=sys.executable,
        DATA="x.json",
        PYTHONPATH=str(ROOT),
        PREFLIGHT="0",
    )  # fmt: skip  (no data file here: the flags, not the preflight, are tested)
    launcher = ROOT / "finetune" / "finetune_lora.sh"
    result = subprocess.run(
        ["sh", str(launcher), "--per_device_train_batch_size", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert "[auto]" in args[0]
    argv = args[args.index("--model_name_or_path") :]
    flags = list(argv)
    expected = make_plan(2, 24).flags()
    planned = expected[expected.index("--deepspeed") + 1]
    assert flags.count("--deepspeed") == 2 and flags[len(flags) - 1 - flags[::-1].index("--deepspeed") + 1] == planned
    last = len(flags) - 1 - flags[::-1].index("--per_device_train_batch_size")
    assert flags[last + 1] == "7", "the user's explicit flag must come last (and win)"
    _, _, training_args, _ = parse_flags(argv)
    assert training_args.per_device_train_batch_size == 7 and training_args.deepspeed == planned
    assert training_args.gradient_accumulation_steps == int(
        expected[expected.index("--gradient_accumulation_steps") + 1]
    )

    env["GPU_MEM"] = "4"
    result = subprocess.run(["sh", str(launcher)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "does not fit" in result.stderr


def test_validate_compares_every_shipped_measurement_with_its_prediction(capsys):
    """--validate reads the calibration file shipped beside the planner: a row per measured configuration, the
    prediction of its Setup against its measured peak. 2.5's (the fit): every prediction within 16% (the compiled
    speed mode at two rows is the worst, over-predicted), ZeRO-3 on the safe side. 2.6's (the fit scaled): within
    3% with activation checkpointing; without it over-predicted, by less than 25%."""
    from finetune.plan import load_calibration

    measurements = load_calibration()
    assert main(["--validate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| configuration | GPUs | predicted GiB | measured GiB | error |") and len(
        lines
    ) == 2 + len(measurements)
    assert len({m.name for m in measurements}) == len(measurements)
    for measurement, line in zip(measurements, lines[2:], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        predicted, measured, error = float(cells[2]), float(cells[3]), float(cells[4].rstrip("%"))
        assert cells[0] == measurement.name and predicted == round(predict(measurement.setup)["total"], 2)
        assert measured == round(measurement.peak_gib, 2), line
        version = measurement.setup.version
        if version == "2.6" and not measurement.setup.gradient_checkpointing:
            assert 0 < error < 25, line
        else:
            assert abs(error) < {"2.5": 16, "2.6": 3, "2.0": 5}[version], line
        if measurement.setup.zero_stage == 3:
            assert error > 0, line
    names = {m.name for m in measurements}
    assert {"upstream_8bit_c512", "lora_nf4_8bit_c512", "speed_mode", "mm_upstream", "lora_zero3_2gpus"} <= names
    assert {"upstream_adamw_v2_6", "mm_upstream_v2_6", "speed_mode_v2_6"} <= names
    assert {"upstream_adamw_v2_0", "mm_upstream_v2_0", "mm_lora_v2_0", "speed_mode_v2_0"} <= names


def test_a_calibration_file_given_on_the_command_line_is_read(tmp_path, capsys):
    import json

    from finetune.plan import Measurement

    setup = Setup(gpus=2, zero_stage=3, loss_chunk=512, optim_8bit=True, lean=True, tune_vision=False)
    record = Measurement("mine", setup, 10.0, "2 x some GPU", "2030-01-01", "torch x", "a test", "text 2048").record()
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"records": [record]}))
    assert main(["--validate", str(path)]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    predicted = predict(setup)["total"]
    assert (
        line
        == f"| mine | 2 | {predicted:.2f} | 10.00 | {100 * (predicted - 10) / 10:+.1f}% | 2030-01-01, 2 x some GPU | text 2048 |"
    )


# --- MiniCPM-V 2.0 (2.5's LLM constants scaled to its sizes, its own per-view vision constants) ---------------

REFERENCE_V2 = Path(__file__).resolve().parent / "reference_v2"


def test_parameter_counts_of_2_0_are_the_published_ones():
    """Counted on the meta device from the published 2.0 config: the totals of its checkpoint index (FACTS.md),
    LoRA on the LLM's q/k/v/o only (MiniCPM's 40 MHA layers of 2304: every projection 2304 -> 2304)."""
    import json

    from finetune.synthetic import REFERENCE_CONFIGS

    counts = parameter_counts("2.0")
    published = REFERENCE_CONFIGS["2.0"]
    assert counts.total == 3_434_965_792
    assert (counts.vision, counts.resampler) == (397_747_744, 29_514_240)
    assert counts.total - counts.vision - counts.resampler == 3_007_703_808  # the LLM
    assert counts.vocab == published["vocab_size"] == 122_753 and counts.lm_head == 122_753 * 2304
    hidden, layers = published["hidden_size"], published["num_hidden_layers"]
    assert counts.lora_per_rank == layers * 4 * (hidden + hidden)
    index = json.loads((REFERENCE_V2 / "model.safetensors.index.json").read_text())
    assert counts.total * 2 == index["metadata"]["total_size"]  # bf16


def test_2_0_activations_and_vision_scale_with_its_sizes():
    checkpointed, saved = activation_scales("2.0")
    assert checkpointed == pytest.approx(40 * 2304 / (32 * 4096))
    assert saved == pytest.approx(40 * (2304 + 5760) / (32 * (4096 + 14336)))
    assert vision_scale("2.0") == pytest.approx(26 / 27) and vision_scale("2.5") == vision_scale("2.6") == 1.0
    v2_5, v2 = predict(Setup(views_per_sample=10.0)), predict(Setup(views_per_sample=10.0, version="2.0"))
    v2_5_text, v2_text = predict(Setup()), predict(Setup(version="2.0"))
    # 2.0's own per-view constant (its padded-frame tower), not 2.5's scaled
    assert v2["activations"] - v2_text["activations"] == pytest.approx(
        10 * CONSTANTS.vision_gc_bytes_per_view_v2_0 / 1024**3
    )
    assert CONSTANTS.vision_gc_bytes_per_view_v2_0 > 3 * CONSTANTS.vision_gc_bytes_per_view
    frozen_v2_5 = predict(Setup(views_per_sample=10.0, tune_vision=False))["activations"] - v2_5_text["activations"]
    frozen_v2_6 = (
        predict(Setup(views_per_sample=10.0, tune_vision=False, version="2.6"))["activations"]
        - predict(Setup(tune_vision=False, version="2.6"))["activations"]
    )
    assert frozen_v2_6 == pytest.approx(frozen_v2_5)  # the same tower: 2.5's constant unscaled
    assert v2_text["activations"] == pytest.approx(v2_5_text["activations"] * checkpointed)
    assert v2["logits"] == pytest.approx(2048 * 122_753 * 10 / 1024**3)
    assert v2["weights"] < v2_5["weights"] / 2


def test_plan_for_2_0_by_version_and_by_checkpoint(capsys):
    assert main(["--gpus", "1", "--gpu-mem", "24", "--version", "2.0"]) == 0
    by_version = capsys.readouterr().out
    assert "MiniCPM-V 2.0 (openbmb/MiniCPM-V-2 architecture)" in by_version
    assert "checked on H200 peaks" in by_version
    assert main(["--gpus", "1", "--gpu-mem", "24", "--model", str(REFERENCE_V2)]) == 0  # the published config.json
    assert capsys.readouterr().out == by_version
    plan = make_plan(1, 24, version="2.0")
    assert plan.fits and plan.setup.version == "2.0"
    assert plan.predicted["total"] < make_plan(1, 24).predicted["total"]
    assert main(["--gpus", "1", "--gpu-mem", "24", "--version", "2.6", "--model", str(REFERENCE_V2)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--version 2.6" in error and "MiniCPM-V 2.0" in error
