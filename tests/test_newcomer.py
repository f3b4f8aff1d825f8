"""A newcomer's first hour: the README's commands after `make demo` + activation, the adapter snippet from
finetune/, the repository root and anywhere once installed, and the small rough edges of plan, tune and training."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import ROOT

README = (ROOT / "README.md").read_text()
VENV = Path(sys.executable).parent.parent  # the venv running the tests stands for the Makefile's .venv


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DS_ACCELERATOR")}
    return dict(env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


# --- 1. set-up: the venv holds the tools and the project ------------------------------------------------------------


def test_readme_says_to_activate_the_venv_and_how_to_clean_the_demo():
    setup_part = README.split("## Fine-tuning the real model")[0]
    assert ". .venv/bin/activate" in setup_part  # once, right after the two commands
    assert "make clean-demo" in README
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(VENV)/.installed:")[1].split("\n\n")[0]
    assert "pip install -q --no-deps -e ." in recipe
    assert recipe.index("-r requirements.txt") < recipe.index("-e .")  # the project after its requirements


@pytest.mark.slow
@pytest.mark.skipif(not (VENV / "bin" / "activate").is_file(), reason="tests not run from a venv")
def test_activation_puts_the_venvs_tools_on_path(tmp_path):
    script = (f". {VENV}/bin/activate && cd {tmp_path} && for tool in python torchrun tensorboard; do command -v $tool; done"
              " && python -c 'import transformers, peft' && torchrun --help >/dev/null")  # fmt: skip
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=120, env=clean_env(PATH="/usr/bin:/bin")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(VENV / "bin" / name) for name in ("python", "torchrun", "tensorboard")]


@pytest.mark.slow
@pytest.mark.skipif(not (VENV / "bin" / "activate").is_file(), reason="tests not run from a venv")
def test_installed_project_imports_from_any_directory(tmp_path):
    """What the Makefile does (`pip install --no-deps -e .` after the requirements), in a throwaway venv that sees
    this venv's packages: then `import finetune` and every `python -m finetune.X` of the README work from /tmp."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "transformers").is_dir())
    (site / "_tests_base_venv.pth").write_text(here + "\n")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    commands = sorted(set(re.findall(r"python -m (finetune\.[a-z_]+)", README)))
    assert {"finetune.chat", "finetune.merge", "finetune.plan", "finetune.check_data"} <= set(commands)
    code = "import importlib, finetune; print(finetune.__file__); " + "; ".join(
        f"importlib.import_module({c!r})" for c in commands
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(ROOT / "finetune" / "__init__.py")
    # The commands pyproject.toml declares are installed, and each answers --help from elsewhere: one run as a
    # command, every one through its installed entry point (what its script calls), in one process.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"minicpmv-finetune", "minicpmv-merge", "minicpmv-check-data"} <= set(scripts)
    assert all(os.access(venv / "bin" / name, os.X_OK) for name in scripts)
    command = subprocess.run([str(venv / "bin" / "minicpmv-plan"), "--help"], capture_output=True, text=True,
                             timeout=300, cwd=elsewhere, env=clean_env())  # fmt: skip
    assert command.returncode == 0 and "usage" in command.stdout.lower(), command.stderr[-2000:]
    answer_help = (
        "import contextlib, io, sys\n"
        "from importlib.metadata import entry_points\n"
        "for entry in entry_points(group='console_scripts'):\n"
        "    if not entry.name.startswith('minicpmv-'): continue\n"
        "    sys.argv, out = [entry.name, '--help'], io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        entry.load()()\n"
        "    print(entry.name, entry.value, 'usage' in out.getvalue().lower())\n"
    )
    result = subprocess.run([str(venv / "bin" / "python"), "-c", answer_help], capture_output=True, text=True,
                            timeout=300, cwd=elsewhere, env=clean_env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    answered = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert answered == {name: [target, "True"] for name, target in scripts.items()}


# --- 2. the adapter snippet: from finetune/, the repository root, anywhere once installed ------------------------------


def readme_adapter_snippet(model: Path, adapter: Path, image: Path) -> str:
    """The README's adapter snippet, on the tiny model and adapter, on CPU, with a short answer."""
    (snippet,) = [b for b in readme_blocks("python") if "PeftModel.from_pretrained(base" in b]
    for published, ours in (('"openbmb/MiniCPM-Llama3-V-2_5"', repr(str(model))), ('"output/output__lora"', repr(str(adapter))),
                            ('"example.jpg"', repr(str(image))), (".cuda()", ""), (", tokenizer))", ", tokenizer, max_new_tokens=4))")):  # fmt: skip
        assert published in snippet, published
        snippet = snippet.replace(published, ours)
    return snippet + (
        "\nfrom finetune.check_data import main as check_data_main"
        "\nfrom finetune.model.loading import load_pretrained"
        "\nimport finetune.merge, finetune.chat"
        "\nprint('package:', finetune.__file__)\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize("where", ["finetune", "root", "elsewhere"])
def test_readme_adapter_snippet_runs(where, tiny_model, tiny_adapter, tmp_path):
    from PIL import Image

    image = tmp_path / "example.jpg"
    Image.new("RGB", (56, 56), "red").save(image)
    code = readme_adapter_snippet(tiny_model, tiny_adapter, image)
    cwd = {"finetune": ROOT / "finetune", "root": ROOT, "elsewhere": tmp_path}[where]
    env = clean_env(PYTHONPATH=str(ROOT)) if where == "elsewhere" else clean_env()  # PYTHONPATH: stand-in for installed
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"package: {ROOT / 'finetune' / '__init__.py'}"


@pytest.mark.slow
def test_the_entry_point_still_runs_as_a_script():
    result = subprocess.run([sys.executable, "finetune.py", "--help"], capture_output=True, text=True, timeout=300,
                            cwd=ROOT / "finetune", env=clean_env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--model_name_or_path" in result.stdout


@pytest.mark.slow
def test_no_deepspeed_accelerator_warning_without_a_gpu():
    result = subprocess.run([sys.executable, "-c", "import finetune, deepspeed; from deepspeed.accelerator import get_accelerator; print(get_accelerator()._name)"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=clean_env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    import torch

    if not torch.accelerator.is_available():
        assert result.stdout.strip() == "cpu"
        assert "unable to detect" not in result.stderr


# --- 7. plan and tune flags; training defaults --------------------------------------------------------------------


def test_plan_takes_both_spellings_of_every_option():
    from finetune.plan import build_parser

    parser = build_parser()
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        for option in long:
            assert "--" + option[2:].replace("-", "_") in long and "--" + option[2:].replace("_", "-") in long, option
    assert parser.parse_args(["--gpu_mem", "24"]).gpu_mem == parser.parse_args(["--gpu-mem", "24"]).gpu_mem == 24
    args = parser.parse_args(
        [
            "--gpu_mem",
            "24",
            "--target_global_batch",
            "8",
            "--tune_vision",
            "false",
            "--max_slice_nums",
            "4",
            "--lora_r",
            "8",
        ]
    )
    assert (args.target_global_batch, args.tune_vision, args.max_slice_nums, args.lora_r) == (8, False, 4, 8)


def test_tune_takes_both_spellings_of_every_option():
    pytest.importorskip("optuna")
    from finetune.tune import build_parser

    parser = build_parser()
    base = ["--model", "m", "--data", "d"]
    for dashed, underscored, value in (("--output-dir", "--output_dir", "o"), ("--eval-data", "--eval_data", "e"),
                                       ("--time-budget-s", "--time_budget_s", "5"), ("--max-steps", "--max_steps", "3")):  # fmt: skip
        assert vars(parser.parse_args(base + [dashed, value])) == vars(parser.parse_args(base + [underscored, value]))


def test_plan_asks_for_bitsandbytes_only_when_it_is_missing(monkeypatch):
    from finetune import plan

    def notes(installed: bool) -> list[str]:
        monkeypatch.setattr(plan, "bitsandbytes_installed", lambda: installed)
        for gpu_mem in (16, 20, 24, 32):  # a card small enough that the plan uses the 8-bit states
            result = plan.make_plan(1, gpu_mem)
            if result.fits and result.setup.optim_8bit:
                return result.notes
        pytest.skip("no plan with 8-bit states")

    assert any("pip install bitsandbytes" in n for n in notes(False))
    installed = notes(True)
    assert any("8-bit AdamW" in n for n in installed) and not any("pip install" in n for n in installed)


def test_training_defaults_for_data_loading(tmp_path):
    import torch

    from finetune.arguments import TrainingArguments

    def args(**kwargs):
        return TrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)

    assert args(dataloader_num_workers=2).dataloader_persistent_workers is True
    assert args(dataloader_num_workers=0).dataloader_persistent_workers is False
    assert args(dataloader_num_workers=2, dataloader_persistent_workers=False).dataloader_persistent_workers is False
    if not torch.accelerator.is_available():
        assert args().dataloader_pin_memory is False
    assert args(use_cpu=True).dataloader_pin_memory is False
