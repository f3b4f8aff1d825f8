#!/bin/sh
# The embedded default (README command 1): does fine-tuning teach the model to see? A tiny random MiniCPM-V (the
# published layout) learns to name the colour and shape in a picture ("red star") by LoRA fine-tuning through
# finetune/finetune_lora.sh on CPU; then the base model and the fine-tuned one answer held-out pictures (new
# renders, never trained on). The last line is `held-out exact match: base B -> fine-tuned F`.
# DEMO_STEPS / DEMO_LR / DEMO_BATCH change the training; DEMO_NUM the number of training samples.
set -eu
OUT=$(mkdir -p "${1:-demo_run}" && cd "${1:-demo_run}" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "[demo 1/4] building a tiny random MiniCPM-Llama3-V-2.5 checkpoint (published layout) in $OUT/model"
python -m finetune.build_tiny "$OUT/model" --demo

echo "[demo 2/4] writing the demo data (pictures of coloured shapes; question -> '<colour> <shape>') to $OUT/data"
python -m finetune.demo_data "$OUT/data" --task colour-shape --num "${DEMO_NUM:-1200}"

echo "[demo 3/4] LoRA fine-tuning with finetune/finetune_lora.sh on CPU (no DeepSpeed, one process)"
# LoRA on the LLM's attention and MLP, the resampler, vision tower and embeddings trained in full: a random
# tiny LLM has no useful words to adapt. Every picture is one view (no slicing): 112 px, the tiny model's scale.
START=$(date +%s)
MODEL="$OUT/model" DATA="$OUT/data/train.json" OUTPUT_DIR="$OUT/output" DS_CONFIG="" REPORT_TO=none \
MAX_STEPS=${DEMO_STEPS:-800} SAVE_STEPS=100000 BATCH_SIZE=${DEMO_BATCH:-8} LR=${DEMO_LR:-1e-3} \
LORA_TARGET_MODULES='llm\..*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))' \
    sh finetune/finetune_lora.sh --overwrite_output_dir true --dataloader_num_workers 0 --logging_steps 200 \
    --tune_embeddings true --gradient_checkpointing false --max_slice_nums 1 --model_max_length 128
echo "[demo] training took $(( $(date +%s) - START )) s"

IMAGE="$OUT/data/$(python -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['image'])" "$OUT/data/eval.json")"
TEXT="What colour and shape is this?"
printf '[demo] chat about a held-out picture, %s: %s\n[demo] fine-tuned answer: ' "$IMAGE" "$TEXT"
python -m finetune.chat --model "$OUT/model" --adapter "$OUT/output" --image "$IMAGE" --greedy --max_new_tokens 8 "$TEXT"
echo "[demo] adapter: $OUT/output  loss plot: $OUT/output/loss.png  summary: $OUT/output/run_summary.txt"

echo "[demo 4/4] base model vs fine-tuned model on the held-out pictures (predictions in $OUT/output)"
python -m finetune.demo_report --model "$OUT/model" --adapter "$OUT/output" --data "$OUT/data/eval.json"
