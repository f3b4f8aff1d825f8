"""QLoRA vs bf16 LoRA on the full-size MiniCPM-Llama3-V-2.5 architecture (random weights), one GPU.

    python3 bench/bench_qlora.py [--steps 4] [--warmup 2] [--text-len 2048] [--json out.json] [--skip-loader]
    python3 bench/bench_qlora.py --prepare-tiny /tmp/tq   # tiny checkpoint + demo data, for the ZeRO-2 check:
    torchrun --nproc_per_node 2 finetune/finetune.py --model_name_or_path /tmp/tq/model \
        --data_path /tmp/tq/demo/train.json --q_lora true --deepspeed finetune/ds_config_zero2.json ...

Rows (each: LoRA r64/alpha64 on llm q/k/v/o + resampler trained, vision tower frozen, made trainable by
finetune.finetune.configure_trainable exactly as training does; gradient checkpointing (non-reentrant); one
2048-token text row, batch 1, every position a label; bf16 autocast; clip 1.0; torch AdamW):
  bf16_lora  build_full_size_random(cuda, bf16)
  qlora_nf4  the same bf16 build, then every nn.Linear under llm.model.layers replaced in place by
             bnb.nn.Linear4bit(quant_type="nf4", compress_statistics=True) -- double quantisation -- holding the
             same weights (what from_pretrained + BitsAndBytesConfig(load_in_4bit, nf4, double quant,
             llm_int8_skip_modules=[vpm, resampler, lm_head]) gives, without a 16 GiB checkpoint on disk); the
             peak counter is reset after quantisation, so it measures training only.
Before the rows (unless --skip-loader): the loader path itself on the GPU with the tiny model: finetune.py's
load_model_and_tokenizer(--q_lora true) from a checkpoint on disk, checks of which modules are 4-bit, a few
training steps through finetune.main, and the adapter reloaded onto the bf16 base and onto the 4-bit base.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_train import batch_stats, text_batches, to_device, train_step  # noqa: E402

GiB = 1024**3


def quantize_llm_layers_nf4(model) -> int:
    """Replace every nn.Linear under llm.model.layers by an NF4 double-quantised bnb Linear4bit, in place."""
    import bitsandbytes as bnb

    count = 0
    for layer in model.llm.model.layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                  device="meta")  # fmt: skip
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(module.weight.device)  # fmt: skip
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
            setattr(parent, name.rsplit(".", 1)[-1], q)
            del module
            count += 1
    gc.collect()
    torch.cuda.empty_cache()
    return count


def run_row(name: str, args) -> dict:
    from finetune.finetune import DEFAULT_LORA_TARGETS, configure_trainable
    from finetune.model.builders import build_full_size_random

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_full_size_random("cuda", dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    q_lora = name == "qlora_nf4"
    quantized = quantize_llm_layers_nf4(model) if q_lora else 0
    build_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    weights_gib = torch.cuda.memory_allocated() / GiB
    training_args = SimpleNamespace(tune_llm=False, tune_vision=False, use_lora=True, tune_embeddings=False, gradient_checkpointing=True)
    lora_args = SimpleNamespace(lora_r=64, lora_alpha=64, lora_dropout=0.05, lora_target_modules=DEFAULT_LORA_TARGETS, lora_bias="none", q_lora=q_lora)
    model = configure_trainable(model, training_args, lora_args)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    device = torch.device("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = next(text_batches(128000, args.text_len, seed=step))  # a fresh generator per step: ids seeded by step
        label_tokens = batch_stats(batch)[1]
        batch = to_device(batch, device)  # copied before the timer, as before (train_step's own copy is then a no-op)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = train_step(model, batch, label_tokens, optimizer, params, autocast, baseline=False, device=device)
        losses.append(float(loss))
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    result = {
        "row": name,
        "llm_linears_quantized": quantized,
        "weights_allocated_gib": weights_gib,
        "trainable_params": trainable,
        "step_s_mean": sum(times) / len(times),
        "tokens_per_s": args.text_len * len(times) / sum(times),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        "loss_first_last": [losses[0], losses[-1]],
        "build_s": build_s,
    }
    print(json.dumps(result), flush=True)
    del model, optimizer, params
    gc.collect()
    torch.cuda.empty_cache()
    return result


def loader_check() -> dict:
    """finetune.py's own q_lora path on the GPU, tiny model: load, train, save, reload onto both bases."""
    from peft import PeftModel
    from transformers import AutoModel, BitsAndBytesConfig

    from finetune.demo_data import write_demo_dataset
    from finetune.finetune import LoraArguments, ModelArguments, load_model_and_tokenizer, main
    from finetune.model.builders import build_tiny_checkpoint

    root = tempfile.mkdtemp()
    model_dir = build_tiny_checkpoint(os.path.join(root, "model"), seed=0)
    demo = write_demo_dataset(os.path.join(root, "demo"), num_train=16, num_eval=4)
    model, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path=str(model_dir)), SimpleNamespace(bf16=True, fp16=False, loss_chunk_size=2048), LoraArguments(q_lora=True))
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds.setdefault(f"{name.split('.')[0]}:{type(module).__name__}", name)
    out = os.path.join(root, "adapter")
    trainer = main(["--model_name_or_path", str(model_dir), "--data_path", str(demo["train"]), "--output_dir", out,
                    "--q_lora", "true", "--max_steps", "4", "--per_device_train_batch_size", "2", "--report_to", "none",
                    "--save_strategy", "no", "--learning_rate", "2e-3", "--warmup_steps", "0", "--bf16", "true",
                    "--tune_vision", "false", "--disable_tqdm", "true", "--dataloader_num_workers", "0"])  # fmt: skip
    log = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    del trainer
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["vpm", "resampler", "lm_head"])  # fmt: skip
    reload = {}
    for base_kind, kwargs in (("bf16", {}), ("nf4", {"quantization_config": bnb})):
        base = AutoModel.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0}, **kwargs)
        peft = PeftModel.from_pretrained(base, out)
        reload[base_kind] = sum("lora_A" in n for n, _ in peft.named_parameters())
        del base, peft
    return {"module_kinds": sorted(kinds), "train_losses": log, "reloaded_lora_A_tensors": reload}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=2048)
    parser.add_argument("--rows", default="bf16_lora,qlora_nf4")
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--prepare-tiny", metavar="DIR", help="only write DIR/model (tiny checkpoint) and DIR/demo; exit")
    args = parser.parse_args()
    if args.prepare_tiny:
        from finetune.demo_data import write_demo_dataset
        from finetune.model.builders import build_tiny_checkpoint

        build_tiny_checkpoint(os.path.join(args.prepare_tiny, "model"), seed=0)
        write_demo_dataset(os.path.join(args.prepare_tiny, "demo"), num_train=16, num_eval=4)
        return
    import bitsandbytes
    import peft
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
    print(json.dumps(env), flush=True)
    report = {"env": env, "rows": [], "loader": None}
    if not args.skip_loader:
        try:
            report["loader"] = loader_check()
        except Exception as error:  # noqa: BLE001 - report it, still run the rows
            import traceback

            traceback.print_exc()
            report["loader"] = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps({"loader": report["loader"]}), flush=True)
    for name in args.rows.split(","):
        try:
            report["rows"].append(run_row(name, args))
        except Exception as error:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            report["rows"].append({"row": name, "error": f"{type(error).__name__}: {error}"})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
