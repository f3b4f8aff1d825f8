#!/bin/bash
# Third device call: why is the real Trainer path slower than bench_train.py's loop on the same batches?
# One GPU, multimodal set, 7 steps each: (1) plain Trainer, no DeepSpeed; (2) ZeRO-2 with torch.profiler over
# steps 3-5. Both report step times and the time between training_step calls (data wait + optimizer step).
set -u
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
CUDA_VISIBLE_DEVICES=0 python3 bench/make_checkpoint.py /tmp/ckpt > "$OUT/setup3.log" 2>&1 &
python3 - >> "$OUT/setup3.log" 2>&1 <<'PY'
import sys; sys.path.insert(0, "bench")
from bench_train import make_mm_dataset
from finetune.model.builders import build_tokenizer
from finetune.model.image_processing import SliceSettings
print(make_mm_dataset("/tmp/mm", 64, build_tokenizer("/tmp/mmtok"), SliceSettings(448, 14, 9, 96)))
PY
wait
echo "setup done at ${SECONDS}s" >> "$OUT/env3.txt"
MM_ARGS="--model_name_or_path /tmp/ckpt --data_path /tmp/mm/train.json --use_lora true --tune_vision true --tune_llm false
 --model_max_length 2048 --max_slice_nums 9 --max_steps 7 --per_device_train_batch_size 4 --packing true
 --save_strategy no --logging_steps 1 --report_to none --dataloader_num_workers 6 --disable_tqdm true"
BENCH_WARMUP=2 BENCH_TRAINER_JSON="$OUT/plain_1gpu.json" timeout 150 torchrun --nproc_per_node 1 --master_port 6301 \
    bench/trainer_bench.py $MM_ARGS --output_dir /tmp/out_p > "$OUT/plain_1gpu.log" 2>&1
echo "plain rc=$? at ${SECONDS}s" >> "$OUT/env3.txt"
BENCH_PROFILE="$OUT/profile_z2.txt" BENCH_WARMUP=2 BENCH_TRAINER_JSON="$OUT/z2_1gpu_prof.json" timeout 170 torchrun --nproc_per_node 1 --master_port 6302 \
    bench/trainer_bench.py $MM_ARGS --output_dir /tmp/out_z --deepspeed finetune/ds_config_zero2.json > "$OUT/z2_1gpu_prof.log" 2>&1
echo "zero2 rc=$? at ${SECONDS}s" >> "$OUT/env3.txt"
