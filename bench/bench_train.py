"""Training-step benchmark of MiniCPM-Llama3-V-2.5 LoRA fine-tuning: plain transformers+PEFT baseline vs the suite.

    python3 bench/bench_train.py [--config ROW[,ROW...]|all] [--steps 8] [--warmup 2] [--json out.json]
    python3 bench/bench_train.py --list                    # the rows
    python3 bench/bench_train.py --tiny --config all      # smoke test of the code paths (tiny model, CPU ok)

Each row builds the FULL-SIZE model with random weights directly on the GPU in bf16
(finetune.model.builders.build_full_size_random), makes it trainable exactly as finetune.py does
(finetune.finetune.configure_trainable: PEFT LoRA r64/alpha64/dropout0.05 on llm q/k/v/o, resampler -- and the
vision tower when tuned -- as PEFT modules_to_save), and runs optimizer steps the way transformers.Trainer does
without DeepSpeed (forward under torch.autocast(bf16) -- accelerate's bf16 mixed precision --, loss.backward(),
clip_grad_norm_(1.0), fused torch AdamW, zero_grad). Parameter dtypes: PEFT keeps LoRA A/B in fp32
(autocast_adapter_dtype); the trainable copies of resampler / vision tower stay bf16 as loaded (what the Trainer
does without DeepSpeed), so their AdamW states are bf16 too; `--fp32-trainable` upcasts them to fp32.

Modes:
  baseline  plain transformers + PEFT: model(..., return_logits=True) -> LlamaForCausalLM computes the full
            [tokens, 128256] logits and transformers' ForCausalLMLoss; padding (no packing); gradient
            checkpointing (non-reentrant); sdpa; a text-only step runs the published dummy image through the
            vision tower (the suite gives its zero gradients without running it: MiniCPMV.dummy_image_stand_in).
  baseline_nogc
            the same without gradient checkpointing (the issue's second baseline: 10.6k tokens/s at 32.1 GiB).
  suite     the suite's path: model(data=..., labels=..., num_items_in_batch=...) -> label-position chunked loss
            (finetune.model.modeling.label_position_loss); packing (one row) where the batch has >1 sample;
            gradient checkpointing; sdpa.
  suite_nogc the suite path with gradient checkpointing OFF ("speed mode" lever).
  suite_fast, suite_nogc_fast
            the same two with the fast paths of --fast-kernels, comma-separated: "liger" (liger-kernel's RMSNorm /
            SwiGLU / RoPE + fused linear cross-entropy), "compile" (torch.compile of each decoder layer, dynamic
            shapes), "varlen" (each sample of a packed row attended on its own: finetune.model.attention); with
            "varlen", "vision-varlen" attends each image strip of the vision tower on its own too (packed, no mask);
            with "compile", "vision-compile" compiles the vision tower's encoder layers too. finetune.py's CUDA
            default is "varlen,vision-varlen,compile,vision-compile".

Workloads:
  text  --text-rows rows (default 1) of --text-len (2048) random ids a step, every position a label.
  mm    synthetic multimodal conversations built by finetune.dataset.SupervisedDataset over a generated JSON with
        JPEG images of 400..2000 px (sliced by the real rule, SliceSettings(448, 14, 9, 96)), 1-3 turns, sample
        lengths 300..2000 tokens; DataLoader with workers, --mm-batch samples per step (suite packs them into one
        row; baseline pads them).

Reported per row: tokens/s, samples/s, MFU (model FLOPs / time / peak; see flops_of_batch), peak allocated and
reserved GPU memory (torch.cuda.max_memory_allocated / max_memory_reserved over warm-up + timed steps), and the
fraction of step time spent waiting for the DataLoader (torch.cuda.synchronize at each step end).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16, datasheet (KINDS.md measured ~790e12 on random matmuls)
GiB = 1024**3


@dataclass(frozen=True)
class Row:
    name: str
    workload: str  # text | mm
    recipe: str  # upstream (LoRA + resampler + vision tower) | lora (LoRA + resampler; vision frozen)
    mode: str  # baseline | baseline_nogc | suite | suite_nogc | suite_fast | suite_nogc_fast

    @property
    def baseline(self) -> bool:
        """plain transformers + PEFT (with or without checkpointing), as against the suite's path"""
        return self.mode.startswith("baseline")

    @property
    def checkpointed(self) -> bool:
        """gradient checkpointing on (every mode but the *_nogc ones)"""
        return "nogc" not in self.mode


ROWS = [
    Row(f"{w}_{r}_{m}", w, r, m)
    for w in ("text", "mm")
    for r in ("upstream", "lora")
    for m in ("baseline", "baseline_nogc", "suite", "suite_nogc", "suite_fast", "suite_nogc_fast")
]
ROW_BY_NAME = {row.name: row for row in ROWS}
DEFAULT_ROWS = [
    "text_upstream_baseline", "text_upstream_suite", "text_lora_baseline", "text_lora_suite",
    "text_upstream_suite_nogc", "text_lora_suite_nogc",
    "mm_upstream_baseline", "mm_upstream_suite", "mm_lora_baseline", "mm_lora_suite",
]  # fmt: skip


# --- synthetic multimodal data --------------------------------------------------------------------------------

WORDS = (
    "the a picture shows red green blue yellow circle square triangle left right top bottom corner near far "
    "large small bright dark shape colour background object scene there is are with and of in on at next "
    "which what where how many count describe detail answer question image text line row column table chart"
).split()


def _photo(rng: random.Random, size: tuple[int, int]):
    """A smooth random image (low-res noise upsampled): decodes like a photo, costs little to make."""
    import numpy as np
    from PIL import Image

    small = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def _encoded_length(sample: dict, encoder) -> int:
    """Tokens of a sample as the training data path encodes it (no pixels loaded)."""
    from finetune.dataset import parse_record, prepare_sample

    return len(prepare_sample(parse_record(sample, sample["id"]), encoder, None, load_pixels=False).input_ids)


def _made_with(data_path: str, params_path: str, params: dict) -> bool:
    """Whether data_path is a finished set made with `params` (its parameters file matches) whose images exist."""
    try:
        with open(params_path) as handle:
            if json.load(handle) != params:
                return False
        with open(data_path) as handle:
            return all(os.path.exists(sample["image"]) for sample in json.load(handle))
    except (OSError, ValueError, KeyError, TypeError):
        return False


# The statistics of the set upstream's published 1.35 samples/s was measured on (issue 5): images 448..1920 px,
# 2-4 exchanges, 846 tokens and 5.7 views per sample on average. With the demo tokenizer and seed 0 these
# parameters give 64 samples of 865 tokens (453..1380) and 5.69 views on average (make_datasets.py prints them).
UPSTREAM_LIKE = {"min_len": 300, "max_len": 1400, "sides": (448, 1920), "turns": (2, 4), "mean_views": 5.7}


def make_mm_dataset(
    folder: str, num: int, tokenizer, settings, seed: int = 0, min_len: int = 300, max_len: int = 2000,
    sides: tuple[int, int] = (400, 2000), turns: tuple[int, int] = (1, 3), mean_views: float | None = None,
) -> str:  # fmt: skip
    """Write `num` samples (JPEG `sides` px per side, uniform; `turns` user/assistant exchanges, image in the
    first user turn) whose encoded length is close to a uniform target in [min_len, max_len]. Returns the JSON
    path.

    With `mean_views`, each image is the one of 8 candidates (sides log-uniform in `sides`) whose view count
    (the real slicing rule) brings the set's running mean closest to `mean_views`: a set with a given average
    vision load, as upstream's published measurement had (UPSTREAM_LIKE).

    A set already in `folder` made with the same parameters (train.params.json beside train.json, written last)
    whose images are all there is reused, not rebuilt."""
    from dataclasses import asdict

    from finetune.dataset import ConversationEncoder
    from finetune.model.image_processing import plan_slices

    data_path = os.path.join(folder, "train.json")
    params_path = os.path.join(folder, "train.params.json")
    params = {"num": num, "seed": seed, "min_len": min_len, "max_len": max_len, "settings": asdict(settings), "vocab": len(tokenizer)}
    if (sides, turns, mean_views) != ((400, 2000), (1, 3), None):
        params.update(sides=list(sides), turns=list(turns), mean_views=mean_views)
    if _made_with(data_path, params_path, params):
        print(f"[data] reusing {data_path} (made with the same parameters)", flush=True)
        return data_path
    if os.path.exists(params_path):
        os.remove(params_path)  # a build cut short must not pass for a finished one
    rng = random.Random(seed)
    encoder = ConversationEncoder(tokenizer, settings)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    samples = []
    views_so_far = 0
    for index in range(num):
        if mean_views is None:
            size = (rng.randint(*sides), rng.randint(*sides))
        else:
            log_side = lambda: round(math.exp(rng.uniform(math.log(sides[0]), math.log(sides[1]))))  # noqa: E731
            candidates = [(log_side(), log_side()) for _ in range(8)]
            views = {c: len(plan_slices(c, settings).view_sizes()) for c in candidates}
            size = min(candidates, key=lambda c: abs((views_so_far + views[c]) / (index + 1) - mean_views))
            views_so_far += views[size]
        path = os.path.join(folder, "images", f"{index:04d}.jpg")
        _photo(rng, size).save(path, quality=90)
        target = rng.randint(min_len, max_len)
        exchanges = rng.randint(*turns)
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(max(1, n)))  # noqa: E731
        answer_words = [rng.randint(5, 40) for _ in range(exchanges)]
        sample = None
        for _ in range(6):  # scale the answers until the encoded length is near the target
            conversations = []
            for turn in range(exchanges):
                question = words(rng.randint(4, 12)) + "?"
                conversations.append({"role": "user", "content": ("<image>\n" if turn == 0 else "") + question})
                conversations.append({"role": "assistant", "content": words(answer_words[turn])})
            sample = {"id": f"mm{index}", "image": path, "conversations": conversations}
            length = _encoded_length(sample, encoder)
            if abs(length - target) <= 16 or length > max_len:
                break
            text = sum(answer_words)
            grow = max(0.1, (target - length) / max(1, text * 2.5) + 1)  # ~2.5 tokens a word with the demo BPE
            answer_words = [max(1, int(round(n * grow))) for n in answer_words]
        if length > max_len:  # the image alone may take ~1000 tokens: trim the answers back
            answer_words = [max(1, n // 3) for n in answer_words]
            conversations = [dict(m) for m in conversations]
            for turn in range(exchanges):
                conversations[2 * turn + 1]["content"] = words(answer_words[turn])
            sample = {"id": f"mm{index}", "image": path, "conversations": conversations}
        samples.append(sample)
    with open(data_path, "w") as handle:
        json.dump(samples, handle)
    with open(params_path, "w") as handle:
        json.dump(params, handle)
    return data_path


def mm_set_stats(data_path: str, tokenizer, settings) -> dict:
    """A multimodal set's averages per sample: encoded tokens, image views (the real slicing rule), exchanges."""
    from PIL import Image

    from finetune.dataset import ConversationEncoder
    from finetune.model.image_processing import plan_slices

    encoder = ConversationEncoder(tokenizer, settings)
    with open(data_path) as handle:
        samples = json.load(handle)
    tokens = [_encoded_length(sample, encoder) for sample in samples]
    views = []
    for sample in samples:
        with Image.open(sample["image"]) as image:
            views.append(len(plan_slices(image.size, settings).view_sizes()))
    return {
        "samples": len(samples), "mean_tokens": sum(tokens) / len(tokens), "min_tokens": min(tokens), "max_tokens": max(tokens),
        "mean_views": sum(views) / len(views), "mean_exchanges": sum(len(s["conversations"]) // 2 for s in samples) / len(samples),
    }  # fmt: skip


def make_text_dataset(folder: str, num: int, tokenizer, settings, length: int = 2048, seed: int = 0) -> str:
    """Write `num` text-only samples (one question, one long answer) whose encoded length is in
    [length - 24, length]: the Trainer-path counterpart of bench_train's 2048-token text rows (the labels are the
    answer and its <|eot_id|>, ~98% of the row). Returns the JSON path."""
    from finetune.dataset import ConversationEncoder

    rng = random.Random(seed)
    encoder = ConversationEncoder(tokenizer, settings)
    samples = []
    for index in range(num):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "?"
        vocabulary = [rng.choice(WORDS) for _ in range(4 * length)]

        def encoded(words: int) -> tuple[int, dict]:
            sample = {"id": f"text{index}", "conversations": [
                {"role": "user", "content": question}, {"role": "assistant", "content": " ".join(vocabulary[:words])}]}  # fmt: skip
            return _encoded_length(sample, encoder), sample

        low, high = 1, len(vocabulary)  # the longest answer that still fits (length grows with the word count)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if encoded(middle)[0] <= length else (low, middle - 1)
        tokens, sample = encoded(low)
        if not length - 24 <= tokens <= length:
            raise RuntimeError(f"text sample {index}: {tokens} tokens, wanted {length - 24}..{length}")
        samples.append(sample)
    os.makedirs(folder, exist_ok=True)
    data_path = os.path.join(folder, "train.json")
    with open(data_path, "w") as handle:
        json.dump(samples, handle)
    return data_path


def infinite(loader):
    while True:
        yield from loader


# --- FLOP accounting ----------------------------------------------------------------------------------------


def model_shapes(model) -> dict:
    """Weight counts the FLOP formula uses, from the config (weight matrices only; norms and biases ignored)."""
    from finetune.model.kernels import native_model

    base = native_model(model)
    c = base.config
    d, heads, kv_heads = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = d // heads
    per_layer = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * c.intermediate_size
    v = c.vision_config
    return {
        "llm_layer_params": per_layer * c.num_hidden_layers,
        "lm_head_params": c.vocab_size * d,
        "llm_attn_width": heads * head_dim,
        "llm_layers": c.num_hidden_layers,
        "vision_layer_params": v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size),
        "vision_width": v.hidden_size,
        "vision_layers": v.num_hidden_layers,
        "resampler_params_per_patch": v.hidden_size * d + 2 * d * d,  # kv_proj + k,v in-projections
    }


def flops_of_batch(shapes: dict, seq_lengths: list[int], label_tokens: int, patches_per_view: list[int], vision_trained: bool) -> float:
    """Model FLOPs of one optimizer step (no recomputation counted; padding and the dummy image not counted).

    LLM, frozen base + LoRA (weight gradients of the base are not computed): forward 2N + input-gradient 2N
        = 4 * N_layers * tokens + 4 * N_lm_head * label_tokens
        + causal attention 3 x (2 * T^2 * d * L) per sequence (forward QK^T + AV halved by causality; backward 2x).
    Vision tower (per view of P real patches): forward 2 * N_vis * P + 4 * P^2 * d_v * L_v, times 3 when the tower
        is trained (input + weight gradients), times 1 when frozen (nothing upstream of it needs a gradient).
    Resampler (always trained) per patch: kv_proj + k/v in-projections, 2 * N_res * P, times 3 when the tower is
        trained, times 2 when not (weight gradients only); its 96-query side is negligible and not counted.
    """
    tokens = sum(seq_lengths)
    llm = 4 * shapes["llm_layer_params"] * tokens + 4 * shapes["lm_head_params"] * label_tokens
    llm += 6 * shapes["llm_attn_width"] * shapes["llm_layers"] * sum(t * t for t in seq_lengths)
    vis_factor, res_factor = (3, 3) if vision_trained else (1, 2)
    vision = 0.0
    for p in patches_per_view:
        vision += vis_factor * (2 * shapes["vision_layer_params"] * p + 4 * p * p * shapes["vision_width"] * shapes["vision_layers"])
        vision += res_factor * 2 * shapes["resampler_params_per_patch"] * p
    return float(llm + vision)


# --- model set-up -------------------------------------------------------------------------------------------


def build_model(row: Row, args, device):
    from finetune.finetune import DEFAULT_LORA_TARGETS, configure_trainable
    from finetune.model.builders import build_full_size_random, build_tiny_model, tiny_config

    if args.tiny:
        model = build_tiny_model(tiny_config()).to(device)
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
    else:
        model = build_full_size_random(device, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    model.dummy_image_stand_in = not row.baseline  # upstream runs the dummy image in text-only steps
    gc_on = row.checkpointed
    training_args = SimpleNamespace(tune_llm=False, tune_vision=row.recipe == "upstream", use_lora=True, tune_embeddings=False, gradient_checkpointing=gc_on)
    lora_args = SimpleNamespace(lora_r=64, lora_alpha=64, lora_dropout=0.05, lora_target_modules=DEFAULT_LORA_TARGETS, lora_bias="none", q_lora=False)
    model = configure_trainable(model, training_args, lora_args)
    if args.fp32_trainable:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if row.mode.endswith("_fast"):
        from finetune.model.attention import use_varlen_attention
        from finetune.model.kernels import apply_liger_kernels, compile_decoder_layers

        kernels = args.fast_kernels.split(",")
        if "varlen" in kernels:
            use_varlen_attention(model, vision="vision-varlen" in kernels)
        if "liger" in kernels:
            apply_liger_kernels(model)
        if "compile" in kernels:
            compile_decoder_layers(model, vision="vision-compile" in kernels, dynamic=True)  # as finetune.py compiles them
    model.train()
    return model


def dtype_summary(model) -> dict:
    out: dict[str, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = str(p.dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + p.numel()
    return out


def to_device(batch, device):
    data = dict(batch["data"])
    data["input_ids"] = data["input_ids"].to(device, non_blocking=True)
    data["position_ids"] = data["position_ids"].to(device, non_blocking=True)
    data["pixel_values"] = [[v.to(device, non_blocking=True) for v in views] for views in data["pixel_values"]]
    out = {"data": data, "labels": batch["labels"].to(device, non_blocking=True)}
    if "attention_mask" in batch:
        out["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    return out


def batch_stats(batch) -> tuple[list[int], int, list[int], int]:
    """(real sequence lengths, label tokens after the shift, patches per view, samples)."""
    data = batch["data"]
    labels = batch["labels"]
    label_tokens = int((labels[:, 1:] != -100).sum())
    if "sample_offsets" in data:  # packed: one row, position_ids restart per sample
        pos = data["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    elif "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(1).tolist()
    else:
        lengths = [data["input_ids"].shape[1]] * data["input_ids"].shape[0]
    patches = [int(h) * int(w) for sizes in data["tgt_sizes"] for h, w in torch.as_tensor(sizes).reshape(-1, 2).tolist()]
    return lengths, label_tokens, patches, len(data["tgt_sizes"])


# --- one row ----------------------------------------------------------------------------------------------------


def text_batches(vocab: int, length: int, seed: int = 0, rows: int = 1):
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


def mm_batches(row: Row, args, env):
    from finetune.dataset import DataCollator

    collator = DataCollator(env["pad_id"], packing=not row.baseline)
    loader = torch.utils.data.DataLoader(
        env["mm_dataset"],
        batch_size=args.mm_batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collator,
        num_workers=args.workers,
        pin_memory=env["device"].type == "cuda",
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    return infinite(loader)


def train_step(model, batch, label_tokens: int, optimizer, params, autocast, baseline: bool, device) -> torch.Tensor:
    """One optimizer step as the Trainer takes it without DeepSpeed; returns the loss (synchronised)."""
    inputs = to_device(batch, device)
    kwargs = {"data": inputs["data"], "labels": inputs["labels"], "num_items_in_batch": torch.tensor(label_tokens, device=device)}
    if "attention_mask" in inputs:
        kwargs["attention_mask"] = inputs["attention_mask"]
    if baseline:
        kwargs["return_logits"] = True
    with autocast:
        loss = model(**kwargs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss


def profile_steps(row: Row, args, model, batches, optimizer, params, autocast, baseline: bool, device, steps: int = 2) -> None:
    """torch.profiler over `steps` more steps (after the timed ones, so timing is unaffected): the kernels by
    self device time, written to PROFILE_DIR/<row>.txt, and the chrome trace to PROFILE_DIR/<row>.trace.json."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:  # the stacks: for bench/gpu_gaps.py
        for _ in range(steps):
            batch = next(batches)
            train_step(model, batch, batch_stats(batch)[1], optimizer, params, autocast, baseline, device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    os.makedirs(args.profile_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(args.profile_dir, f"{row.name}.trace.json"))
    with open(os.path.join(args.profile_dir, f"{row.name}.txt"), "w") as handle:
        handle.write(f"{row.name}: {steps} steps after the timed ones, by {sort}\n")
        handle.write(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70))


def run_row(row: Row, args, env) -> dict:
    device = env["device"]
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    model = build_model(row, args, device)
    trainable = dtype_summary(model)
    shapes = model_shapes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    build_s = time.perf_counter() - t_build

    vocab = model.get_base_model().config.vocab_size
    text_len = args.text_len if not args.tiny else 256
    batches = text_batches(min(vocab, 128000), text_len, rows=args.text_rows) if row.workload == "text" else mm_batches(row, args, env)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    baseline = row.baseline
    times, waits, tokens, samples, flops, losses = [], [], 0, 0, 0.0, []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        lengths, label_tokens, patches, nsamples = batch_stats(batch)
        loss = train_step(model, batch, label_tokens, optimizer, params, autocast, baseline, device)
        t2 = time.perf_counter()
        losses.append(float(loss))
        if step >= args.warmup:
            times.append(t2 - t0)
            waits.append(t1 - t0)
            tokens += sum(lengths)
            samples += nsamples
            flops += flops_of_batch(shapes, lengths, label_tokens, patches, row.recipe == "upstream")
    if args.profile_dir:
        profile_steps(row, args, model, batches, optimizer, params, autocast, baseline, device)
    total = sum(times)
    result = {
        "row": row.name,
        "workload": row.workload,
        "recipe": row.recipe,
        "mode": row.mode,
        "gradient_checkpointing": row.checkpointed,
        "fast_kernels": args.fast_kernels if row.mode.endswith("_fast") else None,
        "packing": not row.baseline and row.workload == "mm",
        "rows_per_step": args.text_rows if row.workload == "text" else None,
        "steps_timed": args.steps,
        "warmup": args.warmup,
        "step_s_mean": total / max(1, len(times)),
        "tokens_per_s": tokens / total,
        "samples_per_s": samples / total,
        "tflops_per_s": flops / total / 1e12,
        "mfu": flops / total / PEAK_BF16_FLOPS,
        "data_wait_fraction": sum(waits) / total,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB if cuda else None,
        "trainable_params_by_dtype": trainable,
        "loss_first_last": [losses[0], losses[-1]],
        "build_s": build_s,
        "tokens_timed": tokens,
        "samples_timed": samples,
    }
    del model, optimizer, params, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


# --- output -------------------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    head = "| row | tok/s | samples/s | MFU | TFLOP/s | peak alloc GiB | peak reserved GiB | data wait | step s |"
    lines = [head, "|" + "---|" * 9]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error'][:80]} |" + " |" * 7)
            continue
        gib = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['row']} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | {100 * r['mfu']:.1f}% | {r['tflops_per_s']:.0f} | "
            f"{gib(r['peak_allocated_gib'])} | {gib(r['peak_reserved_gib'])} | {100 * r['data_wait_fraction']:.1f}% | {r['step_s_mean']:.3f} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[str]:
    by = {r["row"]: r for r in results if "error" not in r}
    out = []
    for w in ("text", "mm"):
        for recipe in ("upstream", "lora"):
            base = by.get(f"{w}_{recipe}_baseline")
            for mode in ("baseline_nogc", "suite", "suite_nogc", "suite_fast", "suite_nogc_fast"):
                other = by.get(f"{w}_{recipe}_{mode}")
                if base and other:
                    out.append(f"{w}/{recipe}: {mode} vs baseline tokens/s = {other['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="comma-separated rows, 'default' or 'all' (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=2048)
    parser.add_argument("--text-rows", type=int, default=1, help="text rows (samples) a step, in every mode")
    parser.add_argument("--mm-batch", type=int, default=4, help="samples per step in the multimodal rows")
    parser.add_argument("--mm-samples", type=int, default=64)
    parser.add_argument("--mm-dir", default=None, help="where the synthetic multimodal set is written, or reused when one made with the same parameters is there (default: a temp dir)")
    parser.add_argument("--mm-set", choices=["default", "upstream_like"], default="default",
                        help="the multimodal set: 400..2000 px, 300..2000 tokens (default), or one with the averages of upstream's published measurement (UPSTREAM_LIKE)")
    parser.add_argument("--workers", type=int, default=6, help="DataLoader workers for the multimodal rows")
    parser.add_argument("--fp32-trainable", action="store_true", help="upcast every trainable parameter to fp32")
    parser.add_argument("--fast-kernels", default="liger,compile", help="what the *_fast rows use: liger, compile, varlen, vision-varlen, vision-compile (comma-separated)")
    parser.add_argument("--profile-dir", default=None, help="profile 2 extra steps per row; kernel tables written here")
    parser.add_argument("--tiny", action="store_true", help="tiny architecture (smoke test; CPU works)")
    parser.add_argument("--json", default=None, help="write the results (and environment) here")
    parser.add_argument("--markdown", default=None, help="write the printed table here too")
    args = parser.parse_args()
    if args.list:
        print("\n".join(r.name for r in ROWS))
        return
    names = DEFAULT_ROWS if args.config == "default" else [r.name for r in ROWS] if args.config == "all" else args.config.split(",")
    unknown = [n for n in names if n not in ROW_BY_NAME]
    if unknown:
        parser.error(f"unknown rows: {unknown} (see --list)")
    rows = [ROW_BY_NAME[n] for n in names]

    import finetune  # noqa: F401
    from finetune.dataset import SupervisedDataset
    from finetune.model.builders import build_tokenizer
    from finetune.model.image_processing import SliceSettings
    from finetune.model.tokenization import SpecialTokens

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    env = {"device": device}
    tmp = tempfile.TemporaryDirectory()
    tokenizer = build_tokenizer(os.path.join(tmp.name, "tok"))
    env["pad_id"] = SpecialTokens.from_tokenizer(tokenizer).pad
    if any(r.workload == "mm" for r in rows):
        settings = SliceSettings(112, 14, 9, 16) if args.tiny else SliceSettings(448, 14, 9, 96)
        folder = args.mm_dir or os.path.join(tmp.name, "mm")
        t = time.perf_counter()
        shape = UPSTREAM_LIKE if args.mm_set == "upstream_like" else {}
        data_path = make_mm_dataset(folder, args.mm_samples, tokenizer, settings, **shape)
        env["mm_dataset"] = SupervisedDataset(data_path, tokenizer, settings=settings, model_max_length=2048)
        lengths = [len(env["mm_dataset"].prepare(i, load_pixels=False).input_ids) for i in range(len(env["mm_dataset"]))]
        env["mm_lengths"] = lengths
        print(f"[data] {len(lengths)} multimodal samples in {time.perf_counter() - t:.1f}s: tokens min {min(lengths)} "
              f"mean {sum(lengths) / len(lengths):.0f} max {max(lengths)}", flush=True)

    results = []
    for row in rows:
        print(f"[row] {row.name} ...", flush=True)
        try:
            result = run_row(row, args, env)
        except torch.cuda.OutOfMemoryError as error:  # report, and go on with the next row
            result = {"row": row.name, "error": f"OOM: {str(error).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001 -- one broken row must not lose the others' numbers
            import traceback

            traceback.print_exc()
            result = {"row": row.name, "error": f"{type(error).__name__}: {error}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if row.workload == "mm":
            result["mm_set"] = args.mm_set
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.json:  # after every row: a killed run keeps what it measured
            write_json(args, results, env)

    text = table(results)
    print(text)
    for line in ratios(results):
        print(line)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n\n" + "\n".join(ratios(results)) + "\n")
    if args.json:
        write_json(args, results, env)


def write_json(args, results, env) -> None:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "deepspeed"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": versions,
        "args": vars(args),
        "peak_bf16_flops": PEAK_BF16_FLOPS,
        "mm_lengths": env.get("mm_lengths"),
        "results": results,
    }
    with open(args.json, "w") as handle:
        json.dump(payload, handle, indent=1)


if __name__ == "__main__":
    main()
