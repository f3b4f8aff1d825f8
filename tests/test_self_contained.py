"""Merged and exported checkpoints carry the project's model code: plain transformers loads them without finetune
(MiniCPM-Llama3-V-2.5 and MiniCPM-V 2.6).

The end-to-end check runs tests/load_without_finetune.py in a fresh interpreter that cannot import the project and
compares what the checkpoint's own code computes with what the project computes in this process.
"""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import case_data
from PIL import Image
from transformers import AutoModel, AutoTokenizer
from transformers.dynamic_module_utils import get_imports, get_relative_imports

import finetune  # noqa: F401
import finetune.model.versions
from finetune import export, merge
from finetune.model import MiniCPMV, MiniCPMVTokenizerFast
from finetune.model.chat_prompt import render_chat_prompt
from finetune.self_contained import ModelCodeError, flat_model_code, flat_module_name, flatten_source

TESTS = Path(__file__).resolve().parent
IMAGE = TESTS / "golden_tiny" / "images" / "wide_260x150.png"
QUESTION = "What is in the image?"
GREEDY = {"sampling": False, "num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 6}
ENTRY_FILES = {"configuration_minicpm.py", "modeling_minicpmv.py", "tokenization_minicpmv_fast.py"}


# --- the source transform ---------------------------------------------------------------------------------------


def test_flat_module_names():
    assert flat_module_name("pkg.modeling", "pkg") == "modeling"
    assert flat_module_name("pkg.versions", "pkg") == "versions"
    assert flat_module_name("pkg.versions.v9", "pkg") == "versions_v9"


def test_package_imports_become_flat_relative_ones_and_optional_ones_stay_optional(tmp_path):
    source = textwrap.dedent(
        '''\
        """A version module."""
        from __future__ import annotations

        from typing import TYPE_CHECKING

        import torch
        from pkg.resampler import Resampler

        from ..configuration import (
            Mixin,
            Other as Renamed,
        )
        from .model_version import ModelVersion  # the dataclass

        if TYPE_CHECKING:
            from ..image_processing import SliceGrid


        def fused(x):
            import liger_kernel.transformers
            from flash_attn import flash_attn_func

            return liger_kernel.transformers, flash_attn_func, torch, x
        '''
    )
    flat, imported = flatten_source(source, "pkg.versions.v9", is_package=False, package="pkg")
    assert imported == {"pkg.resampler", "pkg.configuration", "pkg.versions.model_version", "pkg.image_processing"}
    assert "from .resampler import Resampler\n" in flat
    assert "from .configuration import Mixin, Other as Renamed\n" in flat
    assert "from .versions_model_version import ModelVersion  # the dataclass\n" in flat
    assert "    from .image_processing import SliceGrid\n" in flat
    # What transformers reads from the text: flat relative imports, and only required packages as absolute ones.
    compile(flat, "v9", "exec")  # still valid Python
    scratch = tmp_path / "versions_v9.py"  # transformers' readers take a file
    scratch.write_text(flat)
    assert set(get_relative_imports(scratch)) == {
        "resampler", "configuration", "versions_model_version", "image_processing"
    }  # fmt: skip
    assert get_imports(scratch) == ["__future__", "torch", "typing"]
    # Everything else is the text as it was.
    assert flat.startswith('"""A version module."""\n') and flat.endswith(
        "    return liger_kernel.transformers, flash_attn_func, torch, x\n"
    )


def test_optional_imports_raise_the_same_error_when_missing():
    source = "def fused():\n    import no_such_package_here\n    return no_such_package_here\n"
    flat, _ = flatten_source(source, "pkg.kernels", is_package=False, package="pkg")
    namespace: dict = {}
    exec(compile(flat, "kernels", "exec"), namespace)
    with pytest.raises(ImportError, match="no_such_package_here"):
        namespace["fused"]()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("from finetune.dataset import DataCollator\n", "finetune.dataset"),
        ("import pkg.resampler\n", "import pkg.resampler"),
        ("from . import resampler\n", "from . import resampler"),
        ("x = 1; from .resampler import Resampler\n", "its own line"),
    ],
)
def test_imports_that_cannot_be_flattened_are_refused_naming_the_line(source, message):
    with pytest.raises(ModelCodeError, match=message) as error:
        flatten_source(source, "pkg.modeling", is_package=False, package="pkg", foreign=("finetune",))
    assert "pkg.modeling line 1" in str(error.value)


def test_the_model_package_flattens_with_every_version_and_nothing_else_of_the_project(tmp_path):
    files = flat_model_code(finetune.model.MiniCPMVConfig, MiniCPMV, MiniCPMVTokenizerFast)
    assert ENTRY_FILES <= set(files)
    versions = {f"versions_{m.name}.py" for m in pkgutil.iter_modules(finetune.model.versions.__path__)}
    assert versions <= set(files), versions - set(files)  # every version, whichever the checkpoint is
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name in files:
        for imported in get_relative_imports(tmp_path / name):
            assert f"{imported}.py" in files, f"{name} imports .{imported}, which is not written"
        required = get_imports(tmp_path / name)
        assert "finetune" not in required and "liger_kernel" not in required and "flash_attn" not in required
        for package in required:
            __import__(package)  # transformers' check: installed here, as on any machine with torch + transformers


# --- end to end: merge / export, then load without the project ------------------------------------------------


# Each exported checkpoint: MiniCPM-Llama3-V-2.5 and MiniCPM-V 2.6, merged with an adapter or a base exported.
NAMES = ["merged", "base", "merged_v2_6", "base_v2_6"]


@pytest.fixture(scope="module")
def exported(
    tiny_model, tiny_adapter, golden_dir, golden_v2_6_dir, tiny_adapter_v2_6, tmp_path_factory
) -> dict[str, Path]:
    """Per version a merge of a tiny adapter and an export of the golden base, all through their command lines."""
    root = tmp_path_factory.mktemp("self_contained")
    for base, adapter, suffix in ((tiny_model, tiny_adapter, ""), (golden_v2_6_dir, tiny_adapter_v2_6, "_v2_6")):
        argv = [
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--out",
            str(root / f"merged{suffix}"),
            "--dtype",
            "fp32",
        ]
        assert merge.cli(argv) == 0
    assert export.cli(["--model", str(golden_dir), "--output", str(root / "base")]) == 0
    assert export.cli(["--model", str(golden_v2_6_dir), "--output", str(root / "base_v2_6")]) == 0
    return {name: root / name for name in NAMES}


@pytest.fixture(scope="module")
def expected(exported, golden_cases, golden_v2_6_cases) -> dict[str, dict]:
    """What the project's own classes compute in this process for each exported checkpoint, and the job for the
    clean interpreter (the same `data` input, image and question)."""
    image = Image.open(IMAGE).convert("RGB")
    results = {}
    for name, path in exported.items():
        model = AutoModel.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert type(model) is MiniCPMV
        if name.startswith("base"):
            data = case_data((golden_v2_6_cases if name.endswith("v2_6") else golden_cases)[0])
        else:
            prompt, images = render_chat_prompt(image, [{"role": "user", "content": QUESTION}], tokenizer)
            data = model.prepare_inputs(prompt, images, tokenizer)
        with torch.no_grad():
            logits = model(data=data).logits[0]
        greedy = model.chat(image=image, msgs=[{"role": "user", "content": QUESTION}], tokenizer=tokenizer, **GREEDY)
        torch.save(data, path.parent / f"{name}_data.pt")
        job = {"name": name, "checkpoint": str(path), "data": str(path.parent / f"{name}_data.pt")}
        results[name] = {"logits": logits, "greedy": greedy, "job": dict(job, image=str(IMAGE), question=QUESTION)}
    return results


@pytest.fixture(scope="module")
def loaded_elsewhere(expected, tmp_path_factory) -> dict:
    """tests/load_without_finetune.py run on both checkpoints in `python -I` from a directory outside the
    repository, without PYTHONPATH, with its own module cache."""
    workdir = tmp_path_factory.mktemp("elsewhere")
    script = shutil.copy(TESTS / "load_without_finetune.py", workdir / "load.py")
    jobs = workdir / "jobs.json"
    jobs.write_text(
        json.dumps(
            [
                dict(result["job"], greedy=GREEDY, resave=str(workdir / f"{name}_resaved"))
                for name, result in expected.items()
            ]
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"))
    run = subprocess.run(
        [sys.executable, "-I", str(script), str(jobs), str(workdir / "results.pt")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(workdir / "results.pt", weights_only=True)


@pytest.mark.parametrize("suffix", ["", "_v2_6"])
def test_exports_carry_the_code_files_and_the_published_layout(exported, golden_dir, tiny_adapter, golden_v2_6_dir,
                                                               tiny_adapter_v2_6, suffix):  # fmt: skip
    merged, base = exported[f"merged{suffix}"], exported[f"base{suffix}"]
    golden_dir, tiny_adapter = (golden_v2_6_dir, tiny_adapter_v2_6) if suffix else (golden_dir, tiny_adapter)
    for directory in (merged, base):
        assert ENTRY_FILES <= {p.name for p in directory.glob("*.py")}
        assert json.loads((directory / "config.json").read_text())["auto_map"] == {
            "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
            "AutoModel": "modeling_minicpmv.MiniCPMV",
            "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
        }
        assert json.loads((directory / "tokenizer_config.json").read_text())["auto_map"] == {
            "AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]
        }
    assert (merged / "model.safetensors.index.json").is_file()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):  # base unchanged
        assert (base / name).read_bytes() == (golden_dir / name).read_bytes(), name
    assert (merged / "tokenizer_config.json").read_bytes() == (tiny_adapter / "tokenizer_config.json").read_bytes()


def test_the_checkpoints_load_without_the_project(loaded_elsewhere):
    assert loaded_elsewhere["finetune_modules"] == []
    for name in NAMES:
        classes = loaded_elsewhere[name]["classes"]  # the published module and class names, from the checkpoint
        assert [c.split(".", 1)[0] for c in classes] == ["transformers_modules"] * 3, classes
        assert [".".join(c.split(".")[-2:]) for c in classes] == [
            "modeling_minicpmv.MiniCPMV",
            "configuration_minicpm.MiniCPMVConfig",
            "tokenization_minicpmv_fast.MiniCPMVTokenizerFast",
        ]


@pytest.mark.parametrize("name", NAMES)
def test_saved_again_by_transformers_it_keeps_the_published_names_and_the_logits(loaded_elsewhere, name):
    config_map, tokenizer_map = loaded_elsewhere[name]["resaved_auto_maps"]
    assert config_map["AutoConfig"] == "configuration_minicpm.MiniCPMVConfig"
    assert config_map["AutoModel"] == "modeling_minicpmv.MiniCPMV"
    # (transformers 5 files a fast class in the second slot; the published file has it in the first.)
    assert "tokenization_minicpmv_fast.MiniCPMVTokenizerFast" in tokenizer_map["AutoTokenizer"]
    torch.testing.assert_close(loaded_elsewhere[name]["resaved_logits"], loaded_elsewhere[name]["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_chat_equal_the_projects(loaded_elsewhere, expected, name):
    torch.testing.assert_close(loaded_elsewhere[name]["logits"], expected[name]["logits"])
    assert expected[name]["greedy"] and loaded_elsewhere[name]["greedy"] == expected[name]["greedy"]


def test_the_exported_golden_base_reproduces_the_published_logits(loaded_elsewhere, golden_cases, golden_v2_6_cases):
    torch.testing.assert_close(loaded_elsewhere["base"]["logits"], golden_cases[0]["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        loaded_elsewhere["base_v2_6"]["logits"], golden_v2_6_cases[0]["logits"], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_published_chat_snippet_runs(loaded_elsewhere, name):
    answers = loaded_elsewhere[name]["snippet"]  # sampled, beam search, and stream=True pieces joined
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)


# --- export's command line ------------------------------------------------------------------------------------------


def test_export_refuses_a_missing_model_and_an_occupied_output_in_one_line(golden_dir, tmp_path, capsys):
    assert export.cli(["--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--model" in error and "nothing" in error
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert export.cli(["--model", str(golden_dir), "--output", str(occupied)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--output" in error and "--overwrite" in error
    assert (occupied / "notes.txt").read_text() == "mine" and not list(tmp_path.glob("*.tmp-*"))
