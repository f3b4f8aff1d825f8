#!/bin/bash
# Everything bench/README.md reports, in ONE command on a 2 x H200 machine (run from the repository root, with
# the DeepSpeed wheels in .whl/; results go to $OUT, default ./bench_out). Phases:
#   1 (in parallel)  GPU0: bench/bench_train.py, 1-GPU rows (baseline vs suite, text + multimodal)
#                    GPU1: full-size random checkpoint (bf16) -> /tmp/ckpt, demo data, finetune_lora.sh on 1 GPU
#   2 (both GPUs)    finetune_lora.sh on 2 GPUs (ZeRO-2, demo data, 5 steps)
#                    bench/trainer_bench.py (the real Trainer via torchrun) ZeRO-2, then ZeRO-3, multimodal set
# Each phase has its own time limit so that the whole stays inside one 10-minute call.
set -u
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${SKIP_WHL:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
STEPS=${STEPS:-5}
{
    date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import sys, torch, transformers, peft, accelerate, deepspeed; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "deepspeed", deepspeed.__version__)'
    nproc; free -g | head -2
} > "$OUT/env.txt" 2>&1

# --- phase 1 ---------------------------------------------------------------------------------------------
(
    set -e
    export CUDA_VISIBLE_DEVICES=1
    python3 bench/make_checkpoint.py /tmp/ckpt ${CKPT_ARGS:-}
    python3 -m finetune.demo_data /tmp/demo
    ls -la /tmp/ckpt; du -sh /tmp/ckpt
    echo "=== finetune_lora.sh GPUS_PER_NODE=1 (ZeRO-2) ==="
    MODEL=/tmp/ckpt DATA=/tmp/demo/train.json GPUS_PER_NODE=1 MAX_STEPS=$STEPS SAVE_STEPS=100000 REPORT_TO=none \
        OUTPUT_DIR=/tmp/out_lora1 MASTER_PORT=6001 timeout 240 bash finetune/finetune_lora.sh || echo "rc=$?"
    echo adapter files:; ls -la /tmp/out_lora1
) > "$OUT/lora_1gpu.log" 2>&1 &
BG=$!

CUDA_VISIBLE_DEVICES=0 timeout ${BENCH_TIMEOUT:-285} python3 bench/bench_train.py --config "${ROWS:-default}" \
    --steps ${BENCH_STEPS:-6} --warmup 2 --mm-dir /tmp/mm --workers 6 --json "$OUT/bench_1gpu.json" ${BENCH_ARGS:-} > "$OUT/bench_1gpu.log" 2>&1
echo "bench rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
wait $BG
echo "lora_1gpu rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
[ -f /tmp/ckpt/config.json ] || { echo "no checkpoint: stopping" >> "$OUT/env.txt"; exit 1; }

# --- phase 2 ---------------------------------------------------------------------------------------------
{
    echo "=== finetune_lora.sh GPUS_PER_NODE=2 (ZeRO-2) ==="
    MODEL=/tmp/ckpt DATA=/tmp/demo/train.json GPUS_PER_NODE=2 MAX_STEPS=$STEPS SAVE_STEPS=100000 REPORT_TO=none \
        OUTPUT_DIR=/tmp/out_lora2 MASTER_PORT=6002 timeout 150 bash finetune/finetune_lora.sh
    echo "rc=$?"
} > "$OUT/lora_2gpu.log" 2>&1
echo "lora_2gpu done at ${SECONDS}s" >> "$OUT/env.txt"

MM_ARGS="--model_name_or_path /tmp/ckpt --data_path /tmp/mm/train.json --use_lora true --tune_vision true --tune_llm false
 --model_max_length 2048 --max_slice_nums 9 --max_steps 7 --per_device_train_batch_size 4 --packing true
 --save_strategy no --logging_steps 1 --report_to none --dataloader_num_workers 6"
for stage in 2 3; do
    left=$((585 - SECONDS))
    if [ $left -lt 60 ]; then echo "zero$stage skipped: ${left}s left" >> "$OUT/env.txt"; continue; fi
    chunk=""; [ $stage = 3 ] && chunk=16384   # ZeRO-3 needs one loss chunk per micro-batch (README: bug 1)
    BENCH_LOSS_CHUNK=$chunk BENCH_WARMUP=2 BENCH_TRAINER_JSON=/tmp/zero$stage.json timeout $((left - 10)) torchrun --nproc_per_node 2 \
        --master_port 610$stage bench/trainer_bench.py $MM_ARGS --output_dir /tmp/out_z$stage \
        --deepspeed finetune/ds_config_zero$stage.json > "$OUT/zero$stage.log" 2>&1
    echo "zero$stage rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
done
