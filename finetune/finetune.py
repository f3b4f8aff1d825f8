"""Fine-tune MiniCPM-Llama3-V-2.5 (LoRA or full) on JSON conversations with images.

Launch (what users run; the launcher reads MODEL, DATA, EVAL_DATA, LLM_TYPE, OUTPUT_DIR, GPUS_PER_NODE, ...):

    cd finetune && sh finetune_lora.sh                        # LoRA, DeepSpeed ZeRO-2, every GPU of the node
    bash finetune/finetune_lora.sh --max_steps 100            # from the repository root; extra flags pass through
    torchrun --nproc_per_node 8 finetune/finetune.py --model_name_or_path openbmb/MiniCPM-Llama3-V-2_5 \\
        --data_path train.json --use_lora true --deepspeed finetune/ds_config_zero2.json --output_dir out

Then load the adapter: `PeftModel.from_pretrained(AutoModel.from_pretrained(base), out_dir)`.

Tested on: CPU with the tiny model (CI: in-process, torchrun DDP, DeepSpeed ZeRO-2/3 over gloo, two nodes on
one host) and 1-2 NVIDIA H200 with the full-size architecture (see bench/).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# `python finetune/finetune.py` and torchrun put finetune/ itself on sys.path; the package lives one level up.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser
from transformers.integrations import is_deepspeed_zero3_enabled

import finetune  # noqa: F401  (registers the native model with the Auto classes)
from finetune.base_identity import identity_for_training, local_model_dir
from finetune.check_data import SplitReport, ValidationReport, check_samples, split_report, validate_built
from finetune.dataset import DataCollator, DataError, SupervisedDataset, parse_data_spec
from finetune.model.attention import VARLEN, flash_capable, llm_attention, use_varlen_attention, vision_attention
from finetune.model.checkpoint import CheckpointError, validate_checkpoint_dir
from finetune.model.kernels import apply_liger_kernels, compile_decoder_layers, compiled_layer_count, liger_available, native_model
from finetune.model.loading import load_pretrained, looks_like_hub_id
from finetune.model.modeling import MiniCPMV
from finetune.model.sharded_loss import zero3_vocab_shard
from finetune.model.tokenization import SpecialTokens, detect_llm_type
from finetune.run_directory import RunDirectoryError, prepare_output_dir, remove_incomplete_checkpoints_after, resolve_resume_checkpoint
from finetune.run_report import PLOT_NAME, SUMMARY_NAME, RunReportCallback
from finetune.trainer import MiniCPMVTrainer

logger = logging.getLogger("finetune")

DEFAULT_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


# --- arguments ------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="openbmb/MiniCPM-Llama3-V-2_5", metadata={"help": "hub id or local checkpoint directory"})
    trust_remote_code: bool = field(default=False, metadata={"help": "use the hub's model code (needs its files) instead of the native class"})
    # None = decide in resolve_attn_implementation (varlen where measured to pay: bench/README.md, "Update 4").
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "varlen (each sample of a packed row, and each image strip, attended on its own; torch's flash kernel on CUDA, Ampere or newer) | sdpa | "
                  "eager | flash_attention_2 (when flash-attn is installed); default: varlen on such GPUs with the native model, else sdpa"},
    )


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "training data: file.json[l], or a mix 'a.json:0.7,b.jsonl:0.3'"})
    eval_data_path: str | None = field(default=None, metadata={"help": "held-out data in the same format"})
    image_folder: str | None = field(default=None, metadata={"help": "where relative image paths are looked up too"})
    max_slice_nums: int | None = field(default=None, metadata={"help": "override the checkpoint's max_slice_nums"})
    scale_resolution: int | None = field(default=None, metadata={"help": "override the checkpoint's scale_resolution"})
    slicing: bool = field(default=True, metadata={"help": "false: every image is one view (no adaptive slicing)"})
    # On by default: the same loss and gradients as padding (tests/test_packing.py), no compute spent on padding
    # (1.99x tokens/s on the multimodal benchmark, bench/README.md). Nothing changes at batch size 1.
    packing: bool = field(default=True, metadata={"help": "padding-free packing of each micro-batch into one row"})
    validate_data: bool = field(default=True, metadata={"help": "check every sample before training (recommended)"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "samples longer are cut at whole turns or skipped"})
    loss_chunk_size: int = field(default=2048, metadata={"help": "label positions whose vocabulary logits exist at once"})
    cudnn_attention: bool = field(
        default=False,
        metadata={"help": "allow torch's cuDNN attention kernels; they re-plan every new sequence length on the CPU, "
                  "which made variable-length multimodal steps 1.5x slower on H200 (bench/README.md)"},
    )
    # None = decide in resolve_compile_layers (on where measured to pay: bench/README.md, "Update 3").
    compile_layers: bool | None = field(
        default=None,
        metadata={"help": "torch.compile each LLM decoder layer and vision encoder layer (~1 min of compiling at start, then 1.05-1.3x faster steps "
                  "on H200); default: on with a CUDA GPU, except under ZeRO-3 or QLoRA"},
    )
    llm_type: str | None = field(default=None, metadata={"help": "llama3 | minicpm; detected from the tokenizer when unset"})
    tune_vision: bool = field(default=True, metadata={"help": "train the vision tower (upstream default)"})
    tune_llm: bool = field(default=False, metadata={"help": "full fine-tuning of the LLM (not with --use_lora)"})
    tune_embeddings: bool = field(default=False, metadata={"help": "also train embed_tokens and lm_head (1 GB per adapter)"})
    use_lora: bool = field(default=True)
    # Defaults that work for LoRA (upstream's fp16 + lr 1e-6 gave NaN losses and a learning rate stuck at 0).
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    # None = decide in __post_init__. (A default_factory would not work: HfArgumentParser gives a bool field
    # without a plain default the value False, which silently trained in fp32 on GPUs.)
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: on where the GPU supports it"})
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
    report_to: None | str | list[str] = "tensorboard"
    output_dir: str = "output/output__lora"
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "train into an output_dir that holds another run, removing that run's checkpoints, logs and adapter first"}
    )


    def __post_init__(self):
        self.bf16 = resolve_bf16(self.bf16, self.fp16, self.use_cpu)
        self.accelerator_config = with_non_blocking_copies(self.accelerator_config)
        super().__post_init__()


def with_non_blocking_copies(accelerator_config: dict | str | None) -> dict | str | None:
    """accelerate's `non_blocking` on, unless the given --accelerator_config says otherwise (a JSON file or a config
    object is left as it is). Each batch then goes from the DataLoader's pinned memory to the GPU without the
    host waiting for the copy, and with it for the GPU to finish the work queued before it: 0.160 against 0.182 s
    per one-row text step without checkpointing, logging every 10 steps, same H200, one call (bench/README.md,
    Update 10)."""
    if accelerator_config is None:
        return {"non_blocking": True}
    if isinstance(accelerator_config, str) and accelerator_config.lstrip().startswith("{"):  # JSON on the command line
        accelerator_config = json.loads(accelerator_config)
    if isinstance(accelerator_config, dict):
        return {"non_blocking": True, **accelerator_config}
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


class UsageError(ValueError):
    """A command line that cannot work; reported in one line before any model memory is touched."""


def prepare_run_directory(training_args: TrainingArguments) -> Path | None:
    """The checkpoint to resume (complete, and safe to unpickle), or None; and an output directory this run may
    write: not another run's unless resuming or overwriting it, writable. Before any model memory is touched."""
    output_dir, deepspeed = Path(training_args.output_dir), bool(training_args.deepspeed)
    try:
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir, deepspeed, training_args.world_size)
        prepare_output_dir(output_dir, resume is not None, training_args.overwrite_output_dir, training_args.should_save)
        if resume is not None and training_args.should_save:
            remove_incomplete_checkpoints_after(output_dir, resume, deepspeed, training_args.world_size)
    except RunDirectoryError as error:
        raise UsageError(str(error)) from error
    if resume is not None and training_args.process_index == 0:
        print(f"[resume] resuming from {resume}", flush=True)
    return resume


# --- checks that need no model weights ------------------------------------------------------------------------


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, lora_args: LoraArguments) -> None:
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
        training_args.compile_layers, on_gpu, is_deepspeed_zero3_enabled(), lora_args.q_lora, model_args.trust_remote_code, training_args.torch_compile
    )
    check_fast_paths(model_args, training_args)
    if training_args.use_lora:
        try:
            re.compile(lora_args.lora_target_modules)
        except re.error as error:
            raise UsageError(f"--lora_target_modules is not a valid regex: {error}") from error
    path = Path(model_args.model_name_or_path)
    if path.is_dir() and not model_args.trust_remote_code:
        try:
            validate_checkpoint_dir(path)
        except CheckpointError as error:
            raise UsageError(f"--model_name_or_path: {error}") from error
    elif not path.is_dir() and not looks_like_hub_id(model_args.model_name_or_path):  # a mistyped local path
        raise UsageError(f"--model_name_or_path {path}: no such directory")


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
        raise UsageError(f"--optim {optim} has no effect with --deepspeed {training_args.deepspeed}, which defines its own "
                         "optimizer; drop --optim, or train without DeepSpeed (DS_CONFIG=\"\" in the launchers)")


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
        raise UsageError("--attn_implementation varlen needs an Ampere or newer GPU for torch's flash kernel; use sdpa on this one")
    if requested is not None:
        return requested
    return VARLEN if gpu_in_half and flash_gpu and not remote_code else "sdpa"


def check_fast_paths(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """--use_liger_kernel (the LLM) / --compile_layers (both towers) act on the native class (finetune.model.kernels)."""
    wanted = [flag for flag, on in (("--use_liger_kernel", training_args.use_liger_kernel), ("--compile_layers", training_args.compile_layers)) if on]
    if wanted and model_args.trust_remote_code:
        raise UsageError(f"{' and '.join(wanted)} need the native model class (drop --trust_remote_code)")
    if training_args.use_liger_kernel:
        if not torch.cuda.is_available():
            raise UsageError("--use_liger_kernel true needs a CUDA GPU (liger-kernel's kernels are Triton)")
        if not liger_available():
            raise UsageError("--use_liger_kernel true needs liger-kernel: pip install liger-kernel")
    if training_args.compile_layers and training_args.torch_compile:
        raise UsageError("--compile_layers and --torch_compile: choose one (--compile_layers compiles the decoder and vision encoder layers only)")


def lora_targets(model: torch.nn.Module, pattern: str) -> list[str]:
    """Linear modules whose full name matches the regex (PEFT's rule for a string target)."""
    regex = re.compile(pattern)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and regex.fullmatch(name)]


# --- model ------------------------------------------------------------------------------------------------------


def load_model_and_tokenizer(model_args: ModelArguments, training_args: TrainingArguments, lora_args: LoraArguments):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    # varlen is switched on after loading, for both towers (transformers knows no such implementation).
    attention = "sdpa" if model_args.attn_implementation == VARLEN else model_args.attn_implementation
    kwargs = {"dtype": dtype, "attn_implementation": attention, "trust_remote_code": model_args.trust_remote_code}
    if lora_args.q_lora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # Only the LLM's decoder linears (llm.model.layers.*) become NF4: the vision tower, the resampler and
            # lm_head stay in `dtype` (transformers matches these names as module-name prefixes/components).
            llm_int8_skip_modules=["vpm", "resampler", "lm_head"],
        )
        if torch.cuda.is_available():
            # bitsandbytes quantizes when the weights reach the GPU, and the Trainer never moves a 4-bit model:
            # every process (torchrun / DeepSpeed ZeRO-2 rank) loads its own copy onto its own GPU.
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    # The tokenizer is always the native class over tokenizer.json as it is, also with --trust_remote_code: the
    # hub's tokenizer class loses every space and newline on transformers 5 (spec section "Why").
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        model = load_pretrained(model_args.model_name_or_path, **kwargs)
    except OSError as error:  # a hub id that cannot be resolved (offline, typo, no access)
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: {error}") from error
    model.config.use_cache = False
    model.loss_chunk_size = training_args.loss_chunk_size
    if model_args.attn_implementation == VARLEN:
        use_varlen_attention(model)
    return model, tokenizer


def configure_trainable(model, training_args: TrainingArguments, lora_args: LoraArguments):
    """Freeze what is not trained; wrap the LLM in LoRA. Returns the model to train."""
    model.requires_grad_(False)
    model.llm.requires_grad_(training_args.tune_llm)
    model.resampler.requires_grad_(True)
    model.vpm.requires_grad_(training_args.tune_vision)
    if training_args.tune_embeddings:
        model.llm.get_input_embeddings().requires_grad_(True)
        model.llm.get_output_embeddings().requires_grad_(True)
    if not training_args.use_lora:
        return model

    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, lora_args.lora_target_modules)
    if not targets:
        raise UsageError(f"--lora_target_modules {lora_args.lora_target_modules!r} matches no linear module of the model")
    if lora_args.q_lora:
        # Not peft's prepare_model_for_kbit_training: it casts every non-4-bit parameter to fp32 (vision tower,
        # resampler, embed_tokens, lm_head: 1.56 B parameters, 2.9 -> 5.8 GiB on the full-size model), which
        # defeats QLoRA's purpose; frozen bf16 modules and norms work as they are under bf16 autocast. What it
        # does besides: input gradients for reentrant checkpointing (the Trainer enables checkpointing itself).
        if training_args.gradient_checkpointing:
            model.enable_input_require_grads()
    # Everything trained besides LoRA is saved inside the adapter (modules_to_save), so that
    # PeftModel.from_pretrained(base, out_dir) restores it with no side files.
    modules_to_save = ["resampler"] + (["vpm"] if training_args.tune_vision else [])
    if training_args.tune_embeddings:
        modules_to_save += ["embed_tokens", "lm_head"]
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        bias=lora_args.lora_bias,
        target_modules=lora_args.lora_target_modules,
        modules_to_save=modules_to_save,
    )
    model = get_peft_model(model, config)
    release_frozen_originals(model)
    return model


def release_frozen_originals(model) -> int:
    """Drop the frozen originals PEFT keeps beside each modules_to_save copy; returns the parameters freed.

    PEFT trains a copy of the resampler (and vision tower) and keeps the original only to switch the adapter
    off, which training never does: 0.5 B bf16 parameters, 1 GiB per GPU for the upstream recipe (0.5 GiB per
    GPU of 2 under ZeRO-3, which partitions the original like any parameter). Each wrapper's original_module
    becomes the trained copy itself, so nothing holds the original's weights any more, under ZeRO-3 included
    (emptying the tensors instead would break ZeRO-3's gather of all weights at save time). The saved adapter is
    unchanged: PEFT saves the copies, and PeftModel.from_pretrained restores them onto a fresh base.
    """
    from peft.utils import ModulesToSaveWrapper

    freed = 0
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and module.original_module is not module.modules_to_save[module.active_adapter]:
            freed += sum(full_size(p) for p in module.original_module.parameters())
            # Re-registered last, so that named_parameters() (which names a shared weight once, by its first
            # path) keeps naming the weights modules_to_save.*: the names PEFT saves and the Trainer groups by.
            del module.original_module
            module.original_module = module.modules_to_save[module.active_adapter]
    return freed


def cast_trainable(model, dtype: torch.dtype) -> int:
    """Every trainable parameter in `dtype`; returns how many parameters were cast."""
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            cast += parameter.numel()
    return cast


def set_trainable_precision(model, training_args: TrainingArguments) -> int:
    """Mixed precision: where the fp32 master weights live decides the trainable parameters' dtype.

    Without DeepSpeed the parameters ARE the master weights: fp32, or AdamW updates of ~1e-4 relative size
    vanish in bf16 (8 bits of mantissa); autocast keeps the matmuls in bf16. PEFT makes LoRA weights fp32
    already; the resampler / vision tower copies it trains stay in the load dtype, so they are cast.
    Under DeepSpeed the engine keeps its own fp32 master copy and trains the module in bf16 / fp16: LoRA's
    fp32 weights are cast down here, because ZeRO-3 flattens all trainable parameters into one buffer and
    refuses mixed dtypes (ZeRO-2 casts the module itself). Returns how many parameters were cast."""
    if not (training_args.bf16 or training_args.fp16):
        return 0
    if not training_args.deepspeed:
        return cast_trainable(model, torch.float32)
    return cast_trainable(model, torch.bfloat16 if training_args.bf16 else torch.float16)


def apply_fast_paths(model, training_args: TrainingArguments) -> list[str]:
    """Turn on the fast paths asked for; returns their names for the log.

    --use_liger_kernel is transformers' own flag, but the Trainer's hook matches liger's patches by model type
    and knows no "minicpmv": it would do nothing. So the kernels are applied here, to the LLM inside, and the
    flag is cleared before the Trainer sees it (its evaluation would also pass a `skip_logits` our forward does
    not take). Under ZeRO-3 liger's fused loss would need lm_head's whole weight, which exists only inside
    lm_head's own call, so the loss stays label_position_loss: on each rank's rows of lm_head where it can be.
    """
    applied = []
    if training_args.use_liger_kernel:
        fused_loss = not is_deepspeed_zero3_enabled()
        apply_liger_kernels(model, fused_loss=fused_loss)
        applied.append("liger-kernel RMSNorm/SwiGLU/RoPE" + (" + fused linear cross-entropy" if fused_loss else ""))
        training_args.use_liger_kernel = False
    if vocab_sharded(model):
        applied.append(f"loss over lm_head's vocabulary shards ({training_args.world_size} ranks; lm_head never gathered)")
    if training_args.compile_layers:
        # Sequence lengths change every step: compiled for any length at once, instead of once for the first
        # length and again when the second one arrives (each ~15 s for the full-size layer on an H200).
        applied.append(f"torch.compile of {compile_decoder_layers(model, vision=True, dynamic=True)} layers (LLM and vision tower)")
    return applied


def vocab_sharded(model) -> bool:
    """Whether the native model's loss runs on ZeRO-3's row shards of lm_head (the remote code's loss is its own)."""
    native = native_model(model)
    if not isinstance(native, MiniCPMV) or not native.vocab_sharded_loss:
        return False
    return zero3_vocab_shard(native.llm.lm_head, native.llm.lm_head.weight.device) is not None


def full_size(parameter: torch.nn.Parameter) -> int:
    """Elements of the whole parameter: ZeRO-3 partitions leave numel() == 0, and ds_numel is the full size."""
    return getattr(parameter, "ds_numel", parameter.numel())


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(full_size(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(full_size(p) for p in model.parameters())


# --- data --------------------------------------------------------------------------------------------------------


def build_datasets(data_args: DataArguments, training_args: TrainingArguments, tokenizer, config):
    detected = detect_llm_type(tokenizer)
    if training_args.llm_type and training_args.llm_type != detected:
        raise UsageError(f"--llm_type {training_args.llm_type} but the model's tokenizer is {detected}")
    common = dict(
        tokenizer=tokenizer,
        config=config,
        image_folder=data_args.image_folder,
        model_max_length=training_args.model_max_length,
        max_slice_nums=data_args.max_slice_nums,
        scale_resolution=data_args.scale_resolution,
        slicing=data_args.slicing,
        llm_type=detected,
        seed=training_args.seed,
    )
    datasets = []
    for name, spec in (("train", data_args.data_path), ("eval", data_args.eval_data_path)):
        if spec is None:
            datasets.append(None)
            continue
        try:
            dataset = SupervisedDataset(spec, **common)
        except DataError as error:  # a whole file unreadable (malformed JSON names line and column)
            raise UsageError(str(error)) from error
        if data_args.validate_data:
            report = validate_across_ranks(name, spec, dataset, training_args)
            if training_args.process_index == 0:
                print("[data] " + ValidationReport([report], training_args.model_max_length).format().replace("\n", "\n[data] "), flush=True)
            if report.bad:
                listing = "\n".join(f"  {r.id}: {r.reason}" for r in report.bad)
                raise UsageError(f"{len(report.bad)} bad {name} samples (fix them; `python -m finetune.check_data` lists all):\n{listing}")
            dataset = dataset.subset(report.usable_indices)
        if len(dataset) == 0:
            raise UsageError(f"no usable {name} samples in {spec}")
        datasets.append(dataset)
    return datasets


def validate_across_ranks(name: str, spec: str, dataset: SupervisedDataset, training_args: TrainingArguments) -> SplitReport:
    """Every sample, as training will read it. Each rank checks every world_size-th sample on its share of
    the node's CPU cores, and the results are gathered: every rank gets the whole report, so that a bad sample
    any rank found stops them all, and they keep the same samples. A rank whose check itself fails (not a bad
    sample: a worker killed, say) stops them all too, instead of leaving them waiting. Rank 0 logs."""
    world, rank = training_args.world_size, training_args.process_index
    sharded = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not sharded:
        return validate_built(name, spec, dataset, workers)
    try:
        share, failure = check_samples(dataset, range(rank, len(dataset), world), workers), None
    except Exception as error:  # e.g. a validation worker killed for memory: the other ranks must not wait for this one
        share, failure = [], f"{type(error).__name__}: {error}"
    shares = [None] * world
    torch.distributed.all_gather_object(shares, (share, failure))
    failures = [f"rank {index}: {failure}" for index, (_, failure) in enumerate(shares) if failure]
    if failures:
        raise UsageError(f"validating the {name} data failed on " + "; ".join(failures))
    results = sorted((result for share, _ in shares for result in share), key=lambda result: result.index)
    return split_report(name, spec, results, log=rank == 0, sources=dataset.source.share_lines())


# --- a worker's lifetime -----------------------------------------------------------------------------------------


def stop_with_launcher(poll_seconds: float = 1.0) -> None:
    """Under torchrun, end this worker (SIGTERM) as soon as the launcher that started it dies.

    torchrun starts each worker in a session of its own, so when torchrun itself is killed outright (kill -9,
    the OOM killer) nothing reaches the workers: they trained on with parent 1 and kept writing into the output
    directory. On Linux the kernel sends the signal when the parent dies (prctl PR_SET_PDEATHSIG; torchrun
    starts its workers from its main thread, which lives as long as it does); where that is missing, a daemon
    thread polls the parent pid every POLL_SECONDS. SIGTERM's default action ends the process at once, even in
    the middle of a step or inside a gloo collective, where a Python-level handler would not run; a handler the
    run itself installs (transformers' --enable_jit_checkpoint) runs as it would for any SIGTERM.

    Only for workers of torchrun's elastic agent (TORCHELASTIC_RUN_ID in the environment: the agent sets it in
    each worker, and starts each as its own child process): a plain `python finetune.py`, perhaps under nohup, must outlive the shell that
    started it. A launcher that died before this call, while the modules were being imported, is not noticed.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import signal

    launcher = os.getppid()
    if signal_on_parent_death(signal.SIGTERM):
        if os.getppid() != launcher:  # it died before the kernel was asked: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)
        return
    import threading

    threading.Thread(target=_stop_when_orphaned, args=(launcher, poll_seconds), name="stop-with-launcher", daemon=True).start()


def signal_on_parent_death(signum: int) -> bool:
    """Asks the Linux kernel to send SIGNUM to this process when its parent dies; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_pdeathsig = 1  # PR_SET_PDEATHSIG in <linux/prctl.h>
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(pr_set_pdeathsig, ctypes.c_ulong(signum), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):  # no C library to load, or one without prctl
        return False


def _stop_when_orphaned(launcher: int, poll_seconds: float) -> None:
    """Sends this process SIGTERM once its parent is no longer LAUNCHER (it died; an orphan is re-parented)."""
    import signal
    import time

    while os.getppid() == launcher:
        time.sleep(poll_seconds)
    os.kill(os.getpid(), signal.SIGTERM)


# --- distributed set-up on CPU -----------------------------------------------------------------------------------


def prepare_cpu_distributed(argv: list[str]) -> list[str]:
    """Without a GPU, torchrun must still give ONE distributed training, not N independent ones.

    DeepSpeed needs a gloo process group set up before TrainingArguments exist (TrainingArguments would give
    accelerate no backend and it would count one process), and a rendezvous even for one process; plain DDP
    needs accelerate told to use the CPU. Nothing changes on GPU machines. Returns the extended arguments.
    """
    if torch.cuda.is_available():
        return argv
    if any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv):
        from accelerate import PartialState

        if "LOCAL_RANK" not in os.environ:  # plain `python finetune.py --deepspeed ...`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")  # initialises deepspeed.comm over gloo with the real world size
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
        return argv + ["--accelerator_config", json.dumps({"use_configured_state": True})]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return argv


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def innermost_optimizer_name(optimizer) -> str:
    """The class that really updates the weights, under accelerate's and DeepSpeed's wrappers, with its state
    precision where bitsandbytes says it (e.g. "bitsandbytes.optim.adamw.AdamW 8-bit")."""
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    bits = getattr(getattr(optimizer, "args", None), "optim_bits", None)
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}" + (f" {bits}-bit" if bits else "")


def checkpointing_in_effect(model: torch.nn.Module) -> bool:
    """Whether any module of the model recomputes its activations in backward (what transformers'
    `is_activation_checkpointing` reads; spelled out, as its name differs across transformers 5 releases)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def fast_paths_in_effect(model) -> dict:
    """The fast paths as the model has them (finetune.model.kernels and .attention), whatever the flags said:
    the run report's fields, and bench/trainer_bench.py's."""
    native = native_model(model)
    return {
        "loss_kernel": getattr(native, "loss_kernel", None),  # the hub's class has none
        "vocab_sharded_loss": vocab_sharded(model),
        "liger_rms_norm": "Liger" in getattr(native.llm.model.norm.forward, "__qualname__", ""),
        "compiled_layers": compiled_layer_count(native),
        "compiled_vision_layers": compiled_layer_count(native, "vision"),
        "llm_attention": llm_attention(native),
        "vision_attention": vision_attention(native),
    }


def write_run_report(trainer: MiniCPMVTrainer, directory: Path) -> None:
    """One JSON per rank saying how this process really trained (tests assert on it, not on exit codes)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = trainer.accelerator.state
    native = native_model(trainer.model)
    report = {
        "process_index": trainer.args.process_index,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(state.distributed_type),
        "backend": getattr(state, "backend", None),
        "wrapper": type(trainer.model_wrapped).__name__,
        "optimizer": innermost_optimizer_name(trainer.optimizer),
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_checkpointing": checkpointing_in_effect(native),
        "vision_trained": any(p.requires_grad for p in native.vpm.parameters()),
        **fast_paths_in_effect(trainer.model),
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
    }
    (directory / f"rank{trainer.args.process_index}.json").write_text(json.dumps(report, indent=1, default=str))


# --- main --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> MiniCPMVTrainer:
    stop_with_launcher()  # a worker must not train on, orphaned, after torchrun is killed
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = prepare_cpu_distributed(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    try:
        model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # unknown flags and invalid values: one line, not a traceback
        raise UsageError(str(error)) from error
    check_arguments(model_args, data_args, training_args, lora_args)
    resume = prepare_run_directory(training_args)
    # Before anything random: LoRA's initial weights must not depend on what ran earlier in the process.
    transformers.set_seed(training_args.seed)

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(training_args.cudnn_attention)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args, lora_args)
    train_dataset, eval_dataset = build_datasets(data_args, training_args, tokenizer, model.config)
    model = configure_trainable(model, training_args, lora_args)
    set_trainable_precision(model, training_args)
    fast_paths = apply_fast_paths(model, training_args)
    trainable, total = count_parameters(model)
    if training_args.process_index == 0:
        print(f"[model] {type(model).__name__}: {trainable:,} trainable of {total:,} parameters", flush=True)
        if fast_paths:
            print(f"[model] fast paths: {'; '.join(fast_paths)}", flush=True)

    collator = DataCollator(SpecialTokens.from_tokenizer(tokenizer).pad, packing=data_args.packing)
    trainer = MiniCPMVTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        # A hub id's files are in the local cache once the model has loaded: the saves copy and fingerprint those.
        base_model_dir=str(local_model_dir(model_args.model_name_or_path) or model_args.model_name_or_path),
        base_identity=identity_for_training(model_args.model_name_or_path),
        callbacks=[RunReportCallback()],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if os.environ.get("FINETUNE_RUN_REPORT"):
        write_run_report(trainer, Path(os.environ["FINETUNE_RUN_REPORT"]))
    if training_args.process_index == 0:
        print(f"[done] adapter and tokenizer saved to {Path(training_args.output_dir).resolve()}", flush=True)
        print(f"[done] loss plot: {Path(training_args.output_dir).resolve() / PLOT_NAME}; summary: "
              f"{Path(training_args.output_dir).resolve() / SUMMARY_NAME}", flush=True)  # fmt: skip
    return trainer


def cli() -> None:
    try:
        main()
    except UsageError as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
