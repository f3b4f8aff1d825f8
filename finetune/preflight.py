"""The launcher's quick check of a training command line, in one plain process before torchrun starts any.

`finetune.py --preflight ARGS` (finetune_lora.sh and finetune_ds.sh run it) reads ARGS as training would and
runs every check that needs no model weights, no tokenizer and no process group: unknown flags and invalid values,
the data files' existence, the model directory (config.json and the weights' names and shapes, read from the
files' headers), the flags' combinations, and the output directory (another run's, the checkpoint to resume,
writable). A mistake then ends in seconds with one line, instead of under torchrun's traceback of each worker.
Nothing is created or changed: the output directory is only read (and probed for writing in its nearest existing
folder, the probe removed). The per-sample validation stays in training: it needs the tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.arguments import check_arguments, parse_arguments
from finetune.run_directory import prepare_output_dir, resolve_resume_checkpoint

WORLD_SIZE_ENV = (
    "FINETUNE_WORLD_SIZE"  # the launcher's processes in all (nodes x per node): DeepSpeed's shards per checkpoint
)


def preflight(argv: list[str]) -> None:
    """Raise UsageError (one line) when training with ARGV would stop before loading the model."""
    model_args, data_args, training_args, lora_args = parse_arguments(list(argv))
    check_arguments(model_args, data_args, training_args, lora_args)
    output_dir, deepspeed = Path(training_args.output_dir), bool(training_args.deepspeed)
    world_size = int(os.environ.get(WORLD_SIZE_ENV, "1"))
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir, deepspeed, world_size)
    # Not the saving process: with --overwrite_output_dir nothing is removed here; the run itself does that.
    prepare_output_dir(output_dir, resume is not None, training_args.overwrite_output_dir, is_saving_process=False)
