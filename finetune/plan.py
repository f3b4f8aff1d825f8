"""Memory planner: the settings that fit the card you have, from an explicit per-GPU memory model.

    python -m finetune.plan --gpus 1 --gpu-mem 24 [--q_lora] [--tune-vision true|false] [--target-global-batch 16]
    python -m finetune.plan --gpus 2 --gpu-mem 80 --data train.json --model openbmb/MiniCPM-Llama3-V-2_5
    python -m finetune.plan --gpus 1 --gpu-mem 24 --model openbmb/MiniCPM-V-2_6     # or --version 2.6
    python -m finetune.plan --gpus 1 --gpu-mem 24 --version 2.0                      # MiniCPM-V 2.0
    python -m finetune.plan --gpus 1 --gpu-mem 24 --emit-args      # only the flags (AUTO=1 finetune_lora.sh)
    python -m finetune.plan --validate                              # predicted vs measured peaks (markdown)

The model (GiB per GPU, predicting torch.cuda.max_memory_allocated; the card additionally needs the CUDA context
and allocator slack, HEADROOM_GIB, before a plan is said to fit):

    weights        bf16: 2 B x all parameters (8.54 B -> 15.9 GiB); q_lora: NF4 ~0.527 B (4 bits + double-quantised
                   absmax, measured) x the LLM's decoder linears + 2 B x the rest (vision, resampler, embeddings,
                   lm_head). ZeRO-3 divides them by N (never with q_lora: bnb 4-bit weights cannot be sharded).
    trainable      LoRA r on q/k/v/o (counted on the meta-device full-size model: 54.5 M at r64), resampler 89 M,
                   vision tower 418 M when tuned. Without DeepSpeed: LoRA fp32 weight 4 + grad 4 + Adam 8 bytes;
                   resampler / vision (PEFT modules_to_save copies; their gradients come last in backward, after
                   the LLM's activations are freed, and add nothing to the peak): copy + Adam - the released
                   bf16 original = 4 B a parameter in bf16 (bench loops), 10 B in fp32 (finetune.py), both
                   measured. `--optim adamw_bnb_8bit` (bitsandbytes, no DeepSpeed): Adam's states 2 bytes, not 8.
                   DDP on several GPUs: + its gradient buckets (one more gradient copy). DeepSpeed bf16: bf16
                   weights on every rank, fp32 master 4 + Adam 8 + bf16 grad 2 sharded over N (stage 1/2:
                   optimizer + grads; stage 3: weights too, and PEFT's frozen originals stay), plus the reduce
                   buckets; offload moves master, Adam and the gradient partition to the CPU.
    activations    tokens per micro-batch x a per-token constant, with activation checkpointing or without;
                   images: a per-448-px-view constant (tuned or frozen vision tower).
    logits         the chunked loss keeps one chunk of min(tokens, --loss_chunk_size) x vocab logits (bf16 + fp32 +
                   fp32 grad): 2.45 GiB at the default 2048, 0.61 GiB at 512. ZeRO-3 (parameters on the GPU, N
                   dividing the vocabulary): the loss runs on each rank's vocab / N rows of lm_head, so the
                   chunk is vocab / N wide and lm_head's 0.98 GiB is never among the gathered parameters.
    overhead       a fixed constant (buffers, cuBLAS workspaces, allocator rounding).

Calibration: the measured peaks in plan_calibration.json (one record per measured configuration: the Setup it
ran, the peak, device, date and source); `--validate` prints predicted against measured for each, and
bench/README.md has that table with how the peaks were measured.

Versions: the model is per MiniCPM-V version (`Setup.version`; `--version`, or the version of `--model`). The
parameter counts (weights, LoRA, resampler, vision tower, lm_head) and the vocabulary come from the version's
published architecture on the meta device; the activation constants are MiniCPM-Llama3-V-2.5's, scaled by the
LLM's size (checkpointed: layers x hidden, the layer inputs kept; not checkpointed: layers x (hidden +
intermediate), the tensors each layer saves), and the per-view vision constants by the vision tower's block
count (`vision_scale`: the blocks each view runs through). The constants are fitted on 2.5's records; the
MiniCPM-V 2.6 predictions (Qwen2-7B: 28 layers of 3584, vocabulary 151,666, 64 queries; the same 27-block tower)
are that fit scaled, checked against the 2.6 records (`*_v2_6`, one H200): within 2.2% with activation
checkpointing, text and multimodal, and 16-25% over without it (the compiled speed mode saves less than the
scaled constant says: the safe side). MiniCPM-V 2.0 (MiniCPM-2.4B: 40 layers of 2304, intermediate 5760,
vocabulary 122,753; 3.43 B parameters in all) takes the same scaled LLM constants, checked on its text records
(`*_v2_0`: within 4%), but its own per-view vision constants, fitted on its two multimodal records: its tower
runs a micro-batch's views as one zero-padded frame under a key mask, 3.5x (tuned) and 3.2x (frozen) the bytes
a view of 2.5's packed NaViT views.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from transformers.hf_argparser import string_to_bool

from finetune.cli import FlagParser
from finetune.model.versions import VERSIONS, UnsupportedVersionError, version_of_dict

GiB = 1024**3
HERE = Path(__file__).resolve().parent
DS_CONFIGS = {
    (2, False): HERE / "ds_config_zero2.json",
    (2, True): HERE / "ds_config_zero2_offload.json",
    (3, False): HERE / "ds_config_zero3.json",
    (3, True): HERE / "ds_config_zero3_offload.json",
}
ZERO3_LEAN_CONFIG = HERE / "ds_config_zero3_lean.json"  # no optimizer of its own: the Trainer's --optim, wrapped
CALIBRATION_FILE = HERE / "plan_calibration.json"  # the measured peaks the constants were fitted on and checked against
LOSS_CHUNK = 2048  # finetune.py's --loss_chunk_size default (label_position_loss's chunk)
SMALL_LOSS_CHUNK = 512  # the memory lever: 1.8 GiB less at 2048 labels; same FLOPs, four lm_head calls instead of one
OPTIM_8BIT = "adamw_bnb_8bit"  # transformers' name for bitsandbytes' AdamW with 8-bit states


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


HEADROOM_GIB = 1.5  # CUDA context (~0.5 GiB, outside torch's counters) + reserved-vs-allocated slack


@dataclass(frozen=True)
class Constants:
    """The memory model's calibrated constants (bytes unless named otherwise)."""

    # Fitted on H200 peaks, each on the record of plan_calibration.json named beside it (the others check it).
    nf4_bytes_per_param: float = 0.527  # 6.98 B decoder linears -> 3.43 GiB (4 bits + double-quantised absmax)
    # checkpointed LLM (32 x 4096 x 2 B layer inputs + one layer recomputed; loop_text_lora_suite)
    act_gc_bytes_per_token: float = 0.373e6
    # every decoder layer's saved tensors (LoRA q/k/v/o; loop_text_lora_suite_nogc). Compiled layers save less: the
    # compiled speed mode (speed_mode) is over-predicted by 10%, the safe side.
    act_nogc_bytes_per_token: float = 6.2e6
    # Per trained resampler / vision parameter (PEFT modules_to_save copy + Adam), beyond the 2-byte bf16 weight
    # already counted. Their gradients add nothing to the peak: backward reaches the resampler and the vision
    # tower last, after the LLM's activations and the loss chunk are freed. bf16 copies (bench loops): copy 2 +
    # Adam 4 = 6, measured 6.03 while PEFT's frozen original was still held; configure_trainable releases it now
    # (release_frozen_originals), hence - 2 (re-measured: loop_text_upstream_suite 22.09 GiB, 0.0%). fp32 copies
    # (finetune.py without DeepSpeed): copy 4 + Adam 8 - 2 = 10, measured 10.05 (upstream_adamw - lora_adamw).
    # 8-bit Adam: 6 bytes less.
    full_bytes_bf16: float = 6.03 - 2
    full_bytes_fp32: float = 10.0
    logit_bytes_per_element: float = 10.0  # bf16 logits + fp32 upcast + fp32 grad of one loss chunk (analytical)
    vision_gc_bytes_per_view: float = 96.7e6  # tuned vision tower (checkpointed) + trained resampler, per view
    # frozen vision tower + trained resampler, per view: fitted on m1_lora23, where backward stops at the frozen
    # tower (95.6e6 while it ran through it)
    vision_frozen_bytes_per_view: float = 44.4e6
    vision_nogc_bytes_per_view: float = 1.4e9  # tuned vision tower, not checkpointed: analytical, NOT measured
    # MiniCPM-V 2.0's timm-style tower runs a micro-batch's views as one zero-padded frame under a key mask
    # (vit.VisionTransformer), which takes far more a view than the NaViT tower's packed views: its own per-view
    # constants, fitted on mm_upstream_v2_0 (tuned, checkpointed) and mm_lora_v2_0 (frozen). The tower is not
    # checkpointed in 2.0's speed mode either way: vision_nogc_bytes_per_view, scaled, as for the others.
    vision_gc_bytes_per_view_v2_0: float = 335e6
    vision_frozen_bytes_per_view_v2_0: float = 140e6
    ds_bucket_elements: float = 2e8  # reduce_bucket_size of ds_config_zero2.json
    zero3_live_gib: float = 2.0  # ZeRO-3: gathered parameters in flight (embed / lm_head are 1 GiB each; analytical)
    # the same with ds_config_zero3_lean.json (max live / reuse 2e8 parameters): fitted on the pair that differs only
    # in the config, t2_upstream_z3_c512 and t2_upstream_z3lean_c512
    zero3_lean_live_gib: float = 1.0
    overhead_gib: float = 0.32  # buffers (rotary, resampler tables; 0.07 GiB) + workspaces


CONSTANTS = Constants()


@dataclass(frozen=True)
class Counts:
    total: int
    decoder_linears: int
    vision: int
    resampler: int
    vocab: int
    lm_head: int
    lora_per_rank: int  # LoRA parameters per unit of rank on the default q/k/v/o targets
    vision_blocks: int  # the vision tower's blocks, as built (2.0 drops its last: drop_vision_last_layer)


CALIBRATED_VERSION = "2.5"  # the version the constants were fitted on (2.0's per-view vision ones aside)
# The versions whose full-size architecture the planner can count (finetune.synthetic holds their published configs).
PLANNED_VERSIONS = ("2.5", "2.6", "2.0")


def published_config(version: str = CALIBRATED_VERSION):
    """The full-size config of a MiniCPM-V version as published (finetune.synthetic's reference configs)."""
    from finetune.synthetic import full_size_config

    return full_size_config(version)


@dataclass(frozen=True)
class Architecture:
    """The LLM sizes the activation constants scale with."""

    layers: int
    hidden: int
    intermediate: int

    @classmethod
    def of(cls, version: str) -> Architecture:
        config = published_config(version)
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size)


@cache
def activation_scales(version: str) -> tuple[float, float]:
    """(checkpointed, not checkpointed) per-token activation bytes of `version` relative to the calibrated 2.5:
    layers x hidden (each layer's input is kept) and layers x (hidden + intermediate) (what each layer saves).
    Exactly 1.0 for 2.5, so its predictions are unchanged."""
    if version == CALIBRATED_VERSION:
        return 1.0, 1.0
    own, calibrated = Architecture.of(version), Architecture.of(CALIBRATED_VERSION)
    checkpointed = own.layers * own.hidden / (calibrated.layers * calibrated.hidden)
    saved = (
        own.layers
        * (own.hidden + own.intermediate)
        / (calibrated.layers * (calibrated.hidden + calibrated.intermediate))
    )
    return checkpointed, saved


@cache
def vision_scale(version: str) -> float:
    """Per-view vision activation bytes of `version` relative to the calibrated 2.5: the tower's block count
    against 2.5's (each block keeps its input when checkpointed, its saved tensors when not; same width 1152 and
    up to 32 x 32 patches a view in every version). 1.0 for 2.5 and 2.6 (27 blocks), 26 / 27 for 2.0."""
    if version == CALIBRATED_VERSION:
        return 1.0
    return parameter_counts(version).vision_blocks / parameter_counts(CALIBRATED_VERSION).vision_blocks


@cache
def parameter_counts(version: str = CALIBRATED_VERSION) -> Counts:
    """Counted on the meta device from the version's published config (no memory, no weights)."""
    import torch

    from finetune.arguments import DEFAULT_LORA_TARGETS
    from finetune.model.kernels import tower_layers
    from finetune.model_setup import lora_targets
    from finetune.synthetic import build_full_size_random

    model = build_full_size_random("meta", config=published_config(version))
    targets = set(lora_targets(model, DEFAULT_LORA_TARGETS))
    decoder = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.startswith("llm.model.layers."):
                decoder += module.weight.numel()
            if name in targets:
                lora += module.in_features + module.out_features
    return Counts(
        total=sum(p.numel() for p in model.parameters()),
        decoder_linears=decoder,
        vision=sum(p.numel() for p in model.vpm.parameters()),
        resampler=sum(p.numel() for p in model.resampler.parameters()),
        vocab=model.config.vocab_size,
        lm_head=model.llm.lm_head.weight.numel(),
        lora_per_rank=lora,
        vision_blocks=len(tower_layers(model, "vision")),
    )


@dataclass(frozen=True)
class Setup:
    """One training configuration whose peak memory per GPU is predicted."""

    gpus: int = 1
    zero_stage: int = 0  # 0: no DeepSpeed (plain Trainer); 1, 2, 3: DeepSpeed ZeRO
    offload: bool = False
    gradient_checkpointing: bool = True
    micro_batch: int = 1
    tokens_per_sample: int = 2048
    views_per_sample: float = 0.0  # 448-px views per sample (images x (slices + 1))
    q_lora: bool = False
    tune_vision: bool = True
    lora_r: int = 64
    # Without DeepSpeed finetune.py keeps trainable weights in fp32 (keep_fp32_master_weights); a plain training
    # loop that leaves the resampler / vision copies in bf16 as loaded (the calibration's loop_* rows) does not.
    fp32_trainable: bool = True
    loss_chunk: int = LOSS_CHUNK  # finetune.py --loss_chunk_size
    optim_8bit: bool = False  # --optim adamw_bnb_8bit (without DeepSpeed, or with ds_config_zero3_lean.json)
    lean: bool = False  # ZeRO-3 with ds_config_zero3_lean.json: ~one layer's parameters live, the Trainer's optimizer
    # ZeRO-3: the loss on each rank's rows of lm_head where they can be (finetune.py's default; False: the runs
    # measured before it, which gathered lm_head)
    vocab_shards: bool = True
    version: str = CALIBRATED_VERSION  # the MiniCPM-V version (VERSIONS' name); the constants are 2.5's, scaled


def vision_bytes_per_view(setup: Setup, constants: Constants = CONSTANTS) -> float:
    """Activation bytes a 448-px view adds (vision tower + trained resampler): 2.5's fitted constants, scaled by
    `vision_scale` for 2.6; 2.0's own fitted ones where it has them (checkpointed tuned tower, frozen tower)."""
    if setup.tune_vision and not setup.gradient_checkpointing:
        return constants.vision_nogc_bytes_per_view * vision_scale(setup.version)
    if setup.version == "2.0":
        return (
            constants.vision_gc_bytes_per_view_v2_0
            if setup.tune_vision
            else constants.vision_frozen_bytes_per_view_v2_0
        )
    per_view = constants.vision_gc_bytes_per_view if setup.tune_vision else constants.vision_frozen_bytes_per_view
    return per_view * vision_scale(setup.version)


def predict(setup: Setup, constants: Constants = CONSTANTS) -> dict[str, float]:
    """Predicted peak allocated GiB per GPU, by term (for 2.6: 2.5's fit scaled, checked on 2.6's records; for
    2.0: the same, with its own per-view vision constants)."""
    c = parameter_counts(setup.version)
    n = setup.gpus if setup.zero_stage else 1
    lora = c.lora_per_rank * setup.lora_r
    full = c.resampler + (c.vision if setup.tune_vision else 0)  # trained in full, copied by modules_to_save
    rest = c.total - c.decoder_linears
    if setup.q_lora:
        weights = c.decoder_linears * constants.nf4_bytes_per_param + rest * 2
    else:
        weights = c.total * 2
    trainable = lora + full
    if setup.zero_stage == 0:  # LoRA fp32 weight 4 + grad 4 + Adam 8; resampler / vision: copy + grad + Adam
        adam_saved = 6 if setup.optim_8bit else 0  # two 8-bit states (+ block absmax) instead of two fp32 ones
        if not setup.fp32_trainable:
            adam_saved /= 2  # bf16 copies have bf16 Adam states: 4 bytes, 8-bit: 2
        per_full = constants.full_bytes_fp32 if setup.fp32_trainable else constants.full_bytes_bf16
        states = lora * (4 + 4 + 8 - (6 if setup.optim_8bit else 0)) + full * (per_full - adam_saved)
        if setup.gpus > 1:  # DDP's gradient buckets: a second copy of every trainable gradient (measured +2.09 GiB)
            states += lora * 4 + full * (4 if setup.fp32_trainable else 2)
    else:
        # The modules_to_save copies take the frozen originals' place (release_frozen_originals), ZeRO-3 included.
        # fp32 master + Adam m, v (8-bit: 2 bytes, the Trainer's bitsandbytes optimizer wrapped by DeepSpeed under
        # ds_config_zero3_lean.json) + the bf16 gradient partition; the fp32 copy of the gradients exists only
        # inside the optimizer step, when the activations are gone (measured: ZeRO-2 1 and 2 GPUs, ZeRO-3 2 GPUs).
        sharded = trainable * (4 + (2 if setup.optim_8bit else 8) + 2)
        if setup.offload:  # master, states and the gradient partition live in CPU memory (measured 18.05 GiB)
            sharded = 0
        states = lora * 2 + sharded / n + min(constants.ds_bucket_elements, trainable) * 2 * 2
    vocab_shards = setup.zero_stage == 3 and setup.vocab_shards and not setup.offload and c.vocab % n == 0
    if setup.zero_stage == 3:
        live = (constants.zero3_lean_live_gib if setup.lean else constants.zero3_live_gib) * GiB
        if vocab_shards:  # lm_head is never gathered (finetune.model.sharded_loss)
            live -= c.lm_head * 2
        weights = weights / n + live
        if setup.offload:  # offload_param as well in ds_config_zero3_offload.json
            weights = constants.zero3_live_gib * GiB
    tokens = setup.micro_batch * setup.tokens_per_sample
    checkpointed_scale, saved_scale = activation_scales(setup.version)
    per_token = (
        constants.act_gc_bytes_per_token * checkpointed_scale
        if setup.gradient_checkpointing
        else constants.act_nogc_bytes_per_token * saved_scale
    )
    views = setup.micro_batch * setup.views_per_sample
    activations = tokens * per_token + views * vision_bytes_per_view(setup, constants)
    logits = (
        min(tokens, setup.loss_chunk) * (c.vocab // n if vocab_shards else c.vocab) * constants.logit_bytes_per_element
    )
    terms = {
        "weights": weights / GiB,
        "optimizer_and_grads": states / GiB,
        "activations": activations / GiB,
        "logits": logits / GiB,
        "overhead": constants.overhead_gib,
    }
    terms["total"] = sum(terms.values())
    return terms


# --- the plan -----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    fits: bool
    setup: Setup | None
    predicted: dict[str, float] | None
    gpu_mem: float
    gradient_accumulation_steps: int = 1
    model_max_length: int = 2048
    max_slice_nums: int = 9
    global_batch: int = 0
    notes: list[str] = field(default_factory=list)
    message: str = ""

    def flags(self) -> list[str]:
        assert self.fits and self.setup is not None
        s = self.setup
        deepspeed = str(ZERO3_LEAN_CONFIG if s.lean else DS_CONFIGS[(s.zero_stage, s.offload)]) if s.zero_stage else ""
        flags = [
            "--deepspeed", deepspeed,
            "--per_device_train_batch_size", str(s.micro_batch),
            "--gradient_accumulation_steps", str(self.gradient_accumulation_steps),
            "--gradient_checkpointing", str(s.gradient_checkpointing).lower(),
            "--model_max_length", str(self.model_max_length),
            "--max_slice_nums", str(self.max_slice_nums),
            "--tune_vision", str(s.tune_vision).lower(),
        ]  # fmt: skip
        if s.loss_chunk != LOSS_CHUNK:
            flags += ["--loss_chunk_size", str(s.loss_chunk)]
        if s.optim_8bit:
            flags += ["--optim", OPTIM_8BIT]
        if s.q_lora:
            flags += ["--q_lora", "true"]
        return flags

    def format(self) -> str:
        if not self.fits:
            return self.message
        s = self.setup
        stage = (
            f"ZeRO-{s.zero_stage}" + (" (lean: ds_config_zero3_lean.json)" if s.lean else "")
            if s.zero_stage
            else "none (plain Trainer)"
        )
        lines = [
            f"plan for {s.gpus} GPU(s) x {self.gpu_mem:g} GiB{' (QLoRA NF4)' if s.q_lora else ''}:",
            f"  model:                   MiniCPM-V {s.version} ({VERSIONS[s.version].hub_id} architecture)",
            f"  deepspeed:               {stage}{' + CPU offload' if s.offload else ''}",
            f"  optimizer:               {'AdamW, 8-bit states (bitsandbytes)' if s.optim_8bit else 'AdamW'}",
            f"  activation checkpointing: {s.gradient_checkpointing}",
            f"  loss chunk:              {s.loss_chunk} label positions",
            f"  micro-batch per GPU:     {s.micro_batch}",
            f"  gradient accumulation:   {self.gradient_accumulation_steps} (global batch {self.global_batch})",
            f"  model_max_length:        {self.model_max_length}",
            f"  max_slice_nums:          {self.max_slice_nums}",
            f"  tune_vision:             {s.tune_vision}",
            f"  predicted peak per GPU:  {self.predicted['total']:.1f} GiB allocated (+{HEADROOM_GIB} GiB context/slack) of {self.gpu_mem:g}",
            "    " + ", ".join(f"{k} {v:.2f}" for k, v in self.predicted.items() if k != "total"),
        ]  # fmt: skip
        lines += [f"  note: {note}" for note in self.notes]
        lines.append("  flags: " + shlex.join(self.flags()))
        return "\n".join(lines)


@dataclass(frozen=True)
class Candidate:
    zero_stage: int
    offload: bool
    gradient_checkpointing: bool
    loss_chunk: int = LOSS_CHUNK
    optim_8bit: bool = False
    lean: bool = False


def candidates(gpus: int, q_lora: bool) -> list[Candidate]:
    """Memory levers in the order they cost speed, fastest first (H200, 2048-token text rows, upstream recipe,
    tokens/s per GPU; the runs are in bench/README.md): checkpointing; a smaller loss chunk; 8-bit optimizer states
    (plain Trainer / DDP: 3411 and 4026 in two calls, against 4207 with fp32 AdamW states); ZeRO-2 with CPU offload
    (1957); ZeRO-3 (698 a GPU on 2 GPUs: it gathers every layer's weights again in the checkpointed backward), in
    its lean form with 8-bit AdamW states (ds_config_zero3_lean.json: 2.6 GiB less per GPU than
    ds_config_zero3.json); ZeRO-3 with parameter offload as the last resort."""
    base = 0 if gpus == 1 else 2
    out = [Candidate(base, False, False), Candidate(base, False, True), Candidate(base, False, True, SMALL_LOSS_CHUNK),
           Candidate(0, False, True, SMALL_LOSS_CHUNK, optim_8bit=True), Candidate(2, True, True, SMALL_LOSS_CHUNK)]  # fmt: skip
    if gpus > 1 and not q_lora:
        out.append(Candidate(3, False, True, SMALL_LOSS_CHUNK, optim_8bit=True, lean=True))
    if not q_lora:
        out.append(Candidate(3, True, True, SMALL_LOSS_CHUNK))
    return out


def make_plan(
    gpus: int,
    gpu_mem: float,
    *,
    q_lora: bool = False,
    tune_vision: bool = True,
    target_global_batch: int = 16,
    model_max_length: int = 2048,
    views_per_sample: float | None = None,
    max_slice_nums: int = 9,
    lora_r: int = 64,
    constants: Constants = CONSTANTS,
    version: str = CALIBRATED_VERSION,
) -> Plan:
    if gpus < 1 or gpu_mem <= 0:
        return Plan(False, None, None, gpu_mem, message="plan: --gpus must be >= 1 and --gpu-mem > 0")
    budget = gpu_mem - HEADROOM_GIB
    notes = []
    slices = max_slice_nums
    while True:
        # Worst case without data: one image of `slices` slices + its overview per sample.
        views = views_per_sample if views_per_sample is not None else float(slices + 1)
        for candidate in candidates(gpus, q_lora):
            best = None
            for micro in (8, 4, 2, 1):
                if micro > max(1, target_global_batch // gpus):
                    continue
                setup = Setup(gpus, candidate.zero_stage, candidate.offload, candidate.gradient_checkpointing, micro,
                              model_max_length, views, q_lora, tune_vision, lora_r, loss_chunk=candidate.loss_chunk,
                              optim_8bit=candidate.optim_8bit, lean=candidate.lean, version=version)  # fmt: skip
                predicted = predict(setup, constants)
                if predicted["total"] <= budget:
                    best = (setup, predicted)
                    break
            if best is not None:
                setup, predicted = best
                accumulation = max(1, math.ceil(target_global_batch / (gpus * setup.micro_batch)))
                if setup.offload:
                    notes.append("optimizer states offloaded to CPU: slower steps, needs host RAM")
                if setup.optim_8bit:
                    needs = "" if bitsandbytes_installed() else ": needs `pip install bitsandbytes`"
                    notes.append(f"8-bit AdamW states (bitsandbytes){needs}")
                if slices != max_slice_nums:
                    notes.append(f"max_slice_nums lowered {max_slice_nums} -> {slices} to fit")
                if version != CALIBRATED_VERSION:
                    notes.append(f"MiniCPM-V {version}: the {CALIBRATED_VERSION} calibration scaled to its sizes "
                                 "(checked on H200 peaks: python -m finetune.plan --validate)")  # fmt: skip
                return Plan(True, setup, predicted, gpu_mem, accumulation, model_max_length, slices,
                            gpus * setup.micro_batch * accumulation, notes)  # fmt: skip
        if views_per_sample is not None or slices <= 1:
            break
        slices = {9: 4, 4: 2, 2: 1}.get(slices, 1)
    last = candidates(gpus, q_lora)[-1]
    fewest_views = 2.0 if views_per_sample is None else views_per_sample
    smallest = predict(Setup(gpus, last.zero_stage, last.offload, True, 1, model_max_length, fewest_views, q_lora, tune_vision,
                             lora_r, loss_chunk=last.loss_chunk, version=version), constants)  # fmt: skip
    hints = []
    if not q_lora:
        hints.append("--q_lora")
    if tune_vision:
        hints.append("--tune-vision false")
    if model_max_length > 1024:
        hints.append("a shorter --model_max_length")
    message = (
        f"plan: does not fit: {gpus} GPU(s) x {gpu_mem:g} GiB; the smallest configuration needs "
        f"{smallest['total'] + HEADROOM_GIB:.1f} GiB per GPU"
        + (f" (try {', '.join(hints)}, or more GPUs)" if hints else " (more GPUs or a larger card)")
    )
    return Plan(False, None, smallest, gpu_mem, message=message)


def data_statistics(model: str, data: str, max_slice_nums: int | None) -> tuple[int, float, dict]:
    """model_max_length (p99 rounded up to 64) and mean views per sample, via finetune.validation.validate_dataset."""
    from finetune.dataset import DataSettings
    from finetune.validation import validate_dataset

    report = validate_dataset(model, DataSettings(data, model_max_length=None, max_slice_nums=max_slice_nums))
    split = report.splits[0]
    if not split.lengths:
        raise SystemExit(f"plan: no usable samples in {data}")
    usable = [r for r in split.results if r.status != "bad"]
    views = sum(sum(r.views_per_image) for r in usable) / len(usable)
    return split.suggested_max_length(), views, split.percentiles()


# --- validation against measured peaks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One measured configuration: the Setup it ran and its peak allocated GiB (the worst rank), with where,
    when and how it was measured."""

    name: str
    setup: Setup
    peak_gib: float
    device: str
    date: str
    versions: str
    source: str
    note: str = ""

    def record(self) -> dict:
        """The measurement as a record of the calibration file."""
        return {"name": self.name, "setup": asdict(self.setup), "measured_peak_gib": self.peak_gib, "device": self.device,
                "date": self.date, "versions": self.versions, "source": self.source, "note": self.note}  # fmt: skip

    @classmethod
    def from_record(cls, record: dict) -> Measurement:
        return cls(record["name"], Setup(**record["setup"]), float(record["measured_peak_gib"]), record["device"], record["date"],
                   record["versions"], record["source"], record.get("note", ""))  # fmt: skip


def load_calibration(path: str | Path = CALIBRATION_FILE) -> list[Measurement]:
    """The measured configurations of a calibration file (`{"records": [...]}`; `python -m bench memory
    --calibration PATH` adds and refreshes records)."""
    return [Measurement.from_record(record) for record in json.loads(Path(path).read_text())["records"]]


def validation_markdown(measurements: list[Measurement], constants: Constants = CONSTANTS) -> str:
    """Predicted against measured peak allocated GiB, one row per measured configuration."""
    lines = ["| configuration | GPUs | predicted GiB | measured GiB | error | measured | note |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    for m in measurements:
        predicted = predict(m.setup, constants)["total"]
        error = 100 * (predicted - m.peak_gib) / m.peak_gib
        lines.append(
            f"| {m.name} | {m.setup.gpus} | {predicted:.2f} | {m.peak_gib:.2f} | {error:+.1f}% | {m.date}, {m.device} | {m.note} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="python -m finetune.plan", description="settings that fit your GPUs")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--gpu-mem", type=float, help="GiB of memory per GPU")
    parser.add_argument("--data", help="training data (model_max_length and views per sample from its lengths)")
    parser.add_argument(
        "--model",
        help="checkpoint (directory or hub id): its version's architecture is planned for, its tokenizer reads "
        "--data (default: the --version's published checkpoint)",
    )
    parser.add_argument(
        "--version",
        choices=list(PLANNED_VERSIONS),
        help=f"MiniCPM-V version (default: --model's, else {CALIBRATED_VERSION})",
    )
    parser.add_argument("--q_lora", "--q-lora", action="store_true", help="4-bit NF4 LLM (bitsandbytes)")
    parser.add_argument("--target-global-batch", type=int, default=16)
    parser.add_argument("--tune-vision", type=string_to_bool, default=True)
    parser.add_argument("--max-slice-nums", type=int, default=9)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--emit-args", action="store_true", help="print only the finetune.py flags (shell-quoted)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--validate",
        nargs="?",
        const=str(CALIBRATION_FILE),
        metavar="CALIBRATION_JSON",
        help="predicted vs measured peaks (markdown) for the measured configurations of a calibration "
        "file (default: the one shipped with the planner)",
    )
    return parser


def planned_version(model: str | None, version: str | None) -> str:
    """The version to plan for: --version, else --model's (its config.json, read locally or from the local hub
    cache; a published checkpoint's hub id), else the calibrated 2.5. ValueError (one line) when the model's version
    is not implemented, cannot be told offline, or differs from --version."""
    from finetune.base_identity import local_model_dir

    if model is None:
        return version or CALIBRATED_VERSION
    directory = local_model_dir(model)
    if directory is not None and (directory / "config.json").is_file():
        try:
            found = version_of_dict(json.loads((directory / "config.json").read_text())).name
        except UnsupportedVersionError as error:
            raise ValueError(f"--model {model}: {error}") from None
        if found not in PLANNED_VERSIONS:
            raise ValueError(
                f"--model {model} is MiniCPM-V {found}: the planner models {', '.join(PLANNED_VERSIONS)} only; "
                "pick the settings by hand (README: settings for the card you have)"
            )
    else:
        found = next((v.name for v in VERSIONS.values() if v.hub_id == model), None)
        if found is None:
            if version is None:
                raise ValueError(f"--model {model}: no local config.json to read its version from; pass --version")
            return version
    if version is not None and version != found:
        raise ValueError(f"--version {version} but --model {model} is MiniCPM-V {found}")
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.validate:
        print(validation_markdown(load_calibration(args.validate)))
        return 0
    if args.gpu_mem is None:
        print("plan: --gpu-mem GiB is required", file=sys.stderr)
        return 2
    try:
        version = planned_version(args.model, args.version)
    except ValueError as error:
        print(f"plan: {error}", file=sys.stderr)
        return 2
    model_max_length, views, stats = 2048, None, None
    if args.data:
        model = args.model or VERSIONS[version].hub_id
        model_max_length, views, stats = data_statistics(model, args.data, args.max_slice_nums)
    plan = make_plan(args.gpus, args.gpu_mem, q_lora=args.q_lora, tune_vision=args.tune_vision,
                     target_global_batch=args.target_global_batch, model_max_length=model_max_length,
                     views_per_sample=views, max_slice_nums=args.max_slice_nums, lora_r=args.lora_r,
                     version=version)  # fmt: skip
    if not plan.fits:
        print(plan.message, file=sys.stderr)
        return 1
    if stats:
        plan.notes.append(f"data token lengths {stats}; mean views per sample {views:.2f}")
    if args.emit_args:
        print(shlex.join(plan.flags()))
    elif args.json:
        print(json.dumps({"setup": asdict(plan.setup), "predicted_gib": plan.predicted, "flags": plan.flags(),
                          "gradient_accumulation_steps": plan.gradient_accumulation_steps, "notes": plan.notes}, indent=1))  # fmt: skip
    else:
        print(plan.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
