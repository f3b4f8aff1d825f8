"""The training suite end to end on CPU with the tiny model: in-process, launchers, torchrun, DeepSpeed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import PYTHON_BIN, ROOT, base_args, free_port, training_flags
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel

import finetune  # noqa: F401
from finetune.arguments import UsageError
from finetune.dataset import DataCollator, DataSettings, SupervisedDataset
from finetune.model.attention import llm_attention, vision_attention
from finetune.model.kernels import compiled_layer_count
from finetune.model.tokenization import SpecialTokens
from finetune.train import train


@pytest.fixture(scope="session")
def demo(demo_factory) -> Path:
    return demo_factory(24, 6)


@pytest.fixture(scope="session")
def two_samples(tmp_path_factory, demo) -> Path:
    """One image sample and one text-only sample: with 2 ranks and batch 1, every step puts one on each rank."""
    samples = json.loads((demo / "train.json").read_text())
    with_image = next(s for s in samples if isinstance(s.get("image"), str))
    text_only = next(s for s in samples if "image" not in s)
    with_image = dict(with_image, image=str(demo / with_image["image"]))
    path = tmp_path_factory.mktemp("two") / "two.json"
    path.write_text(json.dumps([with_image, text_only]))
    return path


def losses(log_history: list[dict], key: str = "loss") -> list[float]:
    return [entry[key] for entry in log_history if key in entry]


# --- in process ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model, demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    args = base_args(tiny_model, demo / "train.json", out, "--max_steps", "30", "--eval_data_path",
                     str(demo / "eval.json"), "--eval_strategy", "steps", "--eval_steps", "15")  # fmt: skip
    trainer = train(args)
    return trainer, out


@pytest.mark.slow
def test_loss_falls_and_eval_loss_is_logged(trained):
    trainer, _ = trained
    history = losses(trainer.state.log_history)
    assert len(history) == 30
    assert sum(history[-5:]) / 5 < 0.85 * sum(history[:5]) / 5, history
    evals = losses(trainer.state.log_history, "eval_loss")
    assert len(evals) == 2 and evals[1] < evals[0]


def test_adapter_restores_everything_trained(trained, tiny_model, demo):
    trainer, out = trained
    saved = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any(".resampler." in k for k in saved)
    assert any(".vpm." in k for k in saved), "the vision tower is tuned by default: it must be in the adapter"
    assert not any("embed_tokens" in k for k in saved), "embed_tokens is trained only on request"
    assert (out / "tokenizer_config.json").read_bytes() == (tiny_model / "tokenizer_config.json").read_bytes()

    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model), out).eval()
    trained_model = trainer.model.eval()
    tokenizer = trainer.train_dataset.encoder.tokenizer
    dataset = SupervisedDataset(DataSettings(str(demo / "eval.json")), tokenizer, reloaded.base_model.model.config)
    batch = DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad)([dataset[i] for i in range(3)])
    with torch.no_grad():
        expected = trained_model(data=batch["data"], attention_mask=batch["attention_mask"]).logits
        actual = reloaded(data=batch["data"], attention_mask=batch["attention_mask"]).logits
        base = (
            AutoModel.from_pretrained(tiny_model)
            .eval()(data=batch["data"], attention_mask=batch["attention_mask"])
            .logits
        )
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert (actual - base).abs().max() > 1e-3, "the adapter must change the model"


def test_frozen_originals_of_trained_modules_are_released(trained):
    """modules_to_save keeps a frozen original of the resampler and vision tower; training drops them."""
    from peft.utils import ModulesToSaveWrapper

    trainer, _ = trained
    wrappers = [m for m in trainer.model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert len(wrappers) == 2  # resampler, vpm
    for wrapper in wrappers:
        assert wrapper.original_module is wrapper.modules_to_save["default"]
    names = [name for name, _ in trainer.model.named_parameters()]
    assert not any("original_module" in name for name in names)  # each weight is held once


def test_loss_weighs_every_label_token_of_the_step_equally(tiny_model, demo, tmp_path):
    """Batch 2 in one micro-batch == batch 1 with 2 accumulation steps (SGD: the update is the gradient)."""
    results = []
    for batch, accumulation in ((2, 1), (1, 2)):
        out = tmp_path / f"b{batch}"
        args = base_args(tiny_model, demo / "train.json", out, "--max_steps", "1", "--optim", "sgd",
                         "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
                         "--lora_dropout", "0", "--max_grad_norm", "0", "--weight_decay", "0")  # fmt: skip
        trainer = train(args)
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_is_the_default_where_supported(monkeypatch):
    """Regression: a bool default_factory reached HfArgumentParser as False, and GPU runs trained in fp32."""
    from transformers import HfArgumentParser

    import finetune.arguments as entry

    (action,) = [a for a in HfArgumentParser(entry.TrainingArguments)._actions if a.dest == "bf16"]
    assert action.default is None, "the parser must leave bf16 undecided when the flag is absent"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert entry.resolve_bf16(None, fp16=False, use_cpu=False) is True
    assert entry.resolve_bf16(None, fp16=True, use_cpu=False) is False
    assert entry.resolve_bf16(None, fp16=False, use_cpu=True) is False
    assert entry.resolve_bf16(False, fp16=False, use_cpu=False) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert entry.resolve_bf16(None, fp16=False, use_cpu=False) is False


def test_the_loss_is_not_checked_for_nan_on_the_device_every_step(tmp_path):
    """The library's logging_nan_inf_filter asks the device about every step's loss (a synchronisation after each
    backward, the GPU then idle through clipping and the optimizer step); finetune.py turns it off unless asked."""
    from transformers import HfArgumentParser

    import finetune.arguments as entry

    parser = HfArgumentParser(entry.TrainingArguments)
    (default,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    (asked,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--logging_nan_inf_filter", "true"]
    )
    assert default.logging_nan_inf_filter is False and asked.logging_nan_inf_filter is True


def test_batches_are_copied_to_the_gpu_without_waiting_unless_the_accelerator_config_says_otherwise(
    tmp_path, monkeypatch
):
    from transformers import HfArgumentParser

    import finetune.arguments as entry

    parser = HfArgumentParser(entry.TrainingArguments)
    common = ["--output_dir", str(tmp_path), "--report_to", "none"]
    monkeypatch.setattr(entry, "has_accelerator", lambda: True)  # a GPU (transformers itself is not asked)
    (default,) = parser.parse_args_into_dataclasses(common)
    (merged,) = parser.parse_args_into_dataclasses(common + ["--accelerator_config", '{"split_batches": false}'])
    (refused,) = parser.parse_args_into_dataclasses(common + ["--accelerator_config", '{"non_blocking": false}'])
    assert default.accelerator_config.non_blocking is True and default.dataloader_pin_memory is True
    assert merged.accelerator_config.non_blocking is True and merged.accelerator_config.split_batches is False
    assert refused.accelerator_config.non_blocking is False
    # On CPU neither pinned memory nor non-blocking copies mean anything (torch and transformers warn about them),
    # unless asked for.
    (cpu,) = parser.parse_args_into_dataclasses(common + ["--use_cpu", "true"])
    (asked,) = parser.parse_args_into_dataclasses(
        common + ["--use_cpu", "true", "--accelerator_config", '{"non_blocking": true}']
    )
    assert cpu.accelerator_config.non_blocking is False and cpu.dataloader_pin_memory is False
    assert asked.accelerator_config.non_blocking is True


def test_bf16_without_deepspeed_keeps_fp32_trainable_weights(tiny_model, demo, tmp_path):
    trainer = train(
        base_args(tiny_model, demo / "train.json", tmp_path, "--max_steps", "1", "--bf16", "true", "--use_cpu", "true")
    )
    dtypes = {(p.requires_grad, p.dtype) for p in trainer.model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}, dtypes


@pytest.mark.parametrize("deepspeed", [None, "ds_config_zero3.json"])
def test_trainable_precision_matches_where_the_master_weights_live(tiny_model, deepspeed):
    """Without DeepSpeed the trainable parameters are the fp32 master weights. Under DeepSpeed bf16 they must
    all be bf16: ZeRO-3 flattens them into one buffer and asserted on PEFT's fp32 LoRA weights beside the bf16
    resampler / vision copies (found on 2 x H200; transformers refuses bf16 DeepSpeed on CPU, so this checks
    the dtypes DeepSpeed receives)."""
    from types import SimpleNamespace

    from finetune.arguments import LoraArguments
    from finetune.model_setup import configure_trainable, set_trainable_precision

    model = AutoModel.from_pretrained(tiny_model, dtype=torch.bfloat16)
    args = SimpleNamespace(tune_llm=False, tune_vision=True, use_lora=True, tune_embeddings=False, gradient_checkpointing=False,
                           bf16=True, fp16=False, deepspeed=deepspeed and str(ROOT / "finetune" / deepspeed))  # fmt: skip
    model = configure_trainable(model, args, LoraArguments())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32, torch.bfloat16}  # PEFT's mix
    set_trainable_precision(model, args)
    expected = torch.bfloat16 if deepspeed else torch.float32
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {expected}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.slow
def test_8bit_optimizer_states_track_fp32_adam(tiny_model, demo, tmp_path):
    """--optim adamw_bnb_8bit (the planner's memory lever without DeepSpeed): bitsandbytes keeps Adam's two
    states in uint8 and the loss curve stays on fp32 AdamW's."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (requirements-extras.txt)")
    extra = ("--max_steps", "6", "--learning_rate", "5e-4")
    reference = train(base_args(tiny_model, demo / "train.json", tmp_path / "fp32", *extra, "--optim", "adamw_torch"))
    eight_bit = train(
        base_args(tiny_model, demo / "train.json", tmp_path / "8bit", *extra, "--optim", "adamw_bnb_8bit")
    )
    optimizer = getattr(eight_bit.optimizer, "optimizer", eight_bit.optimizer)  # accelerate wraps it
    assert type(optimizer).__module__.startswith("bitsandbytes")
    state_dtypes = {
        v.dtype for state in optimizer.state.values() for k, v in state.items() if k in ("state1", "state2")
    }
    assert torch.uint8 in state_dtypes
    expected, got = losses(reference.state.log_history), losses(eight_bit.state.log_history)
    assert len(got) == len(expected) == 6
    assert got[0] == pytest.approx(expected[0], rel=1e-6)  # same data and initial weights
    assert got == pytest.approx(expected, rel=0.05), (expected, got)
    assert got[-1] < got[0]
    assert hasattr(optimizer.step, "__wrapped__")  # finetune.trainer.skip_per_parameter_syncs applied


def test_8bit_steps_without_per_parameter_syncs_update_the_same(monkeypatch):
    """bitsandbytes synchronises the device after every parameter's update; the wrapped step makes none of those
    calls and leaves the same parameters and states. Paged optimizers and torch's own are left alone."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (requirements-extras.txt)")
    import bitsandbytes as bnb
    from bitsandbytes.optim import optimizer as bnb_optimizer

    from finetune.trainer import skip_per_parameter_syncs

    syncs = []
    real_sync = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda tensor: syncs.append(tensor) or real_sync(tensor))
    results = {}
    for wrapped in (False, True):
        torch.manual_seed(0)
        parameters = [
            torch.nn.Parameter(torch.randn(64, 128)),
            torch.nn.Parameter(torch.randn(300)),
            torch.nn.Parameter(torch.randn(4096, 2)),
        ]
        optimizer = bnb.optim.AdamW8bit(parameters, lr=1e-2)
        if wrapped:
            assert skip_per_parameter_syncs(optimizer)
        syncs.clear()
        for _ in range(3):
            for parameter in parameters:
                parameter.grad = torch.randn_like(parameter)
            optimizer.step()
        results[wrapped] = (
            [p.detach().clone() for p in parameters],
            len(syncs),
            optimizer.state[parameters[0]]["state1"].clone(),
        )
    (plain_params, plain_syncs, plain_state), (params, wrapped_syncs, state) = results[False], results[True]
    assert (plain_syncs, wrapped_syncs) == (9, 0)
    assert all(torch.equal(a, b) for a, b in zip(plain_params, params, strict=True)) and torch.equal(plain_state, state)
    assert bnb_optimizer.sync_gpu is not real_sync  # the test's spy is back in place after the wrapped steps
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # schedulers wrap a bound step: it still is one
    paged = bnb.optim.PagedAdamW8bit([torch.nn.Parameter(torch.randn(8))], lr=1e-2)
    assert not skip_per_parameter_syncs(paged) and not skip_per_parameter_syncs(
        torch.optim.AdamW([torch.nn.Parameter(torch.randn(8))])
    )


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(tiny_model, demo, tmp_path):
    extra = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--lora_dropout", "0"]
    straight = train(base_args(tiny_model, demo / "train.json", tmp_path / "a", *extra))
    resumed = train(base_args(tiny_model, demo / "train.json", tmp_path / "b", *extra))  # same run, then resume
    checkpoint = tmp_path / "b" / "checkpoint-3"
    again = train(
        base_args(tiny_model, demo / "train.json", tmp_path / "b", *extra, "--resume_from_checkpoint", str(checkpoint))
    )
    assert losses(resumed.state.log_history) == losses(straight.state.log_history)
    curve = losses(again.state.log_history)  # the first 3 come back with the checkpoint's trainer state
    assert len(curve) == 6 and curve[:3] == losses(straight.state.log_history)[:3]
    torch.testing.assert_close(
        torch.tensor(curve[3:]), torch.tensor(losses(straight.state.log_history)[3:]), atol=1e-5, rtol=0
    )


# --- bad command lines: one clear error before the model is touched ----------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--use_lora", "true", "--tune_llm", "true"], "choose LoRA or full LLM fine-tuning"),
        (["--lora_target_modules", r"llm\..*nothing_here"], "matches no linear module"),
        (["--llm_type", "minicpm"], r"--llm_type minicpm \(MiniCPM-V 2.0\) does not fit .* a MiniCPM-V 2.5 checkpoint"),
        (["--compile_layers", "true", "--torch_compile", "true"], "choose one"),
        (["--compile_layers", "true", "--trust_remote_code", "true"], "--compile_layers need the native model class"),
        (["--attn_implementation", "varlen", "--trust_remote_code", "true"], "varlen needs the native model class"),
        pytest.param(
            ["--use_liger_kernel", "true"],
            "--use_liger_kernel true needs a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message"),
        ),
    ],
)
def test_bad_flags(tiny_model, demo, tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        train(base_args(tiny_model, demo / "train.json", tmp_path, "--max_steps", "1", *extra))


def test_flop_count_is_the_librarys_with_the_parameters_counted_once(tiny_model, demo, tmp_path, monkeypatch):
    """MiniCPMVTrainer.floating_point_ops gives transformers' 6 x tokens x non-embedding parameters, reading the
    tokens inside `data`, and counts the parameters once, not at every micro-batch."""
    from transformers import PreTrainedModel, Trainer

    trainer = train(base_args(tiny_model, demo / "train.json", tmp_path, "--max_steps", "2"))
    batch = next(iter(trainer.get_train_dataloader()))
    counted = []
    library_count = PreTrainedModel.num_parameters
    monkeypatch.setattr(
        PreTrainedModel, "num_parameters", lambda self, *a, **k: counted.append(k) or library_count(self, *a, **k)
    )
    expected = Trainer.floating_point_ops(trainer, batch["data"])  # the library's, on the fields inside `data`
    assert counted == [{"exclude_embeddings": True}] and expected > 0
    assert trainer.floating_point_ops(batch) == trainer.floating_point_ops(batch) == expected
    assert len(counted) == 1, "counted during training already: not again"
    assert trainer.state.total_flos > 0


@pytest.mark.slow
def test_compiled_layers_train_through_the_trainer(tiny_model, demo, tmp_path, capsys):
    """--compile_layers reaches the model the Trainer trains (numerics: tests/test_fast_paths.py)."""
    trainer = train(
        base_args(tiny_model, demo / "train.json", tmp_path, "--max_steps", "2", "--compile_layers", "true")
    )
    native = trainer.model.get_base_model()
    llm_layers, vision_layers = len(native.llm.model.layers), len(native.vpm.encoder.layers)
    assert (
        compiled_layer_count(trainer.model) == llm_layers
        and compiled_layer_count(trainer.model, "vision") == vision_layers
    )
    assert (
        f"fast paths: torch.compile of {llm_layers + vision_layers} layers (LLM and vision tower)"
        in capsys.readouterr().out
    )
    curve = losses(trainer.state.log_history)
    assert len(curve) == 2 and all(math.isfinite(v) for v in curve)


def test_compiled_layers_by_default_only_where_measured():
    from finetune.arguments import resolve_compile_layers

    assert resolve_compile_layers(None, cuda=True, zero3=False, q_lora=False, remote_code=False)
    assert not resolve_compile_layers(None, cuda=False, zero3=False, q_lora=False, remote_code=False)
    for excluded in ({"zero3": True}, {"q_lora": True}, {"remote_code": True}, {"torch_compile": True}):
        assert not resolve_compile_layers(
            None, **{"cuda": True, "zero3": False, "q_lora": False, "remote_code": False, **excluded}
        )
    assert resolve_compile_layers(True, cuda=False, zero3=True, q_lora=False, remote_code=False)  # asked for: done
    assert not resolve_compile_layers(False, cuda=True, zero3=False, q_lora=False, remote_code=False)


@pytest.mark.slow
def test_varlen_attention_trains_through_the_trainer_as_sdpa_does(tiny_model, demo, tmp_path):
    """--attn_implementation varlen reaches the LLM the Trainer trains, and the loss curve is sdpa's (packed
    multimodal batches of 2; per-batch numerics: tests/test_fast_paths.py)."""

    def curve(attention: str):
        args = base_args(tiny_model, demo / "train.json", tmp_path / attention, "--max_steps", "3", "--per_device_train_batch_size", "2",
                         "--attn_implementation", attention)  # fmt: skip
        trainer = train(args)
        assert llm_attention(trainer.model) == vision_attention(trainer.model) == attention
        return losses(trainer.state.log_history)

    sdpa, varlen = curve("sdpa"), curve("varlen")
    assert len(varlen) == 3
    torch.testing.assert_close(torch.tensor(varlen), torch.tensor(sdpa), atol=1e-5, rtol=0)


def test_varlen_attention_by_default_only_where_measured():
    from finetune.arguments import resolve_attn_implementation

    def resolve(requested=None, gpu_in_half=True, flash_gpu=True, remote_code=False):
        return resolve_attn_implementation(requested, gpu_in_half, flash_gpu, remote_code)

    assert resolve() == "varlen"  # an A100 / H100 / RTX 30xx-40xx in bf16 or fp16
    assert resolve(flash_gpu=False) == "sdpa"  # a V100 or T4
    assert resolve(gpu_in_half=False, flash_gpu=False) == "sdpa"  # the CPU, or a GPU in fp32
    assert resolve(remote_code=True) == "sdpa"
    assert resolve("eager") == "eager"  # asked for: done
    assert resolve("varlen", gpu_in_half=False, flash_gpu=False) == "varlen"  # runs segment by segment
    with pytest.raises(UsageError, match="needs an Ampere or newer GPU"):
        resolve("varlen", flash_gpu=False)


def test_optim_needs_bitsandbytes_and_no_deepspeed_optimizer(tmp_path, monkeypatch):
    """Our DeepSpeed configs name their own optimizer, which wins over --optim without a word (in-process
    DeepSpeed set-up cannot follow other in-process runs, so the check is called directly)."""
    from types import SimpleNamespace

    from finetune.arguments import check_optimizer_choice

    zero2 = str(ROOT / "finetune" / "ds_config_zero2.json")
    with pytest.raises(
        UsageError, match="--optim adamw_bnb_8bit has no effect with --deepspeed .*ds_config_zero2.json"
    ):
        check_optimizer_choice(SimpleNamespace(optim="adamw_bnb_8bit", deepspeed=zero2))
    check_optimizer_choice(SimpleNamespace(optim="adamw_bnb_8bit", deepspeed=None))  # no DeepSpeed: --optim is used
    check_optimizer_choice(SimpleNamespace(optim="adamw_torch_fused", deepspeed=zero2))  # the default: fine
    config = json.loads(Path(zero2).read_text())
    del config["optimizer"]
    (tmp_path / "no_optimizer.json").write_text(json.dumps(config))  # DeepSpeed then wraps the Trainer's optimizer
    check_optimizer_choice(SimpleNamespace(optim="adamw_bnb_8bit", deepspeed=str(tmp_path / "no_optimizer.json")))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(UsageError, match="--optim adamw_bnb_8bit needs bitsandbytes"):
        check_optimizer_choice(SimpleNamespace(optim="adamw_bnb_8bit", deepspeed=None))


def test_missing_data_and_bad_model_paths(tiny_model, demo, tmp_path):
    with pytest.raises(UsageError, match="data file not found: .*nope.json"):
        train(base_args(tiny_model, tmp_path / "nope.json", tmp_path))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(UsageError, match="not a model directory: missing config.json"):
        train(base_args(not_a_model, demo / "train.json", tmp_path))
    with pytest.raises(UsageError, match="no such directory"):
        train(base_args(tmp_path / "typo" / "model", demo / "train.json", tmp_path))


def test_bad_samples_stop_training_before_it_starts(tiny_model, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([
        {"id": "fine", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
        {"id": "no_answer", "conversations": [{"role": "user", "content": "hi"}]},
        {"id": "lost_image", "image": "nowhere.png", "conversations": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "ok"}]},
    ]))  # fmt: skip
    with pytest.raises(
        UsageError, match=r"2 bad train samples(.|\n)*no_answer: (.|\n)*lost_image: image file not found"
    ):
        train(base_args(tiny_model, data, tmp_path / "out", "--max_steps", "1"))
    data.write_text('[{"id": "a", "conversations": [}]')
    with pytest.raises(UsageError, match=r"line 1 column"):
        train(base_args(tiny_model, data, tmp_path / "out", "--max_steps", "1"))
    assert not (tmp_path / "out").exists(), "nothing may be trained or written"


def test_a_data_mix_prints_each_files_share_and_bad_mixes_stop_before_training(tiny_model, demo, tmp_path, capsys):
    train_file, extra = demo / "train.json", tmp_path / "extra.json"
    extra.write_text(
        json.dumps(
            [
                {
                    "id": f"x{i}",
                    "conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
                }
                for i in range(4)
            ]
        )
    )
    train(base_args(tiny_model, f"{train_file}:0.5,{extra}:0.5", tmp_path / "out", "--max_steps", "1"))
    out = capsys.readouterr().out
    assert f"[data]   from {train_file}: 14 samples (ratio 0.5: 24 in the file)\n" in out
    assert f"[data]   from {extra}: 14 samples (ratio 0.5: 4 in the file, 10 repeated)\n" in out
    for spec, message in ((f"{train_file}:1e308,{extra}:1e308", "the ratios add up to more than the largest float"),
                          (f"{train_file}:1,{extra}:0.001", rf"data mix: {extra} gets 0 samples")):  # fmt: skip
        with pytest.raises(UsageError, match=message):
            train(base_args(tiny_model, spec, tmp_path / "bad", "--max_steps", "1"))
    assert not (tmp_path / "bad").exists(), "nothing may be trained or written"


@pytest.mark.slow
def test_cli_unknown_flag_is_one_line_error(tiny_model, demo, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "finetune" / "finetune.py"), *base_args(tiny_model, demo / "train.json", tmp_path), "--no_such_flag", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--no_such_flag" in result.stderr and "Traceback" not in result.stderr


# --- launchers and torchrun --------------------------------------------------------------------------------


def run_env(report: Path) -> dict:
    env = dict(
        os.environ, FINETUNE_RUN_REPORT=str(report), PATH=f"{PYTHON_BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1"
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def read_reports(report: Path, ranks: int) -> list[dict]:
    found = sorted(report.glob("rank*.json"))
    assert len(found) == ranks, f"expected {ranks} rank reports, found {[p.name for p in found]}"
    return [json.loads(p.read_text()) for p in found]


def torchrun_two_processes(args: list[str], report: Path) -> subprocess.CompletedProcess:
    """finetune.py ARGS under torchrun, 2 processes on this host (a free port: other runs may hold the default);
    each rank writes its run report into REPORT."""
    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "finetune" / "finetune.py"),
        *args,
    ]
    return subprocess.run(command, env=run_env(report), capture_output=True, text=True, timeout=300)


TORCH_ADAMW = "torch.optim.adamw.AdamW"


@pytest.mark.parametrize(
    ("deepspeed", "wrapper", "extra", "optimizer", "compiled"),
    [(None, "DistributedDataParallel", [], TORCH_ADAMW, 0),
     # compiled decoder layers are on by default on CUDA, under ZeRO-2 too: they must train there
     ("ds_config_zero2.json", "DeepSpeedEngine", ["--compile_layers", "true"], TORCH_ADAMW, 2),
     # varlen attention is on by default on CUDA, under ZeRO-3 too
     ("ds_config_zero3.json", "DeepSpeedEngine", ["--attn_implementation", "varlen"], TORCH_ADAMW, 0),
     # the lean config names no optimizer: DeepSpeed partitions and steps the Trainer's 8-bit one
     pytest.param("ds_config_zero3_lean.json", "DeepSpeedEngine", ["--optim", "adamw_bnb_8bit"], "bitsandbytes.optim.adamw.AdamW 8-bit", 0,
                  marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"))],
)  # fmt: skip
@pytest.mark.slow
def test_torchrun_two_processes_really_distributed(
    tiny_model, two_samples, tmp_path, deepspeed, wrapper, extra, optimizer, compiled
):
    out, report = tmp_path / "out", tmp_path / "report"
    # A loss chunk of 4 label positions: the ranks' samples have different label counts, so different numbers
    # of lm_head calls unless the model keeps them in step (ZeRO-3 gathers per call).
    args = base_args(
        tiny_model,
        two_samples,
        out,
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "1",
        "--loss_chunk_size",
        "4",
        *extra,
    )
    if deepspeed:
        args += ["--deepspeed", str(ROOT / "finetune" / deepspeed)]
    result = torchrun_two_processes(args, report)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in read_reports(report, 2):
        assert rank["wrapper"] == wrapper and rank["num_processes"] == 2 and rank["global_step"] == 3
        assert rank["optimizer"] == optimizer
        assert rank["compiled_layers"] == compiled  # of the tiny model's two decoder layers
        assert (rank["compiled_vision_layers"] > 0) == (compiled > 0)  # the vision tower's with them
        assert rank["llm_attention"] == rank["vision_attention"] == ("varlen" if "varlen" in extra else "sdpa")
    assert (out / "adapter_model.safetensors").is_file()
    # ZeRO-3 gathers the partitioned weights for saving: the adapter must hold real tensors, not empty shards.
    saved = load_file(out / "adapter_model.safetensors")
    assert all(t.numel() > 0 for t in saved.values())
    PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model), out)


@pytest.mark.slow
def test_zero3_trains_the_same_loss_curve_as_zero2(tiny_model, two_samples, tmp_path):
    """Under ZeRO-3 every parameter is partitioned and gathered per call, except lm_head: each rank computes the
    loss's logits on its own rows of it, in training and in evaluation (no gradients there). The losses must be
    ZeRO-2's, where nothing is partitioned."""
    curves, evaluated = {}, {}
    for stage in ("zero2", "zero3"):
        out, report = tmp_path / stage, tmp_path / f"report_{stage}"
        args = base_args(tiny_model, two_samples, out, "--max_steps", "3", "--per_device_train_batch_size", "1", "--loss_chunk_size", "4",
                         "--eval_data_path", str(two_samples), "--eval_strategy", "steps", "--eval_steps", "3",
                         "--deepspeed", str(ROOT / "finetune" / f"ds_config_{stage}.json"))  # fmt: skip
        result = torchrun_two_processes(args, report)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("loss over lm_head's vocabulary shards (2 ranks" in result.stdout) == (stage == "zero3")
        history = read_reports(report, 2)[0]["log_history"]
        curves[stage], evaluated[stage] = (
            losses(history),
            [entry["eval_loss"] for entry in history if "eval_loss" in entry],
        )
    assert len(curves["zero3"]) == 3 and len(evaluated["zero3"]) == 1
    assert curves["zero3"] == pytest.approx(curves["zero2"], rel=1e-4)
    assert evaluated["zero3"] == pytest.approx(evaluated["zero2"], rel=1e-4)


@pytest.mark.parametrize(
    ("extra", "vocab_shards"),
    [([], True), (["--tune_embeddings", "true"], False)],
    ids=["vocabulary shards", "lm_head trained"],
)
@pytest.mark.slow
def test_zero3_packed_multimodal_batches_keep_ranks_in_step(tiny_model, demo, tmp_path, extra, vocab_shards):
    """Regression: with ranks holding different label counts the loss made different numbers of lm_head calls,
    i.e. ZeRO-3 gathers, and gloo/NCCL aborted with a collective mismatch. Both loss paths: each rank's rows of
    a frozen lm_head, and (lm_head trained) the chunked loss gathering it."""
    out, report = tmp_path / "out", tmp_path / "report"
    args = base_args(tiny_model, demo / "train.json", out, "--max_steps", "4", "--packing", "true", "--loss_chunk_size", "4",
                     "--deepspeed", str(ROOT / "finetune" / "ds_config_zero3.json"), *extra)  # fmt: skip
    result = torchrun_two_processes(args, report)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in read_reports(report, 2):
        assert rank["wrapper"] == "DeepSpeedEngine" and rank["num_processes"] == 2 and rank["global_step"] == 4
        assert rank["vocab_sharded_loss"] is vocab_shards


@pytest.mark.slow
def test_ranks_share_validation_and_all_stop_on_a_bad_sample(tiny_model, tmp_path):
    """Each rank validates every other sample and the results are gathered: the bad sample only rank 1 checks
    (index 1) must stop rank 0 too, before training (else rank 0 would wait for rank 1 forever)."""
    fine = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([dict(fine, id="first"), {"id": "no_answer", "conversations": [{"role": "user", "content": "hi"}]},
                                dict(fine, id="third")]))  # fmt: skip
    args = base_args(tiny_model, data, tmp_path / "out", "--max_steps", "1", "--per_device_train_batch_size", "1")
    result = torchrun_two_processes(args, tmp_path / "report")
    assert result.returncode != 0
    assert result.stderr.count("finetune.py: error: 1 bad train samples") == 2, result.stderr[-3000:]
    assert "no_answer: " in result.stderr and not (tmp_path / "out").exists()


class _FailingChecks:
    """A dataset whose sample 1 fails to check with an unexpected error; the others are bad samples."""

    def __len__(self) -> int:
        return 4

    def record(self, index: int):
        from finetune.dataset import DataError

        if index == 1:
            raise RuntimeError("validation worker died")
        raise DataError("no conversations", sample=f"s{index}")


def _validate_on_rank(rank: int, port: int, errors) -> None:
    from types import SimpleNamespace

    from finetune.data_setup import validate_across_ranks

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        validate_across_ranks("train", "data.json", _FailingChecks(), SimpleNamespace(world_size=2, process_index=rank))
        errors[rank] = "no error"
    except UsageError as error:
        errors[rank] = str(error)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_rank_whose_validation_fails_stops_every_rank():
    """Not a bad sample but the check itself failing on rank 1: rank 0 must stop too, not wait in the gather."""
    import torch.multiprocessing as mp

    errors = mp.Manager().dict()
    mp.spawn(_validate_on_rank, args=(free_port(), errors), nprocs=2, join=True)
    assert dict(errors) == {
        rank: "validating the train data failed on rank 1: RuntimeError: validation worker died" for rank in (0, 1)
    }


@pytest.mark.slow
def test_two_nodes_on_one_host_train_together(tiny_model, two_samples, tmp_path):
    out, report, port = tmp_path / "out", tmp_path / "report", free_port()
    flags = training_flags("--max_steps", "2", "--per_device_train_batch_size", "1")
    launcher = ROOT / "finetune" / "finetune_lora.sh"
    processes = []
    for node in (0, 1):
        env = dict(run_env(report), MODEL=str(tiny_model), DATA=str(two_samples), OUTPUT_DIR=str(out), GPUS_PER_NODE="1",
                   NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_CONFIG="", REPORT_TO="none")  # fmt: skip
        processes.append(
            subprocess.Popen(
                ["sh", str(launcher), *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs[0][-2000:] + outputs[1][-2000:]
    for rank in read_reports(report, 2):
        assert rank["wrapper"] == "DistributedDataParallel" and rank["num_processes"] == 2


@pytest.mark.slow
def test_full_fine_tuning_launcher_saves_a_loadable_model(tiny_model, two_samples, tmp_path):
    """finetune_ds.sh: LLM + resampler + vision tower trained in full under ZeRO-3 (one CPU process; its config named,
    since without a GPU the launchers' default is no DeepSpeed)."""
    out, report = tmp_path / "out", tmp_path / "report"
    env = dict(run_env(report), MODEL=str(tiny_model), DATA=str(two_samples), OUTPUT_DIR=str(out), MAX_STEPS="2",
               REPORT_TO="none", SAVE_STEPS="100", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
               DS_CONFIG=str(ROOT / "finetune" / "ds_config_zero3.json"))  # fmt: skip
    result = subprocess.run(["sh", str(ROOT / "finetune" / "finetune_ds.sh"), "--learning_rate", "1e-2"], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (rank,) = read_reports(report, 1)
    assert rank["wrapper"] == "DeepSpeedEngine" and rank["global_step"] == 2
    assert not (out / "adapter_config.json").exists()
    tuned, base = AutoModel.from_pretrained(out), AutoModel.from_pretrained(tiny_model)
    changed = {n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert any(n.startswith("llm.model.layers.") for n in changed) and any(n.startswith("vpm.") for n in changed)
    assert any(n.startswith("resampler.") for n in changed)


@pytest.mark.slow
def test_launcher_from_finetune_dir_with_posix_sh_and_default_output(tiny_model, two_samples, tmp_path):
    """The seed's exact command, `cd finetune && sh finetune_lora.sh`, on a copy of finetune/ (so that the
    default output directory, finetune/output/output__lora, is the copy's and no user run is overwritten)."""
    copy = tmp_path / "repo" / "finetune"
    shutil.copytree(ROOT / "finetune", copy, ignore=shutil.ignore_patterns("output", "__pycache__"))
    report = tmp_path / "report"
    env = dict(
        run_env(report),
        MODEL=str(tiny_model),
        DATA=str(two_samples),
        MAX_STEPS="1",
        REPORT_TO="none",
        SAVE_STEPS="100",
        MASTER_PORT=str(free_port()),
    )  # not the default 6001: another run on this host may hold it
    env.pop("GPUS_PER_NODE", None)
    # Upstream's --warmup_ratio, mapped with a notice: printed once, by the preflight, not again by the worker.
    result = subprocess.run(["sh", "finetune_lora.sh", "--warmup_ratio", "0.1"], cwd=copy, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "nodes=1 x 1 processes" in result.stdout  # GPUS_PER_NODE detected on a CPU machine
    assert (result.stdout + result.stderr).count("[args] --warmup_ratio 0.1 -> --warmup_steps 0.1") == 1
    (rank,) = read_reports(report, 1)
    if gpu_found():
        assert rank["wrapper"] == "DeepSpeedEngine", "the launcher trains under DeepSpeed ZeRO-2 where there is a GPU"
    else:  # DeepSpeed on a CPU would compile a C++ extension first: no DeepSpeed, and one line saying so
        assert rank["wrapper"] != "DeepSpeedEngine", "without a GPU the launcher trains without DeepSpeed by default"
        assert "[launch] no GPU: training without DeepSpeed (DS_CONFIG=" in result.stdout
    assert rank["gradient_checkpointing"] and rank["vision_trained"] and rank["per_device_train_batch_size"] == 1
    assert (copy / "output" / "output__lora" / "adapter_model.safetensors").is_file()
    # The published snippet, run from finetune/: PeftModel.from_pretrained(base, "output/output__lora")
    cwd = os.getcwd()
    try:
        os.chdir(copy)
        PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model), "output/output__lora")
    finally:
        os.chdir(cwd)


def gpu_found() -> bool:
    """What the launchers ask to choose their defaults: does nvidia-smi list a GPU?"""
    if shutil.which("nvidia-smi") is None:
        return False
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return any(line.startswith("GPU") for line in listing.stdout.splitlines())


def path_without_compiler(tmp_path: Path, *tools: str) -> str:
    """A PATH of one folder holding links to TOOLS (found on the real PATH) and no C++ compiler."""
    folder = tmp_path / "bin-without-compiler"
    folder.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found, tool
        (folder / tool).symlink_to(found)
    return str(folder)


@pytest.mark.slow
def test_deepspeed_on_cpu_without_a_compiler_is_one_line_with_the_fix(tiny_model, two_samples, tmp_path):
    """DeepSpeed on a CPU builds its shared-memory comm op with c++ on first use; with no compiler that was a
    94-line build error. finetune.py (and the launcher, before torchrun) stop in one line naming both fixes."""
    if torch.cuda.is_available():
        pytest.skip("the compiler is only needed without a GPU")
    env = {name: value for name, value in run_env(tmp_path / "report").items() if name != "CXX"}
    env["PATH"] = path_without_compiler(tmp_path)
    args = base_args(
        tiny_model,
        two_samples,
        tmp_path / "out",
        "--max_steps",
        "1",
        "--deepspeed",
        str(ROOT / "finetune" / "ds_config_zero2.json"),
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "finetune" / "finetune.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = [line for line in result.stderr.splitlines() if "finetune.py: error:" in line]
    assert len(message) == 1 and "C++ compiler" in message[0] and "'c++' is not on PATH" in message[0], result.stderr[
        -3000:
    ]
    assert 'DS_CONFIG=""' in message[0] and "install" in message[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "adapter_model.safetensors").exists()

    # The launcher, asked for DeepSpeed: the same in one line, before torchrun (a stand-in that would say so).
    launcher_path = path_without_compiler(tmp_path, "dirname", "grep")
    fake = Path(launcher_path) / "torchrun"
    fake.write_text('#!/bin/sh\necho "torchrun started"\n')
    fake.chmod(0o755)
    # PREFLIGHT=0: the stand-in torchrun is what is checked, not the command line it would be given.
    env = dict(
        env,
        PATH=launcher_path,
        MODEL=str(tiny_model),
        DATA=str(two_samples),
        PREFLIGHT="0",
        DS_CONFIG=str(ROOT / "finetune" / "ds_config_zero2.json"),
    )
    result = subprocess.run(
        ["/bin/sh", str(ROOT / "finetune" / "finetune_lora.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "torchrun started" not in result.stdout, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "C++ compiler" in result.stderr and 'DS_CONFIG=""' in result.stderr, (
        result.stderr
    )
    # Without DS_CONFIG, the same machine trains without DeepSpeed: no compiler is needed.
    env.pop("DS_CONFIG")
    result = subprocess.run(
        ["/bin/sh", str(ROOT / "finetune" / "finetune_lora.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "torchrun started" in result.stdout, result.stdout + result.stderr
    assert "[launch] no GPU: training without DeepSpeed" in result.stdout


@pytest.mark.slow
def test_launcher_speed_recipe_of_its_header_trains_as_it_says(tiny_model, two_samples, tmp_path):
    """finetune_lora.sh's header line for the fastest text runs on one GPU: no DeepSpeed, the vision tower frozen,
    two rows a step, and `--gradient_checkpointing false` after the launcher's own `true` (the later flag wins)."""
    header = (ROOT / "finetune" / "finetune_lora.sh").read_text()
    assert 'DS_CONFIG="" TUNE_VISION=false BATCH_SIZE=2' in header and "--gradient_checkpointing false" in header
    report = tmp_path / "report"
    env = dict(run_env(report), MODEL=str(tiny_model), DATA=str(two_samples), OUTPUT_DIR=str(tmp_path / "out"), MAX_STEPS="2",
               REPORT_TO="none", SAVE_STEPS="100", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
               DS_CONFIG="", TUNE_VISION="false", BATCH_SIZE="2")  # fmt: skip
    result = subprocess.run(["sh", str(ROOT / "finetune" / "finetune_lora.sh"), "--gradient_checkpointing", "false"], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (rank,) = read_reports(report, 1)
    assert rank["wrapper"] != "DeepSpeedEngine" and rank["num_processes"] == 1
    assert not rank["gradient_checkpointing"] and not rank["vision_trained"]
    assert rank["per_device_train_batch_size"] == 2 and rank["global_step"] == 2


# --- a launcher killed outright ----------------------------------------------------------------------------


def ended(process: psutil.Process) -> bool:
    """Whether PROCESS has exited (a zombie left for its new parent to reap counts: it runs no more)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until_ended(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Waits up to SECONDS for every one of PROCESSES to exit; returns those still running."""
    deadline = time.monotonic() + seconds
    running = [p for p in processes if not ended(p)]
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = [p for p in running if not ended(p)]
    return running


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL each of PROCESSES still running, by its pid (a stopped one too), and waits for them to go."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    wait_until_ended(processes, 10)


def stop_with_launcher_child(mode: str) -> str:
    """A worker as finetune.py is until training starts: calls stop_with_launcher(), says "ready", sleeps."""
    return (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "import finetune.distributed as distributed\n"
            f"if {mode!r} == 'polling':  # as where prctl is missing\n"
            "    distributed.signal_on_parent_death = lambda signum: False\n"
            "distributed.stop_with_launcher(poll_seconds=0.2)\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kernel signal", "polling", "not under torchrun"])
def test_a_worker_ends_when_its_launcher_dies(tmp_path, mode):
    """stop_with_launcher() in a worker that a stand-in launcher started as torchrun does (a session of its own,
    TORCHELASTIC_RUN_ID set): kill -9 of the launcher must end the worker, through the kernel's parent-death
    signal or, where that is missing, the thread that polls the parent pid. Without TORCHELASTIC_RUN_ID (a plain
    `python finetune.py`, perhaps under nohup) the worker outlives its parent."""
    child = tmp_path / "worker.py"
    child.write_text(stop_with_launcher_child(mode))
    env = dict(os.environ, TORCHELASTIC_RUN_ID="test")
    if mode == "not under torchrun":
        del env["TORCHELASTIC_RUN_ID"]
    starter = (f"import subprocess, sys; worker = subprocess.Popen([sys.executable, {str(child)!r}], start_new_session=True); "
               "print(worker.pid, flush=True); worker.wait()")  # fmt: skip
    launcher = subprocess.Popen([sys.executable, "-c", starter], env=env, stdout=subprocess.PIPE, text=True)
    processes = [psutil.Process(launcher.pid)]
    try:
        processes.append(psutil.Process(int(launcher.stdout.readline())))
        assert launcher.stdout.readline().strip() == "ready"
        processes[0].kill()
        launcher.wait(timeout=10)
        running = wait_until_ended(processes[1:], 3 if mode == "not under torchrun" else 5)
        assert running == (processes[1:] if mode == "not under torchrun" else [])
    finally:
        kill_all(processes)
        launcher.stdout.close()


def read_lines_into(stream, lines: list[str]) -> threading.Thread:
    """A daemon thread appending each line of STREAM to LINES (so that a full pipe never blocks the writer)."""
    reader = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    reader.start()
    return reader


@pytest.mark.parametrize(
    "ds_config", ["", str(ROOT / "finetune" / "ds_config_zero2.json")], ids=["no DeepSpeed", "ZeRO-2"]
)
@pytest.mark.slow
def test_kill_9_of_the_launcher_ends_its_training_workers(tiny_model, demo, tmp_path, ds_config):
    """kill -9 of torchrun (finetune_lora.sh execs it) while two workers train: torchrun starts each worker in a
    session of its own, so nothing else stops them, and they trained on into OUTPUT_DIR with parent 1. They must
    end within seconds, with their data-loader processes. Rank 1 is stopped (SIGSTOP) first, so that rank 0 is
    waiting inside a gloo collective for it when the launcher dies, where no Python-level handler runs."""
    env = dict(run_env(tmp_path / "report"), MODEL=str(tiny_model), DATA=str(demo / "train.json"), OUTPUT_DIR=str(tmp_path / "out"),
               GPUS_PER_NODE="2", MAX_STEPS="100000", SAVE_STEPS="100000", REPORT_TO="none", MASTER_PORT=str(free_port()))  # fmt: skip
    env["DS_CONFIG"] = ds_config
    launcher = subprocess.Popen(["sh", str(ROOT / "finetune" / "finetune_lora.sh")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    torchrun, lines = psutil.Process(launcher.pid), []  # the same process once sh has exec'd torchrun
    reader, processes = read_lines_into(launcher.stdout, lines), [torchrun]
    try:
        deadline = time.monotonic() + 240
        while not any("'loss'" in line for line in lines) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert any("'loss'" in line for line in lines), "".join(lines)[-3000:]
        processes += torchrun.children(recursive=True)
        workers = [p for p in torchrun.children() if any(arg.endswith("finetune.py") for arg in p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in torchrun.children()]
        rank1 = next(p for p in workers if p.environ().get("LOCAL_RANK") == "1")
        rank1.suspend()
        time.sleep(3)  # rank 0 runs on to the next gradient all-reduce and waits there for rank 1
        torchrun.kill()
        launcher.wait(timeout=10)
        rank0 = next(p for p in workers if p is not rank1)
        assert wait_until_ended([rank0], 5) == [], "rank 0 trains on, or waits in the collective, without its launcher"
        rank1.resume()  # a stopped process acts on its pending SIGTERM once continued
        assert wait_until_ended([rank1], 5) == [], "rank 1 trains on without its launcher"
        assert wait_until_ended(processes, 15) == [], "a data-loader process of a worker is left running"
    finally:
        kill_all(processes)
        reader.join(timeout=10)


# --- the launcher's rendezvous port --------------------------------------------------------------------------


def without_rendezvous_settings(env: dict) -> dict:
    """ENV without the launcher's distributed settings, so that its defaults apply."""
    return {
        name: value
        for name, value in env.items()
        if name not in {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE"}
    }


@pytest.mark.slow
def test_two_runs_started_together_on_one_machine_both_train_and_save(tiny_model, two_samples, tmp_path):
    """finetune_lora.sh and finetune_ds.sh at the same time with the default rendezvous settings (no MASTER_PORT)
    and their GPU DeepSpeed configs (ZeRO-2, ZeRO-3; named, since without a GPU the default is no DeepSpeed): both
    rendezvous on a free port of their own; the fixed default 6001 made one of them fail with EADDRINUSE."""
    runs = {}
    for launcher, ds_config in (
        ("finetune_lora.sh", "ds_config_zero2.json"),
        ("finetune_ds.sh", "ds_config_zero3.json"),
    ):
        out, report = tmp_path / launcher / "out", tmp_path / launcher / "report"
        env = dict(without_rendezvous_settings(run_env(report)), MODEL=str(tiny_model), DATA=str(two_samples), OUTPUT_DIR=str(out),
                   MAX_STEPS="1", SAVE_STEPS="100", REPORT_TO="none", DS_CONFIG=str(ROOT / "finetune" / ds_config))  # fmt: skip
        process = subprocess.Popen(
            ["sh", str(ROOT / "finetune" / launcher)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs[launcher] = (process, out, report)
    try:
        outputs = {launcher: process.communicate(timeout=400)[0] for launcher, (process, _, _) in runs.items()}
    finally:
        for process, _, _ in runs.values():
            process.kill()  # sh has exec'd torchrun, which stops its own workers when it ends (or dies)
            process.wait()
    for launcher, (process, _, report) in runs.items():
        assert process.returncode == 0, f"{launcher}:\n{outputs[launcher][-3000:]}"
        (rank,) = read_reports(report, 1)
        assert rank["wrapper"] == "DeepSpeedEngine" and rank["global_step"] == 1
    assert (runs["finetune_lora.sh"][1] / "adapter_model.safetensors").is_file()
    assert (runs["finetune_ds.sh"][1] / "config.json").is_file() and list(
        runs["finetune_ds.sh"][1].glob("*.safetensors")
    )


@pytest.mark.parametrize(
    ("launcher", "settings", "expected", "absent"),
    [("finetune_lora.sh", {}, ["--standalone"], ["--master_port", "--master_addr"]),
     ("finetune_ds.sh", {}, ["--standalone"], ["--master_port", "--master_addr"]),
     ("finetune_lora.sh", {"MASTER_PORT": "12345"}, ["--master_addr localhost", "--master_port 12345"], ["--standalone"]),
     ("finetune_lora.sh", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7"},
      ["--nnodes 2", "--node_rank 1", "--master_addr 10.0.0.7", "--master_port 6001"], ["--standalone"]),
     ("finetune_ds.sh", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7"},
      ["--nnodes 2", "--node_rank 1", "--master_addr 10.0.0.7", "--master_port 6001"], ["--standalone"]),
     ("finetune_lora.sh", {"NNODES": "2", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "7010"}, ["--master_port 7010"], ["--standalone"])],
    ids=["one node", "one node, full", "one node, MASTER_PORT", "two nodes", "two nodes, full", "two nodes, MASTER_PORT"],
)  # fmt: skip
def test_launcher_rendezvous_arguments(tmp_path, launcher, settings, expected, absent):
    """The rendezvous the launchers ask torchrun for, read from a stand-in `torchrun` on PATH that prints its
    arguments: one node without MASTER_PORT, a free port (--standalone); several nodes must agree on a port, so
    without MASTER_PORT the documented 6001; an explicit MASTER_PORT always."""
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "torchrun $*"\n')
    fake.chmod(0o755)
    # PREFLIGHT=0: no model or data file exists here; only the arguments torchrun is given are read.
    env = dict(
        without_rendezvous_settings(dict(os.environ)),
        PATH=f"{fake.parent}:{os.environ['PATH']}",
        MODEL="m",
        DATA="d.json",
        PREFLIGHT="0",
        **settings,
    )
    result = subprocess.run(
        ["sh", str(ROOT / "finetune" / launcher)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    command = next(line for line in result.stdout.splitlines() if line.startswith("torchrun "))
    words = f" {command} "
    assert all(f" {flag} " in words for flag in expected), command
    assert not any(f" {flag} " in words for flag in absent), command
