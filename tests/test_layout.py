"""README's layout section names every module of the package and every top-level folder, so that it matches the tree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from helpers import ROOT


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"^## Layout\n(.*?)^## ", readme, re.S | re.M).group(1)


def tracked(pattern: str) -> list[Path]:
    listing = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return [Path(line) for line in listing.stdout.splitlines()]


def test_readme_layout_names_every_module_of_the_package():
    layout = layout_section()
    modules = [p for p in tracked("finetune") if p.suffix in (".py", ".sh") and p.name != "__init__.py"]
    assert len(modules) > 30
    missing = [str(p) for p in modules if not re.search(rf"(?<![\w.]){re.escape(p.stem)}(\.py|\.sh|\b)", layout)]
    assert not missing, f"README's layout section does not name: {missing}"


def test_readme_layout_names_every_top_level_folder():
    layout = layout_section()
    folders = {p.parts[0] for p in tracked(".") if len(p.parts) > 1 and not p.parts[0].startswith(".")}
    missing = sorted(f for f in folders if f"{f}/" not in layout)
    assert not missing, f"README's layout section does not name: {missing}"
