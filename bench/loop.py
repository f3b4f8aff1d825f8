"""The baseline: MiniCPM-V LoRA trained the plain transformers + PEFT way, in one process.

This is what the suite is compared against: the published model's own loss path and nothing of the suite's.
Each row builds the full-size architecture of the version asked for (MiniCPM-Llama3-V-2.5 by default,
MiniCPM-V 2.6 or 2.0) with random weights on the GPU in bf16 (finetune.synthetic.build_full_size_random; the tiny test
architecture of that version in smoke runs), makes it trainable
as finetune.py does (PEFT LoRA r64 / alpha 64 / dropout 0.05 on the LLM's q/k/v/o; the resampler, and the
vision tower in the upstream recipe, as PEFT modules_to_save), and takes optimizer steps the way
transformers.Trainer does without DeepSpeed: forward under torch.autocast(bf16), loss.backward(),
clip_grad_norm_(1.0), fused torch AdamW (lr 1e-5, betas 0.9 / 0.95, weight decay 0.1), zero_grad, and a
torch.cuda.synchronize at every step end.

The baseline's path: `model(data=..., labels=..., attention_mask=..., return_logits=True)`, so the version's
LLM class (LlamaForCausalLM, Qwen2ForCausalLM) computes the full [tokens, vocabulary] logits (128,256 / 151,666)
and transformers' ForCausalLMLoss; samples padded to the longest
(no packing); gradient checkpointing (non-reentrant) unless the row says `nogc`; sdpa attention; the trainable
resampler / vision-tower copies left in bf16 as loaded; a text-only step runs the published dummy image through
the vision tower, as upstream's model does.

Workloads: `text`, rows of random ids (every position a label; `text_rows` a step), and `mm`, a synthetic
multimodal set (bench.data) read by finetune.dataset.SupervisedDataset, `mm_batch` samples a step from a
DataLoader with workers.

Reported per row: tokens/s and samples/s over the timed steps, MFU (flops_of_batch over step time and the
datasheet peak), peak allocated and reserved GPU memory over warm-up and timed steps, and the fraction of step
time spent waiting for the DataLoader.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16, datasheet
GiB = 1024**3


@dataclass(frozen=True)
class LoopRow:
    """One baseline configuration."""

    workload: str  # text | mm
    recipe: str  # upstream (LoRA + resampler + vision tower) | lora (LoRA + resampler; vision tower frozen)
    checkpointed: bool = True  # gradient checkpointing

    @property
    def name(self) -> str:
        return f"{self.workload}_{self.recipe}_baseline" + ("" if self.checkpointed else "_nogc")


ROWS = [LoopRow(w, r, gc_on) for w in ("text", "mm") for r in ("upstream", "lora") for gc_on in (True, False)]
ROW_BY_NAME = {row.name: row for row in ROWS}


@dataclass(frozen=True)
class LoopSettings:
    steps: int = 8  # timed steps
    warmup: int = 3  # steps before the timing
    text_len: int = 2048
    text_rows: int = 1  # text rows a step
    mm_batch: int = 4  # multimodal samples a step
    workers: int = 6  # DataLoader workers (multimodal)
    tiny: bool = False  # the tiny test architecture (smoke runs; CPU works)
    version: str = "2.5"  # the MiniCPM-V version (2.5, 2.6 or 2.0)


# --- FLOP accounting ----------------------------------------------------------------------------------------


def model_shapes(model) -> dict:
    """Weight counts the FLOP formula uses, from the config (weight matrices only; norms and biases ignored)."""
    from finetune.model.kernels import native_model, tower_layers

    base = native_model(model)
    c = base.config
    d, heads, kv_heads = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = d // heads
    per_layer = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * c.intermediate_size
    # The vision tower's width from its config (2.0's timm-style tower: `vit_settings`), its depth as built.
    v = c.vit_settings if hasattr(c, "vit_settings") else c.vision_config
    vision_layers = len(tower_layers(base, "vision"))
    return {
        "llm_layer_params": per_layer * c.num_hidden_layers,
        "lm_head_params": c.vocab_size * d,
        "llm_attn_width": heads * head_dim,
        "llm_layers": c.num_hidden_layers,
        "vision_layer_params": vision_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size),
        "vision_width": v.hidden_size,
        "vision_layers": vision_layers,
        "resampler_params_per_patch": v.hidden_size * d + 2 * d * d,  # kv_proj + k,v in-projections
    }


def flops_of_batch(
    shapes: dict, seq_lengths: list[int], label_tokens: int, patches_per_view: list[int], vision_trained: bool
) -> float:
    """Model FLOPs of one optimizer step (no recomputation counted; padding and the dummy image not counted), the
    same useful work for the baseline and the suite, so MFU ratios are throughput ratios.

    LLM, frozen base + LoRA (weight gradients of the base are not computed): forward 2N + input-gradient 2N
        = 4 * N_layers * tokens + 4 * N_lm_head * label_tokens
        + causal attention 3 x (2 * T^2 * d * L) per sequence (forward QK^T + AV halved by causality; backward 2x).
    Vision tower (per view of P real patches): forward 2 * N_vis * P + 4 * P^2 * d_v * L_v, times 3 when the tower
        is trained (input + weight gradients), times 1 when frozen (nothing upstream of it needs a gradient).
    Resampler (always trained) per patch: kv_proj + k/v in-projections, 2 * N_res * P, times 3 when the tower is
        trained, times 2 when not (weight gradients only); its query side (96 or 64 queries) is negligible and not counted.
    """
    tokens = sum(seq_lengths)
    llm = 4 * shapes["llm_layer_params"] * tokens + 4 * shapes["lm_head_params"] * label_tokens
    llm += 6 * shapes["llm_attn_width"] * shapes["llm_layers"] * sum(t * t for t in seq_lengths)
    vis_factor, res_factor = (3, 3) if vision_trained else (1, 2)
    vision = 0.0
    for p in patches_per_view:
        vision += vis_factor * (
            2 * shapes["vision_layer_params"] * p + 4 * p * p * shapes["vision_width"] * shapes["vision_layers"]
        )
        vision += res_factor * 2 * shapes["resampler_params_per_patch"] * p
    return float(llm + vision)


def batch_stats(batch) -> tuple[list[int], int, list[int], int]:
    """(real sequence lengths, label tokens after the shift, patches per view, samples) of a collated batch,
    padded or packed."""
    data = batch["data"]
    labels = batch["labels"]
    label_tokens = int((labels[:, 1:] != -100).sum())
    if "sample_offsets" in data:  # packed: one row, position_ids restart per sample
        pos = data["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    elif "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(1).tolist()
    else:
        lengths = [data["input_ids"].shape[1]] * data["input_ids"].shape[0]
    patches = [
        int(h) * int(w) for sizes in data["tgt_sizes"] for h, w in torch.as_tensor(sizes).reshape(-1, 2).tolist()
    ]
    return lengths, label_tokens, patches, len(data["tgt_sizes"])


# --- the model and its steps --------------------------------------------------------------------------------


def build_model(row: LoopRow, device: torch.device, tiny: bool = False, version: str = "2.5"):
    """The row's model of MiniCPM-V `version`, trainable as finetune.py makes it, with the baseline's choices
    (above)."""
    from finetune.arguments import DEFAULT_LORA_TARGETS
    from finetune.model_setup import configure_trainable
    from finetune.synthetic import build_full_size_random, build_tiny_model, tiny_config

    if tiny:
        model = build_tiny_model(tiny_config(version=version)).to(device)
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
    else:
        model = build_full_size_random(device, dtype=torch.bfloat16, attn_implementation="sdpa", version=version)
    model.config.use_cache = False
    model.configure_runtime(
        dummy_image_stand_in=False
    )  # upstream runs the dummy image through the vision tower in text-only steps
    training_args = SimpleNamespace(tune_llm=False, tune_vision=row.recipe == "upstream", use_lora=True, tune_embeddings=False,
                                    gradient_checkpointing=row.checkpointed)  # fmt: skip
    lora_args = SimpleNamespace(
        lora_r=64,
        lora_alpha=64,
        lora_dropout=0.05,
        lora_target_modules=DEFAULT_LORA_TARGETS,
        lora_bias="none",
        q_lora=False,
    )
    model = configure_trainable(model, training_args, lora_args)
    if row.checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def text_batches(vocab: int, length: int, seed: int = 0, rows: int = 1):
    """Endless batches of `rows` rows of `length` random ids, every position a label."""
    generator = torch.Generator().manual_seed(seed)
    empty = torch.zeros(0, 2, dtype=torch.int64)
    while True:
        ids = torch.randint(0, vocab, (rows, length), generator=generator)
        yield {
            "data": {
                "input_ids": ids,
                "position_ids": torch.arange(length).expand(rows, -1),
                "pixel_values": [[] for _ in range(rows)],
                "tgt_sizes": [empty] * rows,
                "image_bound": [empty] * rows,
            },
            "labels": ids.clone(),
            "attention_mask": torch.ones_like(ids),
        }


def mm_batches(dataset, pad_id: int, settings: LoopSettings, device: torch.device):
    """Endless padded batches of `mm_batch` samples from a DataLoader with workers (shuffled, seed 0)."""
    from finetune.dataset import DataCollator

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.mm_batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=DataCollator(pad_id, packing=False),
        num_workers=settings.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=settings.workers > 0,
        prefetch_factor=4 if settings.workers > 0 else None,
    )
    while True:
        yield from loader


def to_device(batch, device):
    data = dict(batch["data"])
    data["input_ids"] = data["input_ids"].to(device, non_blocking=True)
    data["position_ids"] = data["position_ids"].to(device, non_blocking=True)
    data["pixel_values"] = [[v.to(device, non_blocking=True) for v in views] for views in data["pixel_values"]]
    out = {"data": data, "labels": batch["labels"].to(device, non_blocking=True)}
    if "attention_mask" in batch:
        out["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    return out


def train_step(model, batch, label_tokens: int, optimizer, params, autocast, device) -> torch.Tensor:
    """One optimizer step as the Trainer takes it without DeepSpeed, on the plain path; returns the loss (the
    GPU synchronised)."""
    inputs = to_device(batch, device)
    kwargs = {"data": inputs["data"], "labels": inputs["labels"], "num_items_in_batch": torch.tensor(label_tokens, device=device),
              "return_logits": True}  # fmt: skip
    if "attention_mask" in inputs:
        kwargs["attention_mask"] = inputs["attention_mask"]
    with autocast:
        loss = model(**kwargs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss


def run_row(row: LoopRow, settings: LoopSettings, device: torch.device, mm_dataset=None, pad_id: int = 0) -> dict:
    """Build the row's model, take warm-up + timed steps, and measure them."""
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(row, device, settings.tiny, settings.version)
    shapes = model_shapes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    if row.workload == "text":
        vocab = model.get_base_model().config.vocab_size
        # ids below 128000: no special token of 2.5 (from 128000) or 2.6 (<unk> 128244, 151643+); 2.0's ids 0..2 and
        # 101..112 are among them, ordinary ids in a row without image bounds
        batches = text_batches(min(vocab, 128000), settings.text_len, rows=settings.text_rows)
    else:
        batches = mm_batches(mm_dataset, pad_id, settings, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    times, waits, tokens, samples, flops, losses = [], [], 0, 0, 0.0, []
    for step in range(settings.warmup + settings.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        lengths, label_tokens, patches, nsamples = batch_stats(batch)
        losses.append(train_step(model, batch, label_tokens, optimizer, params, autocast, device).item())
        t2 = time.perf_counter()
        if step >= settings.warmup:
            times.append(t2 - t0)
            waits.append(t1 - t0)
            tokens += sum(lengths)
            samples += nsamples
            flops += flops_of_batch(shapes, lengths, label_tokens, patches, row.recipe == "upstream")
    total = sum(times)
    result = {
        "row": row.name,
        "steps_timed": settings.steps,
        "step_s_mean": total / len(times),
        "tokens_per_s": tokens / total,
        "samples_per_s": samples / total,
        "mfu": flops / total / PEAK_BF16_FLOPS,
        "data_wait_fraction": sum(waits) / total,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB if cuda else None,
        "losses": losses,
    }
    del model, optimizer, params, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result
