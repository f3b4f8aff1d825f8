#!/bin/bash
# The Trainer-path benchmark on 1-2 H200: finetune.py unchanged (bench/trainer_bench.py adds step timing),
# full-size random checkpoint, synthetic text (2048-token) and multimodal sets. Two parts, each one device call
# of < 10 minutes on `nvidia-h200-x2` (a warm machine reuses /tmp/ckpt and /tmp/data from an earlier part):
#
#   OUT=$OUT bash bench/device_suite.sh 1   # first call: memory levers, offload, ZeRO-2 1 and 2 GPUs (ZeRO-3 failed: fixed)
#   OUT=$OUT bash bench/device_suite.sh 2   # bench_train.py baseline vs suite (GPU0) | memory levers, QLoRA (GPU1); 2-GPU ZeRO-3
#   OUT=$OUT bash bench/device_suite.sh 3   # ZeRO-2 scaling 1 -> 2 GPUs (multimodal, text), speed mode, QLoRA defaults
#   OUT=$OUT bash bench/device_suite.sh 4   # text scaling: ZeRO-2 with all-reduce buckets, DDP + 8-bit AdamW
#   OUT=$OUT bash bench/device_suite.sh 5   # the same ZeRO-2 text scaling with 12 timed steps
#   OUT=$OUT bash bench/device_suite.sh all   # parts 2, 3 and 4 one after the other (a machine without a call limit)
#
# Needs the wheels in .whl/ (deepspeed and its needs) and .whl_qlora/ (bitsandbytes), carried. Results:
# $OUT/results.jsonl (one trainer_bench.py report per line, "name" added), $OUT/bench_train.json (part 2),
# $OUT/logs.txt (every run's log, tqdm removed), $OUT/env.txt, $OUT/table.md (bench/summarize.py).
# TINY=1 SKIP_WHL=1: CPU smoke test of the plumbing.
set -u
PART=${1:?part 1, 2, 3, 4 or all}
if [ "$PART" = all ]; then
    for part in 2 3 4; do bash "$0" $part || exit; done
    exit 0
fi
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the lender's rule
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions   # DeepSpeedCPUAdam's JIT build (offload rows)
if [ -z "${SKIP_WHL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_qlora/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
LIMIT=${LIMIT:-570}   # seconds this part may take in all
TINY_FLAG=""; [ -n "${TINY:-}" ] && TINY_FLAG="--tiny"
{ date -u; nvidia-smi -L 2>/dev/null; python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  python3 -c 'import deepspeed, bitsandbytes; print("deepspeed", deepspeed.__version__, "bitsandbytes", bitsandbytes.__version__)'; } >> "$OUT/env.txt" 2>&1

# --- set-up (skipped when a warm machine still has it) -----------------------------------------------------------
if [ ! -f /tmp/ckpt/config.json ] || [ ! -f /tmp/data/text/train.json ]; then
    # DeepSpeedCPUAdam (offload rows) is JIT-compiled on first use: build it now, beside the set-up.
    [ "$PART" = 1 ] && [ -z "${TINY:-}" ] && { python3 -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()' > /tmp/cpu_adam_build.log 2>&1 & }
    CUDA_VISIBLE_DEVICES=0 python3 bench/make_checkpoint.py /tmp/ckpt $TINY_FLAG >> "$OUT/env.txt" 2>&1 &
    CHECKPOINT_PID=$!
    python3 bench/make_datasets.py /tmp/data $TINY_FLAG >> "$OUT/env.txt" 2>&1
    wait $CHECKPOINT_PID
fi
echo "part $PART: set-up done at ${SECONDS}s" >> "$OUT/env.txt"

COMMON="--model_name_or_path /tmp/ckpt --use_lora true --model_max_length 2048 --save_strategy no --logging_steps 1
 --report_to none --disable_tqdm true --max_steps 7"
TEXT="$COMMON --data_path /tmp/data/text/train.json --per_device_train_batch_size 1 --dataloader_num_workers 2"
MM="$COMMON --data_path /tmp/data/mm/train.json --per_device_train_batch_size 4 --max_slice_nums 9 --dataloader_num_workers 6"
UPSTREAM="--tune_vision true"; LORA_ONLY="--tune_vision false"
PORT=6300

# trainer NAME GPUS(list) TIMEOUT finetune.py-args...: one trainer_bench.py run, its report appended to results.jsonl
trainer() {
    local name=$1 gpus=$2 limit=$3; shift 3
    local left=$((LIMIT - SECONDS)); [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 45 ]; then echo "$name: skipped (${limit}s left)" >> "$OUT/env.txt"; return; fi
    local nproc; nproc=$(echo "$gpus" | tr ',' '\n' | wc -l)
    PORT=$((PORT + 1))
    CUDA_VISIBLE_DEVICES=$gpus BENCH_WARMUP=2 BENCH_TRAINER_JSON=/tmp/$name.json timeout "$limit" \
        torchrun --nproc_per_node "$nproc" --master_port $PORT bench/trainer_bench.py "$@" --output_dir /tmp/out_$name > /tmp/$name.log 2>&1
    local rc=$?
    echo "$name: rc=$rc at ${SECONDS}s" >> "$OUT/env.txt"
    [ -f /tmp/$name.json ] && python3 -c "import json,sys; r=json.load(open('/tmp/$name.json')); r['name']='$name'; print(json.dumps(r))" >> "$OUT/results.jsonl"
    { echo "===== $name (rc=$rc): $*"; grep -v -E '^\s*[0-9]+%\||it/s\]$' /tmp/$name.log | tail -n 60; } >> "$OUT/logs.txt"
}

case $PART in
1)  # first call (ZeRO-3 failed there: fixed since; its rows are part 2's) -- kept as the record of what ran
    (
        PORT=6400
        trainer t1_upstream_adamw 0 110 $TEXT $UPSTREAM
        trainer t1_upstream_8bit_c512 0 110 $TEXT $UPSTREAM --optim adamw_bnb_8bit --loss_chunk_size 512
        trainer t1_lora_8bit_c512 0 110 $TEXT $LORA_ONLY --optim adamw_bnb_8bit --loss_chunk_size 512
    ) &
    (
        PORT=6500
        trainer t1_upstream_z2offload_c512 1 200 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2_offload.json --loss_chunk_size 512
        trainer m1_upstream_z2 1 130 $MM $UPSTREAM --deepspeed finetune/ds_config_zero2.json
    )
    wait
    trainer m2_upstream_z2 0,1 130 $MM $UPSTREAM --deepspeed finetune/ds_config_zero2.json
    trainer t2_upstream_z3_c512 0,1 130 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero3.json --loss_chunk_size 512
    ;;
2)  # memory: the baseline (bench_train.py) and the suite's Trainer rows in one call; then 2-GPU ZeRO-3
    (
        CUDA_VISIBLE_DEVICES=0 timeout 330 python3 bench/bench_train.py $TINY_FLAG --config default --steps 6 --warmup 2 \
            --mm-dir /tmp/data/mm --workers 6 --json "$OUT/bench_train.json" > /tmp/bench_train.log 2>&1
        echo "bench_train: rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
        { echo "===== bench_train.py"; tail -n 40 /tmp/bench_train.log; } >> "$OUT/logs.txt"
    ) &
    (
        PORT=6500
        trainer t1_upstream_8bit_c512 1 100 $TEXT $UPSTREAM --optim adamw_bnb_8bit --loss_chunk_size 512
        trainer t1_lora_8bit_c512 1 100 $TEXT $LORA_ONLY --optim adamw_bnb_8bit --loss_chunk_size 512
        trainer t1_upstream_z2offload_c512 1 150 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2_offload.json --loss_chunk_size 512
        trainer q1_qlora_8bit_c512 1 100 $TEXT --q_lora true $LORA_ONLY --optim adamw_bnb_8bit --loss_chunk_size 512
        trainer t1_upstream_adamw 1 100 $TEXT $UPSTREAM
        trainer t1_lora_adamw 1 100 $TEXT $LORA_ONLY
    )
    wait
    echo "phase A done at ${SECONDS}s" >> "$OUT/env.txt"
    trainer t2_upstream_z3_c512 0,1 130 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero3.json --loss_chunk_size 512
    trainer t2_lora_z3_c512 0,1 130 $TEXT $LORA_ONLY --deepspeed finetune/ds_config_zero3.json --loss_chunk_size 512
    ;;
3)  # scaling 1 -> 2 GPUs under ZeRO-2 (multimodal and text), speed mode, QLoRA with finetune.py's defaults
    (
        PORT=6400
        trainer m1_upstream_z2 0 130 $MM $UPSTREAM --deepspeed finetune/ds_config_zero2.json
        trainer s1_lora_nogc 0 100 $TEXT $LORA_ONLY --gradient_checkpointing false
    ) &
    (
        PORT=6500
        trainer t1_upstream_z2 1 100 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json
        trainer q1_qlora_adamw 1 100 $TEXT --q_lora true $LORA_ONLY
    )
    wait
    echo "phase A done at ${SECONDS}s" >> "$OUT/env.txt"
    trainer m2_upstream_z2 0,1 130 $MM $UPSTREAM --deepspeed finetune/ds_config_zero2.json
    trainer t2_upstream_z2 0,1 100 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json
    ;;
4)  # why text rows scale worse than multimodal ones under ZeRO-2 (part 3: 1.39x vs ~2x): DeepSpeed's
    # reduce-scatter path vs one all-reduce per bucket, and plain DDP (no DeepSpeed) with 8-bit AdamW states.
    python3 - <<'PY'
import json
config = json.load(open("finetune/ds_config_zero2.json"))
config["zero_optimization"]["reduce_scatter"] = False
json.dump(config, open("/tmp/ds_config_zero2_allreduce.json", "w"), indent=1)
PY
    (
        PORT=6400
        trainer t1_upstream_z2 0 100 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json
    ) &
    (
        PORT=6500
        trainer t1_upstream_8bit_c512 1 100 $TEXT $UPSTREAM --optim adamw_bnb_8bit --loss_chunk_size 512
    )
    wait
    echo "phase A done at ${SECONDS}s" >> "$OUT/env.txt"
    trainer t2_upstream_z2_allreduce 0,1 100 $TEXT $UPSTREAM --deepspeed /tmp/ds_config_zero2_allreduce.json
    trainer t2_upstream_ddp_8bit_c512 0,1 100 $TEXT $UPSTREAM --optim adamw_bnb_8bit --loss_chunk_size 512
    trainer t2_upstream_z2 0,1 100 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json
    ;;
5)  # ZeRO-2 text scaling once more with 12 timed steps instead of 5 (parts 3 and 4 disagreed: 1.39x / 1.90x)
    trainer t1_upstream_z2_long 0 80 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json --max_steps 14
    trainer t2_upstream_z2_long 0,1 90 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json --max_steps 14
    ;;
esac
echo "part $PART done at ${SECONDS}s" >> "$OUT/env.txt"
[ -f "$OUT/results.jsonl" ] && python3 bench/summarize.py "$OUT/results.jsonl" > "$OUT/table.md"
