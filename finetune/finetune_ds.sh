#!/bin/sh
# Full fine-tuning (LLM + resampler + vision tower, no LoRA) of MiniCPM-Llama3-V-2.5 or 2.6 under DeepSpeed ZeRO-3.
# Same environment variables as finetune_lora.sh, with full-tuning defaults; extra arguments pass through. Its
# rendezvous too: a free port on one node unless MASTER_PORT is set; MASTER_ADDR:MASTER_PORT (6001) for several.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUTPUT_DIR=${OUTPUT_DIR:-"$HERE/output/output_full"}
DS_CONFIG_DEFAULT="$HERE/ds_config_zero3.json"  # DS_CONFIG where a GPU is found (none: no DeepSpeed), as for LoRA
LR=${LR:-1e-5}
export OUTPUT_DIR DS_CONFIG_DEFAULT LR
[ -z "${DS_CONFIG+given}" ] || export DS_CONFIG
# Later flags win in finetune.py's parser, so these override the LoRA launcher's choices.
exec sh "$HERE/finetune_lora.sh" --use_lora false --tune_llm true "$@"
