#!/bin/bash
# Fourth device call: the plain-Trainer row of device_run3.sh again, same data and seed, with torch's cuDNN
# attention backend disabled (flash / memory-efficient kernels instead).
set -u
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
CUDA_VISIBLE_DEVICES=0 python3 bench/make_checkpoint.py /tmp/ckpt > "$OUT/setup4.log" 2>&1 &
python3 - >> "$OUT/setup4.log" 2>&1 <<'PY'
import sys; sys.path.insert(0, "bench")
from bench_train import make_mm_dataset
from finetune.model.builders import build_tokenizer
from finetune.model.image_processing import SliceSettings
print(make_mm_dataset("/tmp/mm", 64, build_tokenizer("/tmp/mmtok"), SliceSettings(448, 14, 9, 96)))
PY
wait
MM_ARGS="--model_name_or_path /tmp/ckpt --data_path /tmp/mm/train.json --use_lora true --tune_vision true --tune_llm false
 --model_max_length 2048 --max_slice_nums 9 --max_steps 7 --per_device_train_batch_size 4 --packing true
 --save_strategy no --logging_steps 1 --report_to none --dataloader_num_workers 6 --disable_tqdm true"
BENCH_NO_CUDNN_SDPA=1 BENCH_WARMUP=2 BENCH_TRAINER_JSON="$OUT/plain_1gpu_nocudnn.json" timeout 150 torchrun --nproc_per_node 1 --master_port 6401 \
    bench/trainer_bench.py $MM_ARGS --output_dir /tmp/out_p > "$OUT/plain_1gpu_nocudnn.log" 2>&1
echo "rc=$? at ${SECONDS}s" >> "$OUT/env4.txt"
