#!/bin/bash
# Second device call (after the bf16-default fix, commit "bf16 by default ..."): the real Trainer path in bf16.
#   A (in parallel)  GPU0: trainer_bench.py on 1 GPU, ZeRO-2, multimodal set  |  GPU1: finetune_lora.sh, 1 GPU, demo data
#   B                trainer_bench.py on 2 GPUs, ZeRO-2, multimodal set
#   C                trainer_bench.py on 2 GPUs, ZeRO-3, multimodal set (no loss-chunk work-around: fixed in the model)
set -u
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ date -u; nvidia-smi -L; python3 -c 'import torch, transformers, peft, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "deepspeed", deepspeed.__version__)'; } > "$OUT/env2.txt" 2>&1

CUDA_VISIBLE_DEVICES=0 python3 bench/make_checkpoint.py /tmp/ckpt > "$OUT/setup2.log" 2>&1 &
python3 - >> "$OUT/setup2.log" 2>&1 <<'PY' &
import sys; sys.path.insert(0, "bench")
from bench_train import make_mm_dataset
from finetune.model.builders import build_tokenizer
from finetune.model.image_processing import SliceSettings
print(make_mm_dataset("/tmp/mm", 64, build_tokenizer("/tmp/mmtok"), SliceSettings(448, 14, 9, 96)))
PY
python3 -m finetune.demo_data /tmp/demo >> "$OUT/setup2.log" 2>&1
wait
echo "setup done at ${SECONDS}s" >> "$OUT/env2.txt"

MM_ARGS="--model_name_or_path /tmp/ckpt --data_path /tmp/mm/train.json --use_lora true --tune_vision true --tune_llm false
 --model_max_length 2048 --max_slice_nums 9 --max_steps 7 --per_device_train_batch_size 4 --packing true
 --save_strategy no --logging_steps 1 --report_to none --dataloader_num_workers 6 --disable_tqdm true"

NGPU=$(nvidia-smi -L | grep -c '^GPU')
SECOND_GPU=1; [ "$NGPU" -ge 2 ] || SECOND_GPU=0   # one GPU: phase A runs its two jobs one after the other
CUDA_VISIBLE_DEVICES=0 BENCH_WARMUP=2 BENCH_TRAINER_JSON="$OUT/z2_1gpu.json" timeout 170 torchrun --nproc_per_node 1 --master_port 6201 \
    bench/trainer_bench.py $MM_ARGS --output_dir /tmp/out_1 --deepspeed finetune/ds_config_zero2.json > "$OUT/z2_1gpu.log" 2>&1 &
A=$!
[ "$NGPU" -ge 2 ] || wait $A
( export CUDA_VISIBLE_DEVICES=$SECOND_GPU; MODEL=/tmp/ckpt DATA=/tmp/demo/train.json GPUS_PER_NODE=1 MAX_STEPS=5 SAVE_STEPS=100000 REPORT_TO=none \
    OUTPUT_DIR=/tmp/out_lora1 MASTER_PORT=6202 timeout 170 bash finetune/finetune_lora.sh --disable_tqdm true ) > "$OUT/lora_1gpu_bf16.log" 2>&1
wait $A
echo "phase A done at ${SECONDS}s" >> "$OUT/env2.txt"
[ "$NGPU" -ge 2 ] || { echo "one GPU: ZeRO-2/ZeRO-3 on 2 GPUs not run" >> "$OUT/env2.txt"; exit 0; }

for stage in 2 3; do
    left=$((540 - SECONDS))
    if [ $left -lt 60 ]; then echo "zero$stage skipped: ${left}s left" >> "$OUT/env2.txt"; continue; fi
    BENCH_WARMUP=2 BENCH_TRAINER_JSON="$OUT/z${stage}_2gpu.json" timeout $((left - 5)) torchrun --nproc_per_node 2 --master_port 620$((stage + 2)) \
        bench/trainer_bench.py $MM_ARGS --output_dir /tmp/out_z$stage --deepspeed finetune/ds_config_zero$stage.json > "$OUT/z${stage}_2gpu.log" 2>&1
    echo "zero$stage rc=$? at ${SECONDS}s" >> "$OUT/env2.txt"
done
