"""Fold a LoRA adapter (and its trained resampler / vision tower) into a full MiniCPM-V checkpoint (2.5 or 2.6).

    python -m finetune.merge --base openbmb/MiniCPM-Llama3-V-2_5 --adapter output/output__lora --out merged \\
        [--dtype bf16|fp16|fp32] [--max_shard_size 5GB] [--device cpu|cuda] [--overwrite]

The output is in the PUBLISHED layout: `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`
(tensor names as the hub's checkpoint: `llm.*`, `vpm.*`, `resampler.*`), config.json written by the model's
save_pretrained (model_type minicpmv, rope_theta at top level, the hub's auto_map), and the tokenizer,
preprocessor and generation files copied byte for byte from the adapter directory (the trainer copied them from
the base there) or else from the base, and the project's model code as the checkpoint's own remote code
(finetune.self_contained). Load it with `AutoModel.from_pretrained(out, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(out, trust_remote_code=True)` anywhere transformers 5 is installed, this project
not needed; or with `AutoModel.from_pretrained(out)` after `import finetune` (the native class).

Order of work, so that a mistake costs nothing:
1. check the base directory (headers only) and the adapter against it: every target module exists, every
   adapter tensor maps to a base module of matching shape -- an adapter of another base is refused here,
   naming the tensor, before any weight is loaded or any file written; then the base's identity that training
   recorded beside the adapter (finetune.base_identity: sampled weight values, tokenizer vocabulary) against
   this base -- another base of the same shapes is refused too, naming both directories and what differs (an
   adapter without the record is merged with a notice); and an adapter whose tokenizer.json has another
   vocabulary than the base's is refused, as its files would be copied over the base's;
2. load the base ONCE in the target dtype, apply the adapter (PeftModel), merge_and_unload (no second copy);
3. write everything into `OUT.tmp-<pid>`, check it, and rename it to OUT only at the end. An interrupted run
   leaves at most the `.tmp-<pid>` (and, replacing an old OUT, `.old-<pid>`) directory, never a directory named
   OUT that looks complete; the next merge into OUT removes those of a process that has ended.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune import trainer
from finetune.base_identity import FORMAT, IDENTITY_FILE, compare, fingerprint, read_identity, vocabulary_fingerprint
from finetune.cli import ArgumentParser
from finetune.model.checkpoint import CheckpointError, validate_checkpoint_dir
from finetune.model.loading import DTYPES, looks_like_hub_id
from finetune.model.modeling import MiniCPMV
from finetune.model.tokenization import MiniCPMVTokenizerFast
from finetune.self_contained import ModelCodeError, make_self_contained
from finetune.trainer import PASSTHROUGH_FILES  # files inference needs beside the weights, copied verbatim

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class MergeError(ValueError):
    """The merge cannot be done faithfully (missing files, an adapter of another base, an existing output)."""


@dataclass
class AdapterCheck:
    """What was verified about an adapter: the LoRA-wrapped modules and the fully saved tensors."""

    lora_modules: list[str]
    saved_tensors: list[str]


# --- checks (headers only: no weights loaded) --------------------------------------------------------------------


def resolve_base(base: str, flag: str = "--base") -> Path:
    """A local checkpoint directory, or a hub id resolved through the local cache / a download; errors name `flag`."""
    path = Path(base)
    if path.is_dir():
        return path
    if not looks_like_hub_id(base):
        raise MergeError(f"{flag} {base}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base))
    except Exception as error:  # offline, unknown id, ...
        raise MergeError(f"{flag} {base}: not a local directory and not downloadable ({error})") from error


def _linear_shapes(base_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of every 2-D weight (the candidates for LoRA)."""
    return {
        name[: -len(".weight")]: shape
        for name, shape in base_shapes.items()
        if name.endswith(".weight") and len(shape) == 2
    }


def _target_matches(target_modules, module: str) -> bool:
    """PEFT's rule: a string is a regex that must fullmatch; a list matches by exact name or dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def check_adapter(base_dir: str | Path, adapter_dir: str | Path) -> AdapterCheck:
    """Raise MergeError unless the adapter in `adapter_dir` was trained on the base in `base_dir`.

    Reads only adapter_config.json and the safetensors headers of both. Checks: a LoRA adapter; its
    target_modules match at least one linear module of the base (each entry, for a list); every
    `<module>.lora_A.weight` has in_features (and every lora_B out_features) of that base module, with
    matching ranks; every other tensor (modules_to_save: resampler, vpm, ...) exists in the base with the same
    shape; every modules_to_save entry names a module of the base.
    """
    from safetensors import safe_open

    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise MergeError(f"--adapter {adapter_dir}: no such directory")
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise MergeError(f"{config_path}: missing: not a PEFT adapter directory (the training output_dir)")
    if not weights_path.is_file():
        bin_hint = (
            " (adapter_model.bin is not supported: re-save with safetensors)"
            if (adapter_dir / "adapter_model.bin").is_file()
            else ""
        )
        raise MergeError(f"{weights_path}: missing{bin_hint}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise MergeError(f"{config_path}: not valid JSON ({error})") from error
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be merged")

    try:
        base = {name: shape for name, (shape, _) in validate_checkpoint_dir(base_dir, MiniCPMV).items()}
    except CheckpointError as error:
        raise MergeError(f"--base: {error}") from error
    linears = _linear_shapes(base)
    modules = {name.rsplit(".", 1)[0] for name in base} | set(linears)
    # every prefix is a module too (resampler, vpm, llm.model.layers.0, ...)
    modules |= {".".join(m.split(".")[:k]) for m in list(modules) for k in range(1, m.count(".") + 1)}

    targets = config.get("target_modules")
    if not targets:
        raise MergeError(f"{config_path}: no target_modules")
    if isinstance(targets, str):
        if not any(_target_matches(targets, m) for m in linears):
            raise MergeError(
                f"{config_path}: target_modules {targets!r} matches no linear module of the base {base_dir}"
            )
    else:
        for target in targets:
            if not any(_target_matches([target], m) for m in linears):
                raise MergeError(f"{config_path}: target module {target!r} does not exist in the base {base_dir}")
    for name in config.get("modules_to_save") or []:
        if not any(m == name or m.endswith("." + name) for m in modules):
            raise MergeError(f"{config_path}: modules_to_save entry {name!r} is not a module of the base {base_dir}")

    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            adapter = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:
        raise MergeError(f"{weights_path}: unreadable safetensors file ({error})") from error
    if not adapter:
        raise MergeError(f"{weights_path}: holds no tensors")

    lora_modules, saved, ranks = set(), [], {}
    for key, shape in sorted(adapter.items()):
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        where = f"{weights_path.name}: tensor {key} {list(shape)}"
        match = re.match(r"^(.*)\.(lora_[A-Za-z_]+?)(?:\.weight)?$", name)
        if match:
            module, kind = match.groups()
            if module not in linears:
                raise MergeError(f"{where}: the base {base_dir} has no linear module {module}")
            out_features, in_features = linears[module]
            if kind == "lora_A":
                if len(shape) != 2 or shape[1] != in_features:
                    raise MergeError(
                        f"{where}: LoRA A needs in_features {in_features} of the base's {module} {[out_features, in_features]}"
                    )
                ranks.setdefault(module, {})["A"] = shape[0]
            elif kind == "lora_B":
                if len(shape) != 2 or shape[0] != out_features:
                    raise MergeError(
                        f"{where}: LoRA B needs out_features {out_features} of the base's {module} {[out_features, in_features]}"
                    )
                ranks.setdefault(module, {})["B"] = shape[1]
            elif kind == "lora_magnitude_vector" and shape[-1] != out_features:  # DoRA
                raise MergeError(f"{where}: DoRA magnitude needs {out_features} entries for the base's {module}")
            lora_modules.add(module)
            continue
        if name not in base:
            raise MergeError(f"{where}: the base {base_dir} has no tensor {name}")
        if base[name] != shape:
            raise MergeError(f"{where}: the base's {name} has shape {list(base[name])}")
        saved.append(name)
    for module, rank in ranks.items():
        if rank.get("A") != rank.get("B"):
            raise MergeError(
                f"{weights_path.name}: {module}: lora_A rank {rank.get('A')} != lora_B rank {rank.get('B')} (or one is missing)"
            )
    return AdapterCheck(sorted(lora_modules), saved)


def check_base_identity(base_dir: Path, adapter_dir: Path) -> None:
    """Raise MergeError unless the base identity training recorded in the adapter (IDENTITY_FILE) is that of
    `base_dir`: the same tensor names and shapes, the same sampled weight values (within bf16 rounding, so a copy
    of the base in another dtype passes) and the same tokenizer vocabulary. Without a record (an adapter of an
    older version or another tool), or with one of another format, prints a one-line notice and returns."""
    try:
        recorded = read_identity(adapter_dir)
    except ValueError as error:
        raise MergeError(str(error)) from error
    unverified = "its base could not be verified beyond tensor shapes"
    if recorded is None:
        notice(
            f"--adapter {adapter_dir} has no {IDENTITY_FILE} (saved by an older version or another tool): {unverified}"
        )
        return
    if recorded.get("format") != FORMAT:
        notice(
            f"{adapter_dir / IDENTITY_FILE}: format {recorded.get('format')!r}, this version reads {FORMAT}: {unverified}"
        )
        return
    try:
        actual = fingerprint(base_dir)
    except ValueError as error:  # an unreadable tokenizer.json (the weights were read by check_adapter already)
        raise MergeError(f"--base: {error}") from error
    try:
        reason = compare(recorded, actual)
    except (KeyError, TypeError, AttributeError) as error:
        raise MergeError(
            f"{adapter_dir / IDENTITY_FILE}: malformed record ({type(error).__name__}: {error})"
        ) from error
    if reason:
        recorded_base = recorded.get("base")
        named = f" (it records its base as {recorded_base})" if recorded_base and recorded_base != str(base_dir) else ""
        raise MergeError(f"--adapter {adapter_dir} was not trained on --base {base_dir}: {reason}{named}")


def check_tokenizer_files(base_dir: Path, adapter_dir: Path) -> None:
    """Raise MergeError when the adapter's tokenizer.json has another vocabulary than the base's: the adapter's
    copy would be copied over the base's, and the merged model would then map text to ids its embeddings were
    not trained for. Checked with or without an identity record."""
    try:
        adapter_vocabulary, base_vocabulary = vocabulary_fingerprint(adapter_dir), vocabulary_fingerprint(base_dir)
    except ValueError as error:
        raise MergeError(str(error)) from error
    if adapter_vocabulary and base_vocabulary and adapter_vocabulary != base_vocabulary:
        raise MergeError(
            f"{adapter_dir / 'tokenizer.json'}: another vocabulary than --base {base_dir}'s ({adapter_vocabulary['tokens']} "
            f"against {base_vocabulary['tokens']} tokens): not copying it over the base's"
        )


def notice(message: str) -> None:
    """A one-line notice on stderr: the merge goes on."""
    print(f"finetune.merge: notice: {message}", file=sys.stderr)


def prepare_output(
    out: str | Path, overwrite: bool, inputs: dict[str, Path], out_flag: str = "--out", what: str = "merge"
) -> Path:
    """Refuse an OUT whose replacement would destroy what was not a merge's (or export's) output; returns the
    temporary directory to write into. `inputs` are the directories read, by their flags.

    Refused: a file; an input directory itself (the base, the adapter), or a directory containing one (paths
    compared resolved, so `a/../adapter` and links count); with --overwrite also a directory inside one (it would
    replace part of it: a checkpoint-N, say); an existing non-empty directory without --overwrite; and with
    --overwrite one that does not look like a model (config.json and *.safetensors), whose files are not ours to
    delete. A new or empty directory inside the adapter directory is fine without --overwrite.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out_flag} {out}: exists and is not a directory")
    resolved = out.resolve()
    for flag, protected in inputs.items():
        protected_resolved = Path(protected).resolve()
        if resolved == protected_resolved:
            raise MergeError(
                f"{out_flag} {out} is the {flag} directory: the {what} would replace it; choose another {out_flag}"
            )
        if protected_resolved.is_relative_to(resolved):
            raise MergeError(
                f"{out_flag} {out} contains the {flag} directory {protected}: the {what} would replace it; choose another {out_flag}"
            )
        if overwrite and resolved.is_relative_to(protected_resolved):
            raise MergeError(
                f"{out_flag} {out} is inside the {flag} directory {protected}: --overwrite would replace part of it; choose another {out_flag}"
            )
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MergeError(f"{out_flag} {out}: exists and is not empty (pass --overwrite to replace it)")
        missing = [
            name
            for name, found in (
                ("config.json", (out / "config.json").is_file()),
                ("*.safetensors", any(out.glob("*.safetensors"))),
            )
            if not found
        ]
        if missing:
            raise MergeError(
                f"{out_flag} {out}: exists and does not look like a model (no {', no '.join(missing)}): not deleting it, even with --overwrite"
            )
    return out.with_name(f"{out.name}.tmp-{os.getpid()}")


def remove_leftovers(out: Path) -> None:
    """Remove the `OUT.tmp-<pid>` / `OUT.old-<pid>` directories that an interrupted merge (or export) into OUT left
    beside it, each with a one-line notice, when their process has ended; one whose process still runs (a merge in
    progress) is left alone and reported. This process's own are leftovers too: its merges never overlap."""
    pattern = re.compile(rf"{re.escape(out.name)}\.(?:tmp|old)-(\d+)")
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or path.is_symlink() or not path.is_dir() or int(match.group(1)) <= 0:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _process_running(pid):
            notice(
                f"{path}: left alone, process {pid} that wrote it is still running (a merge into {out} in progress? if not, delete it)"
            )
            continue
        try:
            shutil.rmtree(path)
        except OSError as error:
            notice(f"could not remove {path}, left by an interrupted merge: {error}")
            continue
        notice(f"removed {path}, left by an interrupted merge (process {pid} has ended)")


def _process_running(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without signalling; another user's process
    answers PermissionError)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def copy_passthrough_files(adapter_dir: Path, base_dir: Path, out: Path) -> list[str]:
    """Tokenizer / preprocessor / generation files, byte for byte; the adapter's copy wins over the base's (it is
    copied second)."""
    copied = set(trainer.copy_passthrough_files(base_dir, out)) | set(trainer.copy_passthrough_files(adapter_dir, out))
    missing = {"tokenizer.json", "tokenizer_config.json"} - copied
    if missing:
        raise MergeError(
            f"no {', '.join(sorted(missing))} in {adapter_dir} or {base_dir}: the merged model would have no tokenizer"
        )
    return [name for name in PASSTHROUGH_FILES if name in copied]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_normal_modes(directory: Path) -> None:
    """The modes a plain open() / mkdir would give (0666 / 0777 less the umask): the weights are written through
    temporary files, which are 0600, and copies keep their source's mode; a merged model is shared like any file."""
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _finish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to OUT (replacing an old OUT only now, when all is written)."""
    if out.is_dir():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


# --- the merge ------------------------------------------------------------------------------------------------------


def merge(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Check, merge, write atomically. Returns the output directory. Raises MergeError before loading any weights
    or writing anything when the adapter does not fit the base (shapes, recorded identity, tokenizer vocabulary)
    or OUT is in the way."""
    from peft import PeftModel
    from transformers import AutoModel

    import finetune  # noqa: F401  (registers the native model with the Auto classes)

    if dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    base_dir, adapter_dir, out = resolve_base(str(base)), Path(adapter), Path(out)
    check_adapter(base_dir, adapter_dir)
    check_base_identity(base_dir, adapter_dir)
    check_tokenizer_files(base_dir, adapter_dir)
    tmp = prepare_output(out, overwrite, {"--base": base_dir, "--adapter": adapter_dir})
    remove_leftovers(out)

    model = AutoModel.from_pretrained(base_dir, dtype=DTYPES[dtype], device_map=device if device != "cpu" else None)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    model = model.merge_and_unload(progressbar=False, safe_merge=True)
    model.config.use_cache = False

    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if (tmp / "model.safetensors").is_file():  # one shard: still the published sharded layout
            _single_to_index(tmp)
        copy_passthrough_files(adapter_dir, base_dir, tmp)
        make_self_contained(tmp, type(model.config), type(model), MiniCPMVTokenizerFast)
        validate_checkpoint_dir(tmp, MiniCPMV)
        _give_normal_modes(tmp)
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _single_to_index(directory: Path) -> None:
    """model.safetensors -> model-00001-of-00001.safetensors + index (what the hub's loaders expect to find)."""
    from safetensors import safe_open

    single = directory / "model.safetensors"
    with safe_open(str(single), framework="pt") as handle:
        names = list(handle.keys())
        total = sum(_nbytes(handle, n) for n in names)
    shard = "model-00001-of-00001.safetensors"
    single.rename(directory / shard)
    index = {"metadata": {"total_size": total}, "weight_map": {n: shard for n in sorted(names)}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _nbytes(handle, name: str) -> int:
    sl = handle.get_slice(name)
    size = 1
    for dim in sl.get_shape():
        size *= dim
    return size * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "I8": 1}.get(
        sl.get_dtype(), 4
    )


# --- command line ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m finetune.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base checkpoint directory (or hub id)")
    parser.add_argument("--adapter", required=True, help="LoRA adapter directory (the training output_dir)")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument(
        "--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the merged weights (default bf16)"
    )
    parser.add_argument("--max_shard_size", default="5GB", help="shard size, e.g. 5GB (default) or 500MB")
    parser.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return parser


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = merge(args.base, args.adapter, args.out, args.dtype, args.max_shard_size, args.device, args.overwrite)
    except (MergeError, CheckpointError, ModelCodeError) as error:
        print(f"finetune.merge: error: {error}", file=sys.stderr)
        return 2
    print(f"[merge] merged model written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
