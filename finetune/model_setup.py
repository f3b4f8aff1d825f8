"""The model of a training run: loaded (native class or the hub's code, optionally 4-bit), made trainable (LoRA on
the LLM, the resampler and optionally the vision tower trained in full), its trainable weights in the dtype their
master copy needs, and the fast paths switched on."""

from __future__ import annotations

import os
import re

import torch
from transformers import AutoTokenizer
from transformers.integrations import is_deepspeed_zero3_enabled

from finetune.arguments import (
    LoraArguments,
    ModelArguments,
    TrainingArguments,
    UsageError,
)
from finetune.model.attention import VARLEN, use_varlen_attention
from finetune.model.kernels import (
    apply_liger_kernels,
    compile_decoder_layers,
    native_model,
)
from finetune.model.loading import load_pretrained
from finetune.model.modeling import MiniCPMV
from finetune.model.sharded_loss import zero3_vocab_shard


def lora_targets(model: torch.nn.Module, pattern: str) -> list[str]:
    """Linear modules whose full name matches the regex (PEFT's rule for a string target)."""
    regex = re.compile(pattern)
    return [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and regex.fullmatch(name)
    ]


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
    if isinstance(model, MiniCPMV):  # the hub's code computes its own loss
        model.configure_runtime(loss_chunk_size=training_args.loss_chunk_size)
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
        raise UsageError(
            f"--lora_target_modules {lora_args.lora_target_modules!r} matches no linear module of the model"
        )
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
        if (
            isinstance(module, ModulesToSaveWrapper)
            and module.original_module is not module.modules_to_save[module.active_adapter]
        ):
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
        applied.append(
            f"loss over lm_head's vocabulary shards ({training_args.world_size} ranks; lm_head never gathered)"
        )
    if training_args.compile_layers:
        # Sequence lengths change every step: compiled for any length at once, instead of once for the first
        # length and again when the second one arrives (each ~15 s for the full-size layer on an H200).
        applied.append(
            f"torch.compile of {compile_decoder_layers(model, vision=True, dynamic=True)} layers (LLM and vision tower)"
        )
    return applied


def vocab_sharded(model) -> bool:
    """Whether the native model's loss runs on ZeRO-3's row shards of lm_head (the remote code's loss is its own)."""
    native = native_model(model)
    if not isinstance(native, MiniCPMV) or not native.runtime_options.vocab_sharded_loss:
        return False
    return zero3_vocab_shard(native.llm.lm_head, native.llm.lm_head.weight.device) is not None


def full_size(parameter: torch.nn.Parameter) -> int:
    """Elements of the whole parameter: ZeRO-3 partitions leave numel() == 0, and ds_numel is the full size."""
    return getattr(parameter, "ds_numel", parameter.numel())


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(full_size(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(full_size(p) for p in model.parameters())
