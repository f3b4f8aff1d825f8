#!/bin/sh
# The embedded default (README command 1): a tiny random MiniCPM-V, the bundled demo data, LoRA fine-tuning
# through finetune/finetune_lora.sh on CPU, then the adapter reloaded with PeftModel to answer a question.
set -eu
OUT=$(mkdir -p "${1:-demo_run}" && cd "${1:-demo_run}" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "[demo 1/4] building a tiny random MiniCPM-Llama3-V-2.5 checkpoint (published layout) in $OUT/model"
python -m finetune.build_tiny "$OUT/model"

echo "[demo 2/4] writing the bundled demo data (synthetic shapes, multi-turn, text-only, multi-image) to $OUT/data"
python -m finetune.demo_data "$OUT/data"

echo "[demo 3/4] LoRA fine-tuning with finetune/finetune_lora.sh on CPU (DeepSpeed ZeRO-2, one process)"
MODEL="$OUT/model" DATA="$OUT/data/train.json" EVAL_DATA="$OUT/data/eval.json" OUTPUT_DIR="$OUT/output" \
MAX_STEPS=${DEMO_STEPS:-300} EVAL_STEPS=100 SAVE_STEPS=1000 BATCH_SIZE=4 LR=${DEMO_LR:-3e-3} \
    sh finetune/finetune_lora.sh --overwrite_output_dir true --dataloader_num_workers 0 --disable_tqdm true --logging_steps 25

echo "[demo 4/4] reloading the adapter with PeftModel and answering held-out questions"
python -m finetune.evaluate --model "$OUT/model" --adapter "$OUT/output" --data "$OUT/data/eval.json" \
    --out "$OUT/output/predictions.jsonl" --max_new_tokens 16
QUESTION=$(python -c "import json,sys; s=[x for x in json.load(open(sys.argv[1])) if isinstance(x.get('image'), str)][0]; print(s['image']); print(s['conversations'][0]['content'].replace('<image>','').strip())" "$OUT/data/eval.json")
IMAGE="$OUT/data/$(echo "$QUESTION" | head -n 1)"
TEXT=$(echo "$QUESTION" | tail -n +2)
echo "[demo] question about $IMAGE: $TEXT"
printf '[demo] answer: '
python -m finetune.chat --model "$OUT/model" --adapter "$OUT/output" --image "$IMAGE" --greedy --max_new_tokens 16 "$TEXT"

echo "[demo] done. Adapter: $OUT/output  Predictions: $OUT/output/predictions.jsonl"
echo "[demo] Loss plot: $OUT/output/loss.png  Summary: $OUT/output/run_summary.txt  TensorBoard: tensorboard --logdir $OUT/output"
