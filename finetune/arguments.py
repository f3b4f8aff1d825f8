"""The training run's command line: four argument dataclasses (parsed by transformers' HfArgumentParser) and the
checks that need no model weights, so that a command line that cannot work stops in one line (UsageError) before
any model memory is touched."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser
from transformers.integrations import is_deepspeed_zero3_enabled

from finetune.base_identity import local_model_dir
from finetune.cli import model_dir_problem, unknown_flags_message
from finetune.dataset import DataSettings, parse_data_spec
from finetune.model.attention import VARLEN, flash_capable
from finetune.model.kernels import liger_available
from finetune.model.versions import VERSIONS, ModelVersion, UnsupportedVersionError, version_of_dict

DEFAULT_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="openbmb/MiniCPM-Llama3-V-2_5", metadata={"help": "hub id or local checkpoint directory"}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "use the hub's model code (needs its files) instead of the native class"}
    )
    # None = decide in resolve_attn_implementation (varlen where it was measured to be faster).
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "varlen (each sample of a packed row, and each image strip, attended on its own; torch's flash kernel on CUDA, Ampere or newer) | sdpa | "
            "eager | flash_attention_2 (when flash-attn is installed); default: varlen on such GPUs with the native model, else sdpa"
        },
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None, metadata={"help": "training data: file.json[l], or a mix 'a.json:0.7,b.jsonl:0.3'"}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "held-out data in the same format"})
    image_folder: str | None = field(default=None, metadata={"help": "where relative image paths are looked up too"})
    max_slice_nums: int | None = field(default=None, metadata={"help": "override the checkpoint's max_slice_nums"})
    scale_resolution: int | None = field(default=None, metadata={"help": "override the checkpoint's scale_resolution"})
    slicing: bool = field(default=True, metadata={"help": "false: every image is one view (no adaptive slicing)"})
    # On by default: the same loss and gradients as padding (tests/test_packing.py), and no compute spent on
    # padding (bench/README.md has the measured gain). Nothing changes at batch size 1.
    packing: bool = field(default=True, metadata={"help": "padding-free packing of each micro-batch into one row"})
    validate_data: bool = field(default=True, metadata={"help": "check every sample before training (recommended)"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(
        default=DataSettings.model_max_length, metadata={"help": "samples longer are cut at whole turns or skipped"}
    )
    loss_chunk_size: int = field(
        default=2048, metadata={"help": "label positions whose vocabulary logits exist at once"}
    )
    cudnn_attention: bool = field(
        default=False,
        metadata={
            "help": "allow torch's cuDNN attention kernels; they re-plan every new sequence length on the CPU, "
            "which makes variable-length multimodal steps slower"
        },
    )
    # None = decide in resolve_compile_layers (on where it was measured to be faster).
    compile_layers: bool | None = field(
        default=None,
        metadata={
            "help": "torch.compile each LLM decoder layer and vision encoder layer (~1 min of compiling at start, then 1.05-1.3x faster steps "
            "on H200); default: on with a CUDA GPU, except under ZeRO-3 or QLoRA"
        },
    )
    llm_type: str | None = field(
        default=None,
        metadata={
            "help": "llama3 (MiniCPM-Llama3-V-2.5) | qwen (MiniCPM-V 2.6): checked against the checkpoint's "
            "config.json; unset or empty: taken from the checkpoint"
        },
    )
    tune_vision: bool = field(default=True, metadata={"help": "train the vision tower (upstream default)"})
    tune_llm: bool = field(default=False, metadata={"help": "full fine-tuning of the LLM (not with --use_lora)"})
    tune_embeddings: bool = field(
        default=False, metadata={"help": "also train embed_tokens and lm_head (1 GB per adapter)"}
    )
    use_lora: bool = field(default=True)
    # Defaults that work for LoRA (upstream's fp16 + lr 1e-6 gave NaN losses and a learning rate stuck at 0).
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    # None = decide in __post_init__. (A default_factory would not work: HfArgumentParser gives a bool field
    # without a plain default the value False, which silently trained in fp32 on GPUs.)
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on where the GPU supports it"}
    )
    gradient_checkpointing: bool = True
    gradient_checkpointing_kwargs: dict | str | None = field(default_factory=lambda: {"use_reentrant": False})
    remove_unused_columns: bool = False
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])
    prediction_loss_only: bool = True
    # Image decoding and slicing take ~35 ms a sample on one core: workers keep the GPU from waiting on data.
    dataloader_num_workers: int = field(default_factory=lambda: min(4, (os.cpu_count() or 1) // 2))
    # The library's filter asks the device whether each step's loss is nan/inf, a synchronisation after every
    # backward: the host then runs clipping, the optimizer step and zero_grad while the GPU waits, instead of
    # queueing them behind the backward. It also hides a diverging run from its logs (a nan loss is logged as
    # the running average). Off: a nan or inf loss is logged as it is.
    logging_nan_inf_filter: bool = False
    # None = decide in __post_init__: on with worker processes, which otherwise restart at every epoch's start
    # (~0.8 s of stalled GPU each time on an H200).
    dataloader_persistent_workers: bool | None = field(
        default=None,
        metadata={"help": "keep the DataLoader's workers between epochs; default: on when dataloader_num_workers > 0"},
    )
    report_to: None | str | list[str] = "tensorboard"
    output_dir: str = "output/output__lora"
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "train into an output_dir that holds another run, removing that run's checkpoints, logs and adapter first"
        },
    )

    def __post_init__(self):
        self.llm_type = self.llm_type or None  # the launcher's empty LLM_TYPE: taken from the checkpoint
        self.bf16 = resolve_bf16(self.bf16, self.fp16, self.use_cpu)
        # Pinned memory and copies that do not wait need a device to copy to: on CPU torch and transformers warn.
        on_device = not self.use_cpu and has_accelerator()
        self.accelerator_config = with_non_blocking_copies(self.accelerator_config, default=on_device)
        if not on_device:
            self.dataloader_pin_memory = False
        if self.dataloader_persistent_workers is None:
            self.dataloader_persistent_workers = self.dataloader_num_workers > 0
        super().__post_init__()


def has_accelerator() -> bool:
    """A GPU (or other torch accelerator) this process could train on."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def with_non_blocking_copies(accelerator_config: dict | str | None, default: bool = True) -> dict | str | None:
    """accelerate's `non_blocking` on (`default`; off on CPU), unless the given --accelerator_config says otherwise
    (a JSON file or a config object is left as it is). Each batch then goes from the DataLoader's pinned memory to the GPU without the
    host waiting for the copy, and with it for the GPU to finish the work queued before it: the host keeps
    queueing the next step's kernels instead."""
    if accelerator_config is None:
        return {"non_blocking": default}
    if isinstance(accelerator_config, str) and accelerator_config.lstrip().startswith("{"):  # JSON on the command line
        accelerator_config = json.loads(accelerator_config)
    if isinstance(accelerator_config, dict):
        return {"non_blocking": default, **accelerator_config}
    return accelerator_config


def resolve_bf16(bf16: bool | None, fp16: bool, use_cpu: bool) -> bool:
    """An explicit --bf16 wins; otherwise bf16 on a GPU that supports it, unless fp16 or the CPU was asked for."""
    if bf16 is not None:
        return bf16
    return not fp16 and not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class LoraArguments:
    lora_r: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "regex over module names"})
    lora_bias: str = "none"
    q_lora: bool = field(default=False, metadata={"help": "4-bit NF4 base (bitsandbytes, CUDA only)"})


def data_settings_from_arguments(data_args: DataArguments, training_args: TrainingArguments) -> DataSettings:
    """The data settings of a training command line: DataArguments' data flags, and TrainingArguments'
    model_max_length, llm_type and seed (transformers' --seed also seeds the sampling of a data mix)."""
    return DataSettings(
        data_path=data_args.data_path,
        eval_data_path=data_args.eval_data_path,
        image_folder=data_args.image_folder,
        model_max_length=training_args.model_max_length,
        max_slice_nums=data_args.max_slice_nums,
        scale_resolution=data_args.scale_resolution,
        slicing=data_args.slicing,
        llm_type=training_args.llm_type,
        seed=training_args.seed,
    )


class UsageError(ValueError):
    """A command line that cannot work; reported in one line before any model memory is touched."""


def check_arguments(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, lora_args: LoraArguments
) -> None:
    if data_args.data_path is None:
        raise UsageError("--data_path is required")
    for spec in filter(None, (data_args.data_path, data_args.eval_data_path)):
        try:
            entries = parse_data_spec(spec)
        except ValueError as error:
            raise UsageError(str(error)) from error
        for path, _ in entries:
            if not Path(path).is_file():
                raise UsageError(f"data file not found: {path}")
    if training_args.use_lora and training_args.tune_llm:
        raise UsageError("--use_lora true with --tune_llm true: choose LoRA or full LLM fine-tuning (finetune_ds.sh)")
    if lora_args.q_lora and not training_args.use_lora:
        raise UsageError("--q_lora true needs --use_lora true")
    if lora_args.q_lora and not torch.cuda.is_available():
        raise UsageError("--q_lora true needs a CUDA GPU (bitsandbytes 4-bit kernels)")
    check_optimizer_choice(training_args)
    on_gpu = torch.cuda.is_available() and not training_args.use_cpu
    gpu_in_half = on_gpu and bool(training_args.bf16 or training_args.fp16)
    model_args.attn_implementation = resolve_attn_implementation(
        model_args.attn_implementation, gpu_in_half, gpu_in_half and flash_capable(), model_args.trust_remote_code
    )
    training_args.compile_layers = resolve_compile_layers(
        training_args.compile_layers,
        on_gpu,
        is_deepspeed_zero3_enabled(),
        lora_args.q_lora,
        model_args.trust_remote_code,
        training_args.torch_compile,
    )
    check_fast_paths(model_args, training_args)
    if training_args.use_lora:
        try:
            re.compile(lora_args.lora_target_modules)
        except re.error as error:
            raise UsageError(f"--lora_target_modules is not a valid regex: {error}") from error
    problem = model_dir_problem(model_args.model_name_or_path, weights=not model_args.trust_remote_code)
    if problem:
        raise UsageError(f"--model_name_or_path {problem}")
    check_llm_type(training_args.llm_type, model_args.model_name_or_path)


# Every llm_type the upstream finetune knows, with the MiniCPM-V version it names (not all are implemented).
UPSTREAM_LLM_TYPES = {"llama3": "2.5", "qwen": "2.6", "minicpm": "2.0"}


def check_llm_type(llm_type: str | None, model_name_or_path: str) -> ModelVersion | None:
    """The version the model's config.json names (read from the local directory, or a hub id's cached snapshot;
    no tokenizer or weights; a published checkpoint's hub id names its version without either), refused when this
    suite does not implement it or when `llm_type` (None: take the checkpoint's) is another version's. Returns
    None for another hub id not in the local cache: training checks its tokenizer's chat tokens instead
    (finetune.data_setup)."""
    if llm_type is not None and llm_type not in UPSTREAM_LLM_TYPES:
        raise UsageError(f"--llm_type {llm_type}: choose one of {', '.join(UPSTREAM_LLM_TYPES)}, or leave it unset")
    directory = local_model_dir(model_name_or_path)
    if directory is not None and (directory / "config.json").is_file():
        try:
            version = version_of_dict(json.loads((directory / "config.json").read_text()))
        except (UnsupportedVersionError, ValueError) as error:
            raise UsageError(f"--model_name_or_path {model_name_or_path}: {error}") from error
    else:
        version = next((v for v in VERSIONS.values() if v.hub_id == model_name_or_path), None)
        if version is None:
            return None
    if llm_type is not None and llm_type != version.llm_type:
        raise UsageError(
            f"--llm_type {llm_type} (MiniCPM-V {UPSTREAM_LLM_TYPES[llm_type]}) does not fit --model_name_or_path "
            f"{model_name_or_path}, a MiniCPM-V {version.name} checkpoint: use --llm_type {version.llm_type} "
            "(LLM_TYPE in the launchers), or leave it unset"
        )
    return version


def check_optimizer_choice(training_args: TrainingArguments) -> None:
    """bitsandbytes optimizers need bitsandbytes (the planner proposes one). And --optim would be silently
    ignored under a DeepSpeed config that names its own optimizer (all of ours do): `--optim adamw_bnb_8bit`
    would train with DeepSpeed's fp32 AdamW states and run out of memory."""
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    if "bnb" in optim and importlib.util.find_spec("bitsandbytes") is None:  # found before the model is loaded
        raise UsageError(f"--optim {optim} needs bitsandbytes: pip install -r requirements-extras.txt")
    default = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
    if not training_args.deepspeed or optim == str(getattr(default, "value", default)):
        return
    config = training_args.deepspeed
    if not isinstance(config, dict):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"--deepspeed {training_args.deepspeed}: {error}") from error
    if "optimizer" in config:
        raise UsageError(
            f"--optim {optim} has no effect with --deepspeed {training_args.deepspeed}, which defines its own "
            'optimizer; drop --optim, or train without DeepSpeed (DS_CONFIG="" in the launchers)'
        )


def resolve_compile_layers(
    compile_layers: bool | None, cuda: bool, zero3: bool, q_lora: bool, remote_code: bool, torch_compile: bool = False
) -> bool:
    """An explicit --compile_layers wins. By default the layers of both towers are compiled on a CUDA GPU, where they
    were measured to be faster and never to use more memory (one GPU without DeepSpeed; ZeRO-2 and DDP leave the
    layers' forward alone and are checked to train with them, their speed there was not measured); not on the
    CPU (compiling costs more than it saves on tiny runs), and not where it would change what runs inside the
    layers: ZeRO-3 (its parameter hooks fire in every layer), QLoRA (bitsandbytes' 4-bit layers), the hub's
    model code; and not when --torch_compile compiles the whole model instead."""
    if compile_layers is not None:
        return compile_layers
    return cuda and not (zero3 or q_lora or remote_code or torch_compile)


def resolve_attn_implementation(requested: str | None, gpu_in_half: bool, flash_gpu: bool, remote_code: bool) -> str:
    """An explicit --attn_implementation wins, where it can run: varlen needs the native class (the hub's
    forward does not pass the segments on), and a GPU training in bf16/fp16 must be one that runs torch's flash
    kernel (Ampere or newer). By default varlen exactly there (`gpu_in_half` and `flash_gpu`): the kernel then
    skips the attention between samples of a packed row. sdpa elsewhere: in fp32 or on the CPU varlen would
    attend segment by segment (a Python loop; it only pays on long rows), older GPUs do not run the kernel,
    and the hub's model code."""
    if requested == VARLEN and remote_code:
        raise UsageError("--attn_implementation varlen needs the native model class (drop --trust_remote_code)")
    if requested == VARLEN and gpu_in_half and not flash_gpu:
        raise UsageError(
            "--attn_implementation varlen needs an Ampere or newer GPU for torch's flash kernel; use sdpa on this one"
        )
    if requested is not None:
        return requested
    return VARLEN if gpu_in_half and flash_gpu and not remote_code else "sdpa"


def check_fast_paths(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """--use_liger_kernel (the LLM) / --compile_layers (both towers) act on the native class (finetune.model.kernels)."""
    wanted = [
        flag
        for flag, on in (
            ("--use_liger_kernel", training_args.use_liger_kernel),
            ("--compile_layers", training_args.compile_layers),
        )
        if on
    ]
    if wanted and model_args.trust_remote_code:
        raise UsageError(f"{' and '.join(wanted)} need the native model class (drop --trust_remote_code)")
    if training_args.use_liger_kernel:
        if not torch.cuda.is_available():
            raise UsageError("--use_liger_kernel true needs a CUDA GPU (liger-kernel's kernels are Triton)")
        if not liger_available():
            raise UsageError("--use_liger_kernel true needs liger-kernel: pip install liger-kernel")
    if training_args.compile_layers and training_args.torch_compile:
        raise UsageError(
            "--compile_layers and --torch_compile: choose one (--compile_layers compiles the decoder and vision encoder layers only)"
        )


# Flags that upstream's finetune_lora.sh (openbmb/MiniCPM-V) and older advice pass, removed in transformers 5:
# old flag -> (today's flag, or None where it becomes an environment variable; what the value now means).
REMOVED_FLAGS: dict[str, tuple[str | None, str]] = {
    "--warmup_ratio": ("--warmup_steps", "a --warmup_steps value below 1 is that fraction of the training steps"),
    "--evaluation_strategy": ("--eval_strategy", "renamed"),
    "--logging_dir": (None, "the TensorBoard directory, which transformers 5 reads from TENSORBOARD_LOGGING_DIR"),
}


def map_removed_flags(argv: list[str], notice=print) -> list[str]:
    """ARGV with the flags of REMOVED_FLAGS (`--flag value` or `--flag=value`) replaced by today's meaning, one
    notice each: --warmup_ratio R -> --warmup_steps R (R must be below 1, or it would count steps),
    --evaluation_strategy -> --eval_strategy, --logging_dir D -> TENSORBOARD_LOGGING_DIR=D in this process's
    environment (transformers' TensorBoardCallback reads it; torchrun's workers each run this too)."""
    mapped: list[str] = []
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        flag, has_value, value = arg.partition("=")
        if flag not in REMOVED_FLAGS:
            mapped.append(arg)
            continue
        if not has_value:
            if not rest or rest[0].startswith("--"):
                raise UsageError(f"{flag} needs a value")
            value = rest.pop(0)
        new_flag, meaning = REMOVED_FLAGS[flag]
        if flag == "--warmup_ratio":
            try:
                ratio = float(value)
            except ValueError as error:
                raise UsageError(f"--warmup_ratio {value}: not a number") from error
            if not 0 <= ratio < 1:
                raise UsageError(
                    f"--warmup_ratio {value}: must be at least 0 and below 1 (a fraction of the training steps)"
                )
        if new_flag is None:
            os.environ["TENSORBOARD_LOGGING_DIR"] = value
            notice(f"[args] {flag} {value}: removed in transformers 5; set as TENSORBOARD_LOGGING_DIR ({meaning})")
        else:
            mapped += [new_flag, value]
            notice(f"[args] {flag} {value} -> {new_flag} {value} (removed in transformers 5; {meaning})")
    return mapped


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors (an invalid value, a missing one) are a UsageError, not argparse's usage block."""

    def error(self, message: str):
        raise UsageError(message)


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments, LoraArguments]:
    """The four dataclasses from a finetune.py command line, after map_removed_flags; unknown flags (with the
    closest known one) and invalid values are a UsageError."""
    argv = map_removed_flags(argv, notice=_rank0_notice)
    parser = _Parser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # one line, not a traceback
        raise UsageError(str(error)) from error
    if remaining:
        raise UsageError(unknown_flags_message(remaining, parser._option_string_actions))
    return tuple(parsed)


# Set by the launchers for torchrun's workers once `finetune.py --preflight` has parsed the same command line.
PREFLIGHT_DONE_ENV = "FINETUNE_PREFLIGHT_DONE"


def _rank0_notice(message: str) -> None:
    """Printed by one process of a run (the first, or a plain one), on stderr beside the launcher's own lines;
    not by the workers of a launch whose preflight printed it already."""
    if os.environ.get("RANK", "0") == "0" and os.environ.get(PREFLIGHT_DONE_ENV) != "1":
        print(message, file=sys.stderr, flush=True)
