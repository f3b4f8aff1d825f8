"""What a real run does after its first steps: save checkpoints from several processes, resume the latest complete
one (never executing code from its files), and keep one run's output directory from being taken by another."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PYTHON_BIN, ROOT, base_args, free_port
from transformers import AutoModel

import finetune  # noqa: F401
from finetune.arguments import TrainingArguments, UsageError
from finetune.train import train
from finetune.trainer import MiniCPMVTrainer


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(24, 6)


def losses_by_step(log_history: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


# --- saving from several processes --------------------------------------------------------------------------


def test_a_process_that_does_not_save_writes_nothing(tiny_model, tmp_path, monkeypatch):
    """The library calls _save on every rank under DeepSpeed and DDP; only the saving process may write. A rank that
    arrived before rank 0 had created checkpoint-N used to fail copying the tokenizer files into it."""
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    trainer = MiniCPMVTrainer(model=AutoModel.from_pretrained(tiny_model), args=args, base_model_dir=str(tiny_model))
    monkeypatch.setattr(type(args), "should_save", property(lambda self: False))
    trainer._save(str(tmp_path / "out" / "checkpoint-1"))
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def run_env(report: Path) -> dict:
    env = dict(
        os.environ, FINETUNE_RUN_REPORT=str(report), PATH=f"{PYTHON_BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1"
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def torchrun_two_processes(args: list[str], report: Path) -> subprocess.CompletedProcess:
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


def rank_report(report: Path, rank: int = 0) -> dict:
    return json.loads((report / f"rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "ds_config_zero2.json"], ids=["ddp", "zero2"])
def test_two_processes_save_every_step_and_resume_the_latest_complete_checkpoint(tiny_model, demo, tmp_path, deepspeed):
    """Four checkpoints from two processes, each complete; then the run is cut back to a crash's leftovers (the
    newest checkpoint gone, the one before it half-written) and `--resume_from_checkpoint true` continues from the
    latest complete one with the same losses as the run that was not interrupted."""
    out = tmp_path / "out"
    args = base_args(tiny_model, demo / "train.json", out, "--max_steps", "4", "--per_device_train_batch_size", "1",
                     "--save_strategy", "steps", "--save_steps", "1", "--lora_dropout", "0")  # fmt: skip
    if deepspeed:
        args += ["--deepspeed", str(ROOT / "finetune" / deepspeed)]
    first = torchrun_two_processes(args, tmp_path / "report_first")
    assert first.returncode == 0, first.stderr[-3000:]
    for step in range(1, 5):
        checkpoint = out / f"checkpoint-{step}"
        for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
                     "rng_state_0.pth", "rng_state_1.pth"):  # fmt: skip
            assert (checkpoint / name).is_file(), f"{checkpoint.name} has no {name}"
        if deepspeed:
            shards = sorted(p.name for p in (checkpoint / f"global_step{step}").glob("*optim_states.pt"))
            assert len(shards) == 2, shards
        else:
            assert (checkpoint / "optimizer.pt").is_file()
    straight = losses_by_step(rank_report(tmp_path / "report_first")["log_history"])

    shutil.rmtree(out / "checkpoint-4")
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    resumed = torchrun_two_processes(args + ["--resume_from_checkpoint", "true"], tmp_path / "report_resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    again = losses_by_step(rank_report(tmp_path / "report_resumed")["log_history"])
    assert sorted(again) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's state, 3-4 trained again
    assert again[3] == pytest.approx(straight[3], rel=1e-5) and again[4] == pytest.approx(straight[4], rel=1e-5)


# --- resuming: which checkpoint, and never code from its files -----------------------------------------------------


def fake_checkpoint(directory: Path, step: int, **broken: str) -> Path:
    """A checkpoint-STEP as the Trainer writes one without DeepSpeed (its files' kinds and contents' types);
    `broken` maps a file name to "missing" or "empty"."""
    from safetensors.torch import save_file

    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file(
        {"base_model.model.llm.lm_head.lora_A.weight": torch.zeros(2, 2)}, checkpoint / "adapter_model.safetensors"
    )
    (checkpoint / "adapter_config.json").write_text("{}")
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.pt")
    torch.save({"last_epoch": step}, checkpoint / "scheduler.pt")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name, how in broken.items():
        (checkpoint / name).unlink()
        if how == "empty":
            (checkpoint / name).touch()
    return checkpoint


def test_resume_true_takes_the_newest_complete_checkpoint(tmp_path):
    from finetune.run_directory import resolve_resume_checkpoint

    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 3, **{"trainer_state.json": "missing"})
    fake_checkpoint(tmp_path, 4, **{"optimizer.pt": "empty"})
    fake_checkpoint(tmp_path, 10, **{"adapter_model.safetensors": "empty"})  # 10 > 4: compared as numbers
    for keyword in ("true", "latest", "True"):
        assert resolve_resume_checkpoint(keyword, tmp_path, deepspeed=False, world_size=1) == tmp_path / "checkpoint-2"


@pytest.mark.parametrize(
    ("broken", "message"),
    [({"trainer_state.json": "missing"}, "no trainer_state.json"), ({"optimizer.pt": "empty"}, "empty file optimizer.pt"),
     ({"scheduler.pt": "missing"}, "no scheduler.pt"), ({"adapter_model.safetensors": "missing"}, "no weights")],
)  # fmt: skip
def test_an_incomplete_checkpoint_named_explicitly_is_refused(tmp_path, broken, message):
    from finetune.run_directory import RunDirectoryError, resolve_resume_checkpoint

    checkpoint = fake_checkpoint(tmp_path, 3, **broken)
    for requested in (str(checkpoint), "checkpoint-3"):  # a path, or a name inside the output directory
        with pytest.raises(RunDirectoryError, match=f"--resume_from_checkpoint {requested}: cannot resume: {message}"):
            resolve_resume_checkpoint(requested, tmp_path, deepspeed=False, world_size=1)


def test_a_checkpoint_of_another_setting_is_refused(tmp_path):
    from finetune.run_directory import RunDirectoryError, resolve_resume_checkpoint

    checkpoint = fake_checkpoint(tmp_path, 3)
    with pytest.raises(RunDirectoryError, match="saved without DeepSpeed; this run is under DeepSpeed"):
        resolve_resume_checkpoint(str(checkpoint), tmp_path, deepspeed=True, world_size=1)


def test_resume_without_a_complete_checkpoint_stops_before_the_model_loads(tiny_model, demo, tmp_path, monkeypatch):
    import finetune.train as entry

    monkeypatch.setattr(entry, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    with pytest.raises(
        UsageError, match=r"--resume_from_checkpoint true: no complete checkpoint in .*out \(none saved yet\)"
    ):
        train(base_args(tiny_model, demo / "train.json", out, "--resume_from_checkpoint", "true"))
    fake_checkpoint(out, 5, **{"trainer_state.json": "missing"})
    with pytest.raises(UsageError, match=r"no complete checkpoint in .*\(checkpoint-5: no trainer_state.json"):
        train(base_args(tiny_model, demo / "train.json", out, "--resume_from_checkpoint", "true"))
    with pytest.raises(UsageError, match="--resume_from_checkpoint true: no complete checkpoint"):
        train(base_args(tiny_model, demo / "train.json", out, "--resume_from_checkpoint", "true"))


class WritesCanary:
    """A pickle that writes a file when unpickled: what a tampered checkpoint would carry."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (Path.write_text, (self.canary, "code from the checkpoint ran"))


@pytest.fixture(scope="module")
def deepspeed_checkpoint(tiny_model, demo, tmp_path_factory) -> Path:
    """A run of two steps under DeepSpeed ZeRO-2 (one process, as the launcher runs on a CPU machine) that saved
    checkpoint-2. Read-only for tests: copy it to tamper with it."""
    out = tmp_path_factory.mktemp("deepspeed_run") / "out"
    args = base_args(tiny_model, demo / "train.json", out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
                     "--deepspeed", str(ROOT / "finetune" / "ds_config_zero2.json"))  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / "finetune" / "finetune.py"), *args], env=run_env(out.parent / "report"),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_deepspeed_checkpoint_files_pass_the_weights_only_check(deepspeed_checkpoint):
    from finetune.run_directory import check_resume_is_safe, pickles_loaded_on_resume

    checkpoint = deepspeed_checkpoint / "checkpoint-2"
    names = {str(p.relative_to(checkpoint)) for p in pickles_loaded_on_resume(checkpoint)}
    assert {
        "rng_state.pth",
        "global_step2/mp_rank_00_model_states.pt",
        "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    } <= names
    check_resume_is_safe(checkpoint)  # the loss scaler, ZeRO's stage enum, numpy RNG states: all allowed


@pytest.mark.parametrize(
    "planted",
    [
        "global_step2/mp_rank_00_model_states.pt",
        "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rng_state.pth",
    ],
)
@pytest.mark.slow
def test_resume_under_deepspeed_never_runs_code_from_a_checkpoint(
    deepspeed_checkpoint, tiny_model, demo, tmp_path, planted
):
    """DeepSpeed unpickles its files with weights_only=False: a planted pickle used to run. The resume is refused,
    naming the file, before any library opens it."""
    out, canary = tmp_path / "out", tmp_path / "canary"
    shutil.copytree(deepspeed_checkpoint, out)
    target = out / "checkpoint-2" / planted
    state = torch.load(target, weights_only=False)  # the real file, trusted here: the test wrote it
    state["extra"] = WritesCanary(canary)
    torch.save(state, target)
    args = base_args(tiny_model, demo / "train.json", out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2",
                     "--deepspeed", str(ROOT / "finetune" / "ds_config_zero2.json"), "--resume_from_checkpoint", str(out / "checkpoint-2"))  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / "finetune" / "finetune.py"), *args], env=run_env(tmp_path / "report"),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert not canary.exists(), "code from the checkpoint ran"
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("finetune.py: error:")]
    assert (
        len(error) == 1
        and planted in error[0]
        and "refused to load (it names " in error[0]
        and "Traceback" not in result.stderr
    )


# --- whose output directory ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_into_the_same_output_dir_is_refused_unless_it_resumes_or_overwrites(
    tiny_model, demo, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    extra = ("--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    train(base_args(tiny_model, demo / "train.json", out, *extra))
    adapter = (out / "adapter_model.safetensors").read_bytes()
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}

    import finetune.train as entry

    with monkeypatch.context() as patched:
        patched.setattr(entry, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(
            UsageError,
            match="--output_dir .*out holds another run .*--resume_from_checkpoint true.*--overwrite_output_dir true",
        ):
            train(base_args(tiny_model, demo / "train.json", out, *extra, "--seed", "1"))
    assert (out / "adapter_model.safetensors").read_bytes() == adapter  # untouched
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}

    (out / "notes.txt").write_text("the user's own file")
    train(
        base_args(
            tiny_model, demo / "train.json", out, "--max_steps", "1", "--seed", "1", "--overwrite_output_dir", "true"
        )
    )
    assert not list(out.glob("checkpoint-*")), "the replaced run's checkpoints must not be mistaken for this run's"
    assert (out / "adapter_model.safetensors").read_bytes() != adapter
    assert (out / "notes.txt").read_text() == "the user's own file"  # only what a run writes is removed


@pytest.mark.parametrize("where", ["file", "under a file", "unwritable"])
def test_an_output_dir_that_cannot_be_written_stops_before_the_model_loads(
    tiny_model, demo, tmp_path, monkeypatch, where
):
    import finetune.train as entry

    monkeypatch.setattr(entry, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a_file").write_text("x")
    out, message = {
        "file": (tmp_path / "a_file", "exists and is not a directory"),
        "under a file": (tmp_path / "a_file" / "out", "cannot write there"),
        "unwritable": (Path("/sys/finetune-output"), "cannot write there"),  # root too may not create files in sysfs
    }[where]
    with pytest.raises(UsageError, match=f"--output_dir {out}: {message}"):
        train(base_args(tiny_model, demo / "train.json", out))
