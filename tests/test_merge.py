"""finetune.merge on CPU with the tiny model: exact merge, refusal of foreign adapters, atomic output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, base_args
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import finetune  # noqa: F401
from finetune import merge as merge_module
from finetune.base_identity import IDENTITY_FILE, compare, fingerprint, identity_for_training
from finetune.dataset import DataCollator, DataSettings, SupervisedDataset
from finetune.merge import MergeError, check_adapter, merge
from finetune.model.checkpoint import stored_shapes
from finetune.model.tokenization import SpecialTokens
from finetune.synthetic import build_tiny_checkpoint
from finetune.train import train

LORA_TARGET = r"llm\.model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight"


@pytest.fixture(scope="module")
def demo(demo_factory) -> Path:
    return demo_factory(4, 4)


@pytest.fixture(scope="module")
def merged(tiny_model, tiny_adapter, tmp_path_factory) -> Path:
    return merge(
        tiny_model, tiny_adapter, tmp_path_factory.mktemp("merged") / "out", dtype="fp32", max_shard_size="2MB"
    )


def eval_batch(model_dir: Path, demo: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = SupervisedDataset(
        DataSettings(str(demo / "eval.json")), tokenizer, AutoModel.from_pretrained(model_dir).config
    )
    return DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad)([dataset[i] for i in range(len(dataset))])


def copy_of_base(model_dir: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A copy of the checkpoint, its weights stored in `dtype` when given."""
    shutil.copytree(model_dir, out)
    if dtype is not None:
        for file in out.glob("*.safetensors"):
            save_file(
                {name: tensor.to(dtype) for name, tensor in load_file(file).items()},
                str(file),
                metadata={"format": "pt"},
            )
    return out


def copy_of_adapter_without_record(adapter: Path, out: Path) -> Path:
    """The adapter as an older version (or another tool) saved it: no base_model_identity.json."""
    shutil.copytree(adapter, out)
    (out / IDENTITY_FILE).unlink()
    return out


def swap_two_token_ids(model_dir: Path) -> None:
    """Another vocabulary of the same size (the embedding shapes stay): two tokens exchange their ids."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))


def refuse_weight_loading(monkeypatch) -> None:
    """Make loading the base fail loudly: a refusal must come before any weights are loaded."""

    def loading(*args, **kwargs):
        raise AssertionError("the base's weights were loaded")

    monkeypatch.setattr(AutoModel, "from_pretrained", loading)


def previous_merge(out: Path) -> Path:
    """A directory that looks like an earlier merge's output (config.json, a safetensors file), with a note in it."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "minicpmv"}))
    save_file({"weight": torch.zeros(2)}, str(out / "model-00001-of-00001.safetensors"))
    (out / "old.txt").write_text("previous merge")
    return out


def contents(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes): to check that a refusal deleted nothing."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# --- the merge ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_merged_model_equals_the_adapter_model(merged, tiny_model, tiny_adapter, demo):
    batch = eval_batch(tiny_model, demo)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model), tiny_adapter).eval()
    merged_model = AutoModel.from_pretrained(merged).eval()
    base_model = AutoModel.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        expected = peft_model(data=batch["data"], attention_mask=batch["attention_mask"]).logits
        actual = merged_model(data=batch["data"], attention_mask=batch["attention_mask"]).logits
        base = base_model(data=batch["data"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert (actual - base).abs().max() > 1e-3, "the adapter must change the model"


def test_merged_weights_change_exactly_where_training_did(merged, tiny_model):
    base, out = all_tensors(tiny_model), all_tensors(merged)
    assert base.keys() == out.keys()
    changed = {name for name in base if not torch.equal(base[name], out[name])}
    expected = {n for n in base if re.fullmatch(LORA_TARGET, n) or n.startswith(("resampler.", "vpm."))}
    assert changed == expected
    assert all(out[n].dtype == base[n].dtype == torch.float32 for n in base)


def test_published_sharded_layout(merged, tiny_model, tiny_adapter):
    shards = sorted(p.name for p in merged.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(
        p == f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k, p in enumerate(shards, 1)
    )
    assert not (merged / "model.safetensors").exists()
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(stored_shapes(tiny_model))  # same tensor names as the published model
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "minicpmv" and config["rope_theta"] == 500000.0 and "rope_parameters" not in config
    assert config["auto_map"]["AutoModel"] == "modeling_minicpmv.MiniCPMV"
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (merged / name).read_bytes() == (tiny_adapter / name).read_bytes(), name
    assert not list(merged.parent.glob("*.tmp-*"))
    model = AutoModel.from_pretrained(merged)
    assert type(model).__name__ == "MiniCPMV"


def test_bf16_merge(tiny_model, tiny_adapter, tmp_path):
    out = merge(tiny_model, tiny_adapter, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(next(out.glob("model-*.safetensors"))), framework="pt") as handle:
        assert all(handle.get_slice(k).get_dtype() == "BF16" for k in handle.keys())
    assert AutoModel.from_pretrained(out).llm.lm_head.weight.dtype == torch.bfloat16


# --- refusals: nothing written ---------------------------------------------------------------------------------


def test_adapter_of_a_model_with_fewer_layers_is_refused(tiny_adapter, tmp_path):
    other = build_tiny_checkpoint(tmp_path / "other", seed=1, config_overrides={"num_hidden_layers": 1})
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"lora_A\.weight .*has no linear module llm\.model\.layers\.1\.self_attn"):
        merge(other, tiny_adapter, out, dtype="fp32")
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_adapter_of_a_model_with_another_hidden_size_is_refused(tiny_adapter, tmp_path):
    other = build_tiny_checkpoint(tmp_path / "other", seed=1, config_overrides={"hidden_size": 384})
    with pytest.raises(
        MergeError, match=r"layers\.0\.self_attn\.k_proj\.lora_A\.weight \[8, 256\]: LoRA A needs in_features 384"
    ):
        merge(other, tiny_adapter, tmp_path / "out", dtype="fp32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            "base_model.model.llm.model.layers.1.self_attn.v_proj.lora_B.weight",
            r"lora_B\.weight \[7, 8\]: LoRA B needs out_features 128",
        ),
        (
            "base_model.model.resampler.query",
            r"resampler\.query \[7, 8\]: the base's resampler\.query has shape \[16, 256\]",
        ),
    ],
)
def test_tampered_tensor_shape_is_refused(tiny_model, tiny_adapter, tmp_path, tensor, message):
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_adapter, tampered)
    tensors = load_file(tampered / "adapter_model.safetensors")
    assert tensor in tensors
    tensors[tensor] = torch.zeros(7, 8)
    save_file(tensors, str(tampered / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match=message):
        merge(tiny_model, tampered, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_target_module_and_missing_adapter(tiny_model, tiny_adapter, tmp_path):
    with pytest.raises(MergeError, match="no such directory"):
        check_adapter(tiny_model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="adapter_config.json: missing"):
        check_adapter(tiny_model, tmp_path / "empty")
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_adapter, wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["target_modules"] = ["gate_proj_of_another_model"]
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="target module 'gate_proj_of_another_model' does not exist in the base"):
        check_adapter(tiny_model, wrong)


def test_existing_output_is_refused_unless_overwrite(tiny_model, tiny_adapter, tmp_path):
    out = previous_merge(tmp_path / "out")
    with pytest.raises(MergeError, match="exists and is not empty"):
        merge(tiny_model, tiny_adapter, out, dtype="fp32")
    assert (out / "old.txt").read_text() == "previous merge"
    merge(tiny_model, tiny_adapter, out, dtype="fp32", overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("base", r"--out .*/base is the --base directory"),
        ("elsewhere/../adapter", r"--out .*/elsewhere/\.\./adapter is the --adapter directory"),  # compared resolved
        (
            "adapter/merged",
            r"--out .*/adapter/merged is inside the --adapter directory .*/adapter: --overwrite would replace part of it",
        ),
        (".", r"--out .* contains the --base directory .*/base"),
    ],
)
def test_overwrite_refuses_the_base_and_the_adapter_directories(
    tiny_model, tiny_adapter, tmp_path, monkeypatch, out, message
):
    base, adapter = copy_of_base(tiny_model, tmp_path / "base"), shutil.copytree(tiny_adapter, tmp_path / "adapter")
    (tmp_path / "elsewhere").mkdir()
    before = contents(tmp_path)
    refuse_weight_loading(monkeypatch)
    with pytest.raises(MergeError, match=message):
        merge(base, adapter, tmp_path / out, dtype="fp32", overwrite=True)
    assert contents(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter",
        "base",
        "elsewhere",
    ]


def test_overwrite_refuses_a_directory_that_does_not_look_like_a_model_and_keeps_its_files(
    tiny_model, tiny_adapter, tmp_path, monkeypatch
):
    out = tmp_path / "documents"
    (out / "chapter1").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "chapter1" / "figure.safetensors.txt").write_text("not a model either")
    before = contents(out)
    refuse_weight_loading(monkeypatch)
    with pytest.raises(
        MergeError,
        match=r"--out .*/documents: exists and does not look like a model \(no config\.json, no \*\.safetensors\): not deleting it",
    ):
        merge(tiny_model, tiny_adapter, out, dtype="fp32", overwrite=True)
    assert contents(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["documents"]


def test_interrupted_write_leaves_no_output(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    written = []

    def interrupted(adapter_dir, base_dir, tmp):  # weights are on disk by now: fail half way through
        written.extend(p.name for p in tmp.iterdir())
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(merge_module, "copy_passthrough_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(tiny_model, tiny_adapter, tmp_path / "out", dtype="fp32")
    assert any(name.startswith("model-") for name in written)
    assert list(tmp_path.iterdir()) == [], "neither OUT nor OUT.tmp-<pid> may remain"


def test_interrupted_overwrite_keeps_the_old_output(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    out = previous_merge(tmp_path / "out")

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(AutoModel.from_pretrained(tiny_model)), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        merge(tiny_model, tiny_adapter, out, dtype="fp32", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "previous merge"


# --- the base's identity: other weights or another vocabulary of the same shapes -------------------------------------


def test_adapter_of_another_base_with_the_same_shapes_is_refused_naming_both(tiny_adapter, tmp_path, monkeypatch):
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)  # same architecture and tokenizer, other weights
    check_adapter(other, tiny_adapter)  # the shapes alone cannot tell
    refuse_weight_loading(monkeypatch)
    with pytest.raises(MergeError) as refusal:
        merge(other, tiny_adapter, tmp_path / "out", dtype="fp32")
    message = str(refusal.value)
    assert f"--adapter {tiny_adapter} was not trained on --base {other}" in message
    assert "the weights differ (sampled values of" in message and "tokenizer" not in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_base_with_another_tokenizer_vocabulary_is_refused(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    base = copy_of_base(tiny_model, tmp_path / "base")
    swap_two_token_ids(base)
    refuse_weight_loading(monkeypatch)
    expected = rf"was not trained on --base .*: the tokenizer vocabulary differs \(818 tokens each, other tokens or ids\) \(it records its base as {re.escape(str(tiny_model))}\)$"
    with pytest.raises(MergeError, match=expected) as refusal:
        merge(base, tiny_adapter, tmp_path / "out", dtype="fp32")
    assert "weights" not in str(refusal.value)
    # without the record, the adapter's tokenizer files are still never copied over a base of another vocabulary
    unrecorded = copy_of_adapter_without_record(tiny_adapter, tmp_path / "unrecorded")
    with pytest.raises(
        MergeError,
        match=rf"{re.escape(str(unrecorded / 'tokenizer.json'))}: another vocabulary than --base {re.escape(str(base))}'s",
    ):
        merge(base, unrecorded, tmp_path / "out", dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_the_same_base_stored_in_bf16_with_a_reserialised_tokenizer_is_accepted(
    tiny_model, tiny_adapter, tmp_path, capsys
):
    base = copy_of_base(tiny_model, tmp_path / "bf16", torch.bfloat16)
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    (base / "tokenizer.json").write_text(
        json.dumps(tokenizer, indent=4, sort_keys=True)
    )  # other bytes, same vocabulary
    assert (base / "tokenizer.json").read_bytes() != (tiny_model / "tokenizer.json").read_bytes()
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}
    merge(base, tiny_adapter, tmp_path / "out", dtype="fp32")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert "notice" not in capsys.readouterr().err


def test_adapter_without_a_record_merges_with_a_one_line_notice(tiny_model, tiny_adapter, tmp_path, capsys):
    adapter = copy_of_adapter_without_record(tiny_adapter, tmp_path / "old_adapter")
    merge(tiny_model, adapter, tmp_path / "out", dtype="fp32")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune.merge: notice:")]
    assert (
        len(notices) == 1 and str(adapter) in notices[0] and "could not be verified beyond tensor shapes" in notices[0]
    )


def test_leftovers_of_an_interrupted_merge_are_removed_and_those_of_a_running_one_kept(
    tiny_model, tiny_adapter, tmp_path, capsys
):
    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid names no process now
    leftovers = [
        tmp_path / f"out.tmp-{ended.pid}",
        tmp_path / f"out.old-{ended.pid}",
        tmp_path / f"out.tmp-{os.getpid()}",
    ]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "model-00001-of-00002.safetensors").write_bytes(b"half written")
    running, unrelated = tmp_path / "out.tmp-1", [tmp_path / "out.tmp-notes", tmp_path / f"other.tmp-{ended.pid}"]
    for directory in (running, *unrelated):  # pid 1 is always running; the others are not a merge's into out
        directory.mkdir()
    merge(tiny_model, tiny_adapter, tmp_path / "out", dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name, *(p.name for p in unrelated)])
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune.merge: notice:")]
    assert sorted(notices) == sorted(
        [
            f"finetune.merge: notice: removed {p}, left by an interrupted merge (process {p.name.rsplit('-', 1)[1]} has ended)"
            for p in leftovers
        ]
        + [
            f"finetune.merge: notice: {running}: left alone, process 1 that wrote it is still running (a merge into {tmp_path / 'out'} in progress? if not, delete it)"
        ]
    )


# --- command line ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_refuses_a_foreign_adapter_in_one_line(tiny_adapter, tmp_path):
    other = build_tiny_checkpoint(tmp_path / "other", seed=1, config_overrides={"num_hidden_layers": 1})
    result = subprocess.run(
        [sys.executable, "-m", "finetune.merge", "--base", str(other), "--adapter", str(tiny_adapter), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "finetune.merge: error:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_adapter_of_another_base_of_the_same_shapes_in_one_line(tiny_adapter, tmp_path, capsys):
    """In process (the test above runs `python -m finetune.merge` for the exit status of the real command)."""
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    capsys.readouterr()  # the checkpoint writer's progress bar
    status = merge_module.cli(["--base", str(other), "--adapter", str(tiny_adapter), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.startswith("finetune.merge: error: ") and captured.err.count("\n") == 1, captured.err
    assert f"--adapter {tiny_adapter} was not trained on --base {other}: the weights differ" in captured.err
    assert not (tmp_path / "out").exists()


# --- the base's identity, as training records it ------------------------------------------------------------------


def test_training_records_the_base_identity_in_the_output_and_every_checkpoint_and_merge_accepts_it(
    tiny_model, demo, tmp_path, capsys
):
    out = tmp_path / "run"
    train(
        base_args(
            tiny_model, demo / "train.json", out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"
        )
    )
    expected = fingerprint(tiny_model)
    for directory in (out, out / "checkpoint-1", out / "checkpoint-2"):
        recorded = json.loads((directory / IDENTITY_FILE).read_text())
        assert recorded["base"] == str(tiny_model)
        assert recorded["weights"] == expected["weights"] and recorded["tokenizer"] == expected["tokenizer"]
        assert compare(recorded, expected) is None
    merge(tiny_model, out, tmp_path / "merged", dtype="fp32")  # the adapter of a run with its own base
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    assert "notice" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_from_a_hub_id_saves_the_cached_base_files_and_identity_and_merges_by_that_id(tiny_model, demo, tmp_path):
    """Users name the base by its hub id: the saves copy its tokenizer files and record its identity from the local
    cache, as they do for a directory, and merge finds and checks the same base by that id."""
    repo = tmp_path / "hub" / "models--someone--tiny-minicpmv"
    shutil.copytree(tiny_model, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    args = base_args("someone/tiny-minicpmv", demo / "train.json", out, "--max_steps", "1")
    trained = subprocess.run(
        [sys.executable, str(ROOT / "finetune" / "finetune.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (out / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert json.loads((out / IDENTITY_FILE).read_text())["base"] == "someone/tiny-minicpmv"
    merged = subprocess.run([sys.executable, "-m", "finetune.merge", "--base", "someone/tiny-minicpmv", "--adapter", str(out), "--out", str(tmp_path / "merged")],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert merged.returncode == 0 and "notice" not in merged.stderr, merged.stderr[-3000:]


def test_no_identity_is_recorded_for_a_hub_id_missing_from_the_local_cache(caplog):
    with caplog.at_level("WARNING", logger="finetune.base_identity"):
        assert identity_for_training("no-such-org/no-such-model") is None
    assert "no-such-org/no-such-model" in caplog.text and "not recorded" in caplog.text


def test_merged_files_get_the_modes_of_normal_files(tiny_model, tiny_adapter, tmp_path):
    """Weights go through temporary files (0600): the merged model is readable like any file, umask honoured."""
    previous = os.umask(0o027)
    try:
        out = merge(tiny_model, tiny_adapter, tmp_path / "modes", dtype="bf16", max_shard_size="200KB")
    finally:
        os.umask(previous)
    assert (out.stat().st_mode & 0o777) == 0o750
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o640 for p in files}
