"""The project's model code written into a checkpoint as its own remote code, so that plain transformers loads it.

A checkpoint directory with these files loads with `AutoModel.from_pretrained(path, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(path, trust_remote_code=True)` where this project is not installed: the hub's
convention for models transformers does not implement, under the published file and class names.

What transformers 5 does with a checkpoint's code (`transformers.dynamic_module_utils`), and so what is written:
- it imports the files named by config.json's `auto_map` (`configuration_minicpm.MiniCPMVConfig`,
  `modeling_minicpmv.MiniCPMV`) and tokenizer_config.json's (`tokenization_minicpmv_fast.MiniCPMVTokenizerFast`):
  those three are short entry files re-exporting the project's classes under those names;
- it copies along every file a code file imports relatively, found by a regex over the text that only knows
  `from .name import ...` for a file `name.py` in the same folder: so finetune.model (a package with a
  subpackage, importing itself as `from ..configuration import ...` or `from finetune.model.x import ...`) is
  written as flat files, one per module (`versions/minicpm_llama3_v2_5.py` -> `versions_minicpm_llama3_v2_5.py`,
  a package's `__init__` -> the package's name), its imports rewritten to `from .<flat name> import ...`;
- it refuses the code unless every absolute import outside a `try` block names an installed package: imports
  inside a function (liger-kernel and the like, optional extras imported where they are used) are wrapped in a
  `try` that re-raises, the same statement with the same error when the package is missing.

The flat files are generated from the package's source at export time (`flatten_source`, with `ast` finding the
imports; every other line is kept as it is), so a checkpoint always carries the code that wrote it. Only the
modules the three classes need are written (every version module is among them: `versions` lists them all).
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_imports

from finetune.model.configuration import PUBLISHED_AUTO_MAP

MODEL_PACKAGE = "finetune.model"
# tokenizer_config.json's published auto_map entry: (slow class, fast class); the slow slot names the fast class.
TOKENIZER_AUTO_MAP = ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]
ENTRY_FILE_NOTE = (
    "Written by the MiniCPM-V fine-tuning suite (finetune.merge / finetune.export) from its {package} package: the\n"
    "other .py files of this folder are that package's modules as flat files (a subpackage's module is\n"
    "`<subpackage>_<module>.py`), so that transformers loads them as this checkpoint's remote code."
)
OPTIONAL_IMPORT_NOTE = "# optional: transformers' import check passes over imports inside a try"


class ModelCodeError(ValueError):
    """The model package cannot be written as flat remote-code files (an import that has no flat form)."""


def flat_module_name(module: str, package: str = MODEL_PACKAGE) -> str:
    """The flat file stem of a module of `package`: 'pkg.versions.v9' -> 'versions_v9', 'pkg' -> 'pkg'."""
    if module == package:
        return package.rsplit(".", 1)[-1]
    if not module.startswith(package + "."):
        raise ModelCodeError(f"{module} is not a module of {package}")
    return module[len(package) + 1 :].replace(".", "_")


def _absolute_target(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` statement in `module` reads from (Python's resolution of dots)."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(parts):
        raise ModelCodeError(f"{module} line {node.lineno}: relative import beyond the top-level package")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports(node: ast.AST, in_function: bool = False, in_try: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement under `node`, with whether it is optional: inside a function and not in a try."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function and not in_try
            continue
        yield from _imports(
            child,
            in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)),
            in_try or isinstance(child, (ast.Try, ast.TryStar)),
        )


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _alias(alias: ast.alias) -> str:
    return alias.name + (f" as {alias.asname}" if alias.asname else "")


def flatten_source(
    source: str, module: str, is_package: bool, package: str = MODEL_PACKAGE, foreign: tuple[str, ...] = ("finetune",)
) -> tuple[str, set[str]]:
    """One module's source as a flat remote-code file, and the modules of `package` it imports.

    Every import from `package` (relative, or absolute by the package's name) becomes `from .<flat name> import
    <names>` on the statement's first line (a comment after it is kept); an absolute import inside a function that
    is not in a try gets a try / `except ImportError: raise` around it. Every other line is left as it is.
    Refused, naming the line: an import of a module of `foreign` outside `package` (the rest of this project is not
    in the checkpoint), `import <package module>` and `from . import <module>` (no flat form transformers copies
    along), and an import that shares its line with other code.
    """
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []  # (first line, line after the last, replacement), 0-based
    imported: set[str] = set()
    for node, optional in _imports(ast.parse(source)):
        where = f"{module} line {node.lineno}"
        if isinstance(node, ast.ImportFrom):
            target = _absolute_target(node, module, is_package)
            names = [target]
        else:
            target, names = None, [alias.name for alias in node.names]
        inside = [name for name in names if _within(name, package)]
        outside = [name for name in names if any(_within(name, top) for top in foreign) and not _within(name, package)]
        if outside:
            raise ModelCodeError(
                f"{where}: imports {outside[0]}, which is outside {package}: the checkpoint carries only {package}"
            )
        if not inside and not optional:
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        indent, tail = lines[first][: node.col_offset], lines[last][node.end_col_offset :]
        if indent.strip() or (tail.strip() and not tail.strip().startswith("#")):
            raise ModelCodeError(f"{where}: an import to rewrite must stand on its own line")
        if inside:
            statement = ast.get_source_segment(source, node)
            if isinstance(node, ast.Import):
                raise ModelCodeError(f"{where}: `{statement}` has no flat form: write `from .module import name`")
            if node.module is None:
                raise ModelCodeError(
                    f"{where}: `{statement}` has no flat form transformers copies along: write `from .module import name`"
                )
            imported.add(target)
            names_text = ", ".join(_alias(alias) for alias in node.names)
            replacement = f"{indent}from .{flat_module_name(target, package)} import {names_text}{tail}"
        else:
            body = "".join("    " + line if line.strip() else line for line in lines[first : last + 1])
            replacement = (
                f"{indent}try:  {OPTIONAL_IMPORT_NOTE}\n{body}{indent}except ImportError:\n{indent}    raise\n"
            )
        edits.append((first, last + 1, replacement))
    for first, end, replacement in sorted(edits, reverse=True):
        lines[first:end] = [replacement]
    return "".join(lines), imported


def package_modules(package: str = MODEL_PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Every module of `package` and its subpackages: name -> (source file, is a package's __init__)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelCodeError(f"{package} is not an importable package")
    root = Path(next(iter(spec.submodule_search_locations)))
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join((package, *(parts[:-1] if is_package else parts)))
        modules[name] = (path, is_package)
    return modules


def _entry_file(stem: str, class_name: str, cls: type, package: str, model_config: str | None = None) -> str:
    """An auto_map entry file: `class_name`, a subclass of `cls` defined here, so that the class lives in the
    file auto_map names (transformers records `module.class` from the class when it saves a model loaded this way);
    for the model (`model_config`: the config entry 'file.Class'), with that configuration class."""
    lines = [f'"""{stem}.py: auto_map\'s {class_name}.', "", ENTRY_FILE_NOTE.format(package=package), '"""', ""]
    body = [f'    """{cls.__name__} of {cls.__module__}, under the published name."""']
    if model_config is not None:
        config_stem, config_name = model_config.split(".")
        lines.append(f"from .{config_stem} import {config_name}")
        body += ["", f"    config_class = {config_name}"]
    lines += [f"from .{flat_module_name(cls.__module__, package)} import {cls.__name__} as _Implementation", "", ""]
    lines += [f"class {class_name}(_Implementation):", *body, ""]
    return "\n".join(lines)


def flat_model_code(
    config_class: type, model_class: type, tokenizer_class: type, package: str = MODEL_PACKAGE
) -> dict[str, str]:
    """File name -> text of the remote code for these classes: the three auto_map entry files and the flattened
    modules of `package` they import, directly or through each other."""
    modules = package_modules(package)
    entries = {
        PUBLISHED_AUTO_MAP["AutoConfig"]: config_class,
        PUBLISHED_AUTO_MAP["AutoModel"]: model_class,
        TOKENIZER_AUTO_MAP[0]: tokenizer_class,
    }
    for reference, cls in entries.items():
        if cls.__module__ not in modules:
            raise ModelCodeError(
                f"{cls.__name__} (auto_map {reference}) is defined in {cls.__module__}, not in {package}"
            )

    files: dict[str, str] = {}
    pending, done = [cls.__module__ for cls in entries.values()], set()
    while pending:
        module = pending.pop()
        if module in done:
            continue
        done.add(module)
        if module not in modules:
            raise ModelCodeError(f"{module}: imported by the model code but not a module of {package}")
        path, is_package = modules[module]
        text, imported = flatten_source(path.read_text(), module, is_package, package)
        files[f"{flat_module_name(module, package)}.py"] = text
        pending += sorted(imported - done)

    for reference, cls in entries.items():
        stem, class_name = reference.split(".")
        if f"{stem}.py" in files:
            raise ModelCodeError(f"{package} has a module whose flat name is the auto_map file {stem}.py")
        model_config = PUBLISHED_AUTO_MAP["AutoConfig"] if cls is model_class else None
        files[f"{stem}.py"] = _entry_file(stem, class_name, cls, package, model_config)
    return files


def write_model_code(directory: str | Path, config_class: type, model_class: type, tokenizer_class: type) -> list[str]:
    """Write `flat_model_code` into the checkpoint directory; returns the file names. Then reads every file's
    relative imports as transformers will (its own function) and raises ModelCodeError if one names no file
    written here (a docstring line that reads like an import would)."""
    directory = Path(directory)
    files = flat_model_code(config_class, model_class, tokenizer_class)
    for name, text in files.items():
        (directory / name).write_text(text)
    for name in files:
        missing = [f"{stem}.py" for stem in get_relative_imports(directory / name) if f"{stem}.py" not in files]
        if missing:
            raise ModelCodeError(f"{name}: transformers would look for {', '.join(missing)}, which is not written")
    return sorted(files)


def _update_json(path: Path, key: str, entries: dict) -> None:
    """Set `entries` in the JSON file's `key` dict (keeping its other entries); rewrite the file only if that
    changes anything, so a file that already names them stays byte for byte."""
    content = json.loads(path.read_text())
    current = content.get(key)
    updated = dict(current if isinstance(current, dict) else {}, **entries)
    if current != updated:
        content[key] = updated
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def make_self_contained(directory: str | Path, config_class: type, model_class: type, tokenizer_class: type) -> None:
    """Turn a checkpoint directory in the published layout into one that loads without this project: the code
    files, and config.json's / tokenizer_config.json's auto_map entries with the published names (added where
    missing; files that have them are not rewritten)."""
    directory = Path(directory)
    for name in ("config.json", "tokenizer_config.json"):
        if not (directory / name).is_file():
            raise ModelCodeError(f"{directory / name}: missing")
    write_model_code(directory, config_class, model_class, tokenizer_class)
    _update_json(directory / "config.json", "auto_map", PUBLISHED_AUTO_MAP)
    _update_json(directory / "tokenizer_config.json", "auto_map", {"AutoTokenizer": TOKENIZER_AUTO_MAP})
