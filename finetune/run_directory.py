"""A training run's output directory: which checkpoint a resume continues from, whether its files are complete and
safe to load, and whether the directory already belongs to another run.

Everything here reads file names, JSON and pickle opcodes (through torch's weights-only unpickler, storages memory-
mapped, never read): it runs before the model is loaded, so that a mistake costs seconds, not a model load.

- Resume. `--resume_from_checkpoint true` (or `latest`) takes the newest *complete* `checkpoint-N` of the output
  directory; a path takes that checkpoint, which must be complete. Complete means: `trainer_state.json` readable
  (the library writes it after the weights, optimizer and RNG states), no empty file, the weights' headers readable,
  and the optimizer state of the kind this run restores: DeepSpeed's `global_step*/` shards, one per rank of this
  run, or `optimizer.pt` + `scheduler.pt` without DeepSpeed.
- Safety. DeepSpeed loads its checkpoint files with `torch.load(weights_only=False)`, which runs whatever code a
  pickle names. Every pickle a resume loads is first unpickled here with the weights-only unpickler and an explicit
  list of the classes DeepSpeed and the Trainer store (RESUME_SAFE_GLOBALS); a file that names anything else is
  refused before any library opens it.
- Ownership. A directory that holds another run's checkpoints or final weights is refused, unless the run resumes
  or `--overwrite_output_dir true` asks to replace that run (its checkpoints, logs and final files are removed;
  files a run does not write are left alone).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from finetune.arguments import TrainingArguments, UsageError

logger = logging.getLogger("finetune")

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# Files and folders a training run writes at the top of its output directory (the library's, PEFT's, ours).
RUN_FILES = (
    "adapter_model.safetensors", "adapter_config.json", "model.safetensors", "model.safetensors.index.json", "config.json",
    "trainer_state.json", "training_args.bin", "train_results.json", "eval_results.json", "all_results.json",
    "run_summary.txt", "loss.png", "base_model_identity.json",
)  # fmt: skip
RUN_FOLDERS = ("runs",)
# Pickles a resume never loads: the Trainer writes its arguments but does not read them back.
NOT_LOADED_ON_RESUME = ("training_args.bin",)
RESUME_KEYWORDS = ("true", "latest")


class RunDirectoryError(UsageError):
    """The output directory or the checkpoint to resume cannot be used as asked; the message is one line."""


# --- the classes a checkpoint may hold -----------------------------------------------------------------------------


def resume_safe_globals() -> list:
    """The non-tensor classes that DeepSpeed's and the Trainer's checkpoint pickles hold, and nothing else: numpy
    arrays of the RNG states, DeepSpeed's loss scaler (plain numbers), ZeRO's stage enum and the fragment addresses of
    its bf16 optimizer. None of them runs code when unpickled (no __reduce__ of their own, no __setstate__)."""
    import numpy as np

    numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it
    allowed: list = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # without DeepSpeed no checkpoint of it can be resumed either
        return allowed
    return allowed + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_pickle_is_data(path: Path, allowed: list) -> None:
    """Unpickle `path` as torch's weights-only loader does, with `allowed` as the only classes besides tensors and
    containers; its storages are memory-mapped, not read. Raise RunDirectoryError naming the file and what it holds
    that is not data."""
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # UnpicklingError for a foreign global, RuntimeError for a broken or truncated file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        reason = f"it names {named.group(1)}, which no checkpoint holds" if named else first_line
        raise RunDirectoryError(
            f"{path}: refused to load ({reason}); it is not a checkpoint this suite wrote, or was altered"
        ) from error


# --- completeness -----------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def incomplete_reason(checkpoint: Path, deepspeed: bool, world_size: int) -> str | None:
    """Why `checkpoint` cannot be resumed by a run with this DeepSpeed setting and number of processes; None when
    it can (its pickles are checked separately, by check_resume_is_safe). A checkpoint whose files vanish while
    they are read (another rank removing a crash's leftovers) is incomplete, not an error."""
    try:
        return _incomplete_reason(checkpoint, deepspeed, world_size)
    except OSError as error:
        return f"unreadable ({error})"


def _incomplete_reason(checkpoint: Path, deepspeed: bool, world_size: int) -> str | None:
    if not checkpoint.is_dir():
        return "no such directory"
    state = checkpoint / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (written last: the save was interrupted)"
    try:
        if not isinstance(json.loads(state.read_text()).get("global_step"), int):
            return f"{TRAINER_STATE} has no global_step"
    except (ValueError, OSError) as error:
        return f"{TRAINER_STATE} unreadable ({error})"
    empty = [
        str(p.relative_to(checkpoint)) for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.stat().st_size == 0
    ]
    if empty:
        return f"empty file {empty[0]}"
    weights = [checkpoint / name for name in WEIGHT_FILES if (checkpoint / name).is_file()]
    for path in weights:
        if path.suffix == ".safetensors" and not _safetensors_header_readable(path):
            return f"{path.name} unreadable"
    saved_by_deepspeed = (checkpoint / "latest").is_file() or any(checkpoint.glob("global_step*"))
    if saved_by_deepspeed != deepspeed:
        saved, now = ("under DeepSpeed", "without") if saved_by_deepspeed else ("without DeepSpeed", "under DeepSpeed")
        return f"saved {saved}; this run is {now} it (resume with the --deepspeed setting it was saved with)"
    if deepspeed:
        return _deepspeed_incomplete_reason(checkpoint, world_size)
    if not weights:
        return f"no weights ({' / '.join(WEIGHT_FILES)})"
    missing = [name for name in ("optimizer.pt", "scheduler.pt") if not (checkpoint / name).is_file()]
    return f"no {missing[0]}" if missing else None


def _deepspeed_incomplete_reason(checkpoint: Path, world_size: int) -> str | None:
    latest = checkpoint / "latest"
    if not latest.is_file():
        return "no 'latest' file naming DeepSpeed's shard folder"
    tag = latest.read_text().strip()
    if not re.fullmatch(r"[\w.-]+", tag) or tag in (".", ".."):
        return f"'latest' names {tag!r}, not a folder of the checkpoint"
    shards = checkpoint / tag
    if not shards.is_dir():
        return f"no folder {tag} ('latest' names it)"
    if not any(shards.glob("*model_states.pt")):
        return f"no model states in {tag}"
    optimizer_shards = len(list(shards.glob("*optim_states.pt")))
    if optimizer_shards != world_size:
        return f"{optimizer_shards} optimizer shards in {tag}, one per process of the saving run; this run has {world_size}"
    return None


def _safetensors_header_readable(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception:
        return False
    return True


def pickles_loaded_on_resume(checkpoint: Path) -> list[Path]:
    """The checkpoint's pickles that the Trainer or DeepSpeed load when resuming (every *.pt, *.pth, *.bin there
    and in its shard folders, except the Trainer's arguments, which it never reads back)."""
    found = [p for suffix in ("*.pt", "*.pth", "*.bin") for p in checkpoint.rglob(suffix)]
    return sorted(p for p in found if p.name not in NOT_LOADED_ON_RESUME)


def check_resume_is_safe(checkpoint: Path) -> None:
    allowed = resume_safe_globals()
    for path in pickles_loaded_on_resume(checkpoint):
        check_pickle_is_data(path, allowed)


# --- which checkpoint -------------------------------------------------------------------------------------------------


def checkpoints_newest_first(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def resolve_resume_checkpoint(requested: str | None, output_dir: Path, deepspeed: bool, world_size: int) -> Path | None:
    """The checkpoint to resume from, complete and safe, or None when the run starts afresh.

    `requested`: None (start afresh), true / latest (the newest complete checkpoint of `output_dir`; older
    incomplete ones are logged and passed over), or a path (absolute, relative to the working directory, or a
    checkpoint-N name inside `output_dir`)."""
    if requested is None or requested.strip().lower() in ("", "false", "none"):
        return None
    if requested.strip().lower() in RESUME_KEYWORDS and not Path(requested).is_dir():
        passed_over = []
        for checkpoint in checkpoints_newest_first(output_dir):
            reason = incomplete_reason(checkpoint, deepspeed, world_size)
            if reason is None:
                for name, why in passed_over:
                    logger.warning(f"resume: passing over {name}: {why}")
                check_resume_is_safe(checkpoint)
                return checkpoint
            passed_over.append((checkpoint.name, reason))
        found = "; ".join(f"{name}: {why}" for name, why in passed_over) or "none saved yet"
        raise RunDirectoryError(
            f"--resume_from_checkpoint {requested}: no complete checkpoint in {output_dir} ({found})"
        )
    checkpoint = Path(requested)
    if not checkpoint.is_dir() and (output_dir / requested).is_dir():
        checkpoint = output_dir / requested
    reason = incomplete_reason(checkpoint, deepspeed, world_size)
    if reason is not None:
        raise RunDirectoryError(f"--resume_from_checkpoint {requested}: cannot resume: {reason}")
    check_resume_is_safe(checkpoint)
    return checkpoint


# --- whose directory ------------------------------------------------------------------------------------------------


def previous_run_artefacts(output_dir: Path) -> list[Path]:
    """What a training run left in `output_dir`: its checkpoints, logs and final files (nothing else)."""
    if not output_dir.is_dir():
        return []
    names = set(RUN_FILES) | set(RUN_FOLDERS)
    return sorted(p for p in output_dir.iterdir() if p.name in names or (p.is_dir() and checkpoint_step(p) is not None))


def holds_another_run(output_dir: Path) -> bool:
    """Checkpoints or final weights: what a second run would overwrite or prune (logs alone are no run to keep)."""
    return any(p.name not in RUN_FOLDERS for p in previous_run_artefacts(output_dir))


def check_writable(output_dir: Path) -> None:
    """RunDirectoryError unless the run could create `output_dir` and write in it. Checked by making (and removing)
    a probe folder in it or in its nearest existing parent: nothing is left behind, so a run stopped later by a
    bad sample has written nothing."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirectoryError(f"--output_dir {output_dir}: exists and is not a directory")
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirectoryError(f"--output_dir {output_dir}: cannot write there ({existing} is not a directory)")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-probe-"))
    except OSError as error:
        raise RunDirectoryError(f"--output_dir {output_dir}: cannot write there ({error.strerror or error})") from error


def prepare_output_dir(output_dir: Path, resuming: bool, overwrite: bool, is_saving_process: bool) -> None:
    """Refuse an output directory holding another run unless this run resumes or overwrites it; on overwrite the
    saving process removes that run's artefacts. Then check the directory can be written."""
    if not resuming and holds_another_run(output_dir):
        if not overwrite:
            raise RunDirectoryError(
                f"--output_dir {output_dir} holds another run (checkpoints or a trained adapter); resume it with "
                "--resume_from_checkpoint true, pass --overwrite_output_dir true to replace it, or choose another directory"
            )
        if is_saving_process:
            for path in previous_run_artefacts(output_dir):
                logger.warning(f"--overwrite_output_dir: removing the previous run's {path}")
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    check_writable(output_dir)


def remove_incomplete_checkpoints_after(
    output_dir: Path, resumed: Path, deepspeed: bool, world_size: int
) -> list[Path]:
    """Incomplete checkpoints of `output_dir` newer than the one resumed: a crash's leftovers, whose steps the resumed
    run saves again. Removed, so that neither the library's pruning nor a later resume takes them for this run's.
    Complete newer ones (the user chose an older checkpoint) are left, with a warning: the run overwrites each when
    it reaches its step."""
    step = checkpoint_step(resumed)
    if step is None or resumed.parent.resolve() != output_dir.resolve():
        return []
    removed = []
    for path in checkpoints_newest_first(output_dir):
        if checkpoint_step(path) <= step:
            break
        if incomplete_reason(path, deepspeed, world_size) is None:
            logger.warning(f"resume: {path} is newer than {resumed.name}; this run overwrites it at its step")
            continue
        logger.warning(f"resume: removing {path}: newer than {resumed.name} and incomplete")
        shutil.rmtree(path)
        removed.append(path)
    return removed


def prepare_run_directory(training_args: TrainingArguments) -> Path | None:
    """The checkpoint to resume (complete, and safe to unpickle), or None; and an output directory this run may
    write: not another run's unless resuming or overwriting it, writable. Before any model memory is touched."""
    output_dir, deepspeed = Path(training_args.output_dir), bool(training_args.deepspeed)
    resume = resolve_resume_checkpoint(
        training_args.resume_from_checkpoint, output_dir, deepspeed, training_args.world_size
    )
    prepare_output_dir(output_dir, resume is not None, training_args.overwrite_output_dir, training_args.should_save)
    if resume is not None and training_args.should_save:
        remove_incomplete_checkpoints_after(output_dir, resume, deepspeed, training_args.world_size)
    if resume is not None and training_args.process_index == 0:
        print(f"[resume] resuming from {resume}", flush=True)
    return resume
