"""MiniCPMVTrainer: transformers.Trainer with only what MiniCPM-V needs changed.

What differs from the library's Trainer, and nothing else:
- Nothing in the loss path: batches are `{"data": {...published fields...}, "labels", "attention_mask"}`, so
  the library's compute_loss calls `model(data=..., labels=..., attention_mask=..., num_items_in_batch=...)`,
  the published interface that the native class and the hub's remote-code class both accept. The model
  divides the summed token loss by `num_items_in_batch`, the Trainer's count of label tokens in the whole
  optimizer step (all micro-batches, all ranks), so every label token weighs the same; the library then
  undoes the rank averaging of DDP/DeepSpeed. We only check at start-up that the model takes that count.
- The FLOP estimate (state.total_flos): the library's formula over `data`'s input_ids, with the parameters
  counted once instead of at every micro-batch (host time in a launch-bound step).
- The optimizer, without DeepSpeed: bitsandbytes' 8-bit optimizers synchronise the device after every
  parameter's update; where that cannot reorder anything, the step runs without those syncs (same kernels,
  same order, same numbers).
- Saving: the adapter (or model) as the library writes it, plus the base model's tokenizer, preprocessor and
  generation files copied byte for byte, so the output directory is self-contained and the inference chat
  template is exactly the published one (re-serialising a tokenizer can rewrite it), plus the base's identity
  (`base_model_identity.json`, finetune.base_identity), by which merge recognises the base the adapter belongs to.
  The library calls `_save` on every rank under DeepSpeed and DDP; these files are written only where it saves
  (`args.should_save`).
"""

from __future__ import annotations

import functools
import shutil
import types
from pathlib import Path

import torch
from transformers import Trainer

from finetune.base_identity import write_identity

# Files of the base model that inference needs beside the weights; copied verbatim into every save.
PASSTHROUGH_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "preprocessor_config.json", "generation_config.json",
)  # fmt: skip


class MiniCPMVTrainer(Trainer):
    def __init__(self, *args, base_model_dir: str | None = None, base_identity: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_model_dir = base_model_dir
        self.base_identity = base_identity  # base_identity.identity_for_training of the base, written into every save
        self._non_embedding_parameters: int | None = None  # floating_point_ops' count, taken once
        if not self.model_accepts_loss_kwargs:
            # Without it the Trainer would average per micro-batch means: tokens of short samples would weigh
            # more than tokens of long ones. Both MiniCPMV classes accept it (forward(data, **kwargs)).
            raise TypeError(f"{type(self.model).__name__}.forward must accept num_items_in_batch")

    def floating_point_ops(self, inputs) -> int:
        """The library's estimate, 6 x input tokens x non-embedding parameters, with two changes: the input_ids
        sit inside `data`, and the parameter count is taken once. The library counts it again for every
        micro-batch, walking all ~2000 modules of the full-size LoRA model: about 4 ms of host time each, in a
        step that waits on the host launching kernels."""
        if self._non_embedding_parameters is None:
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["data"]["input_ids"].numel() * self._non_embedding_parameters

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not self.is_deepspeed_enabled:  # DeepSpeed steps flat partitions on its own streams: left as it is
            skip_per_parameter_syncs(optimizer)
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:  # other ranks: the directory may not even exist yet
            return
        output_dir = Path(output_dir or self.args.output_dir)
        if self.base_model_dir and Path(self.base_model_dir).is_dir():
            copy_passthrough_files(Path(self.base_model_dir), output_dir)
            if self.base_identity is not None:
                write_identity(output_dir, self.base_identity)


def copy_passthrough_files(model_dir: Path, output_dir: Path) -> list[str]:
    """The PASSTHROUGH_FILES that `model_dir` has, copied byte for byte into `output_dir`; returns their names."""
    copied = []
    for name in PASSTHROUGH_FILES:
        source = model_dir / name
        if source.is_file():
            shutil.copyfile(source, output_dir / name)
            copied.append(name)
    return copied


def skip_per_parameter_syncs(optimizer: torch.optim.Optimizer) -> bool:
    """Make a non-paged bitsandbytes optimizer step without its device synchronisation after every parameter.

    bitsandbytes (0.50) calls torch.cuda.synchronize() after each parameter's update in Optimizer8bit.step.
    For the upstream recipe that is ~700 host-device round trips a step, which made its optimizer phase several
    times slower than fused AdamW's on an H200. Its kernels run on the legacy default stream; while PyTorch's current stream is that
    stream too, every update is already ordered after the gradients and before the next forward, so the
    syncs order nothing. Paged optimizers (their state migrates between host and device) and other streams
    keep them. Returns whether it applied.
    """
    try:
        from bitsandbytes.optim import optimizer as bnb_optimizer
    except ImportError:
        return False
    if (
        not isinstance(optimizer, bnb_optimizer.Optimizer8bit)
        or optimizer.is_paged
        or not hasattr(bnb_optimizer, "sync_gpu")
    ):
        return False
    step = type(optimizer).step

    @functools.wraps(step)
    def step_without_syncs(self, *args, **kwargs):
        if torch.cuda.is_available() and torch.cuda.current_stream() != torch.cuda.default_stream():
            return step(self, *args, **kwargs)
        synchronise, bnb_optimizer.sync_gpu = bnb_optimizer.sync_gpu, _no_sync
        try:
            return step(self, *args, **kwargs)
        finally:
            bnb_optimizer.sync_gpu = synchronise

    # A bound method, as the class's step is: torch's LR schedulers wrap `optimizer.step.__func__`.
    optimizer.step = types.MethodType(step_without_syncs, optimizer)
    return True


def _no_sync(tensor: torch.Tensor) -> None:
    return None
