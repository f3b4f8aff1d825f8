#!/bin/sh
# LoRA fine-tuning of MiniCPM-Llama3-V-2.5 or MiniCPM-V 2.6 (MODEL=openbmb/MiniCPM-V-2_6). POSIX sh:
# `cd finetune && sh finetune_lora.sh` or `bash finetune/finetune_lora.sh` from the repository root. Edit the
# defaults below or set them in the environment; any extra arguments are passed on to finetune.py (e.g.
# `sh finetune_lora.sh --max_steps 100`). LLM_TYPE (llama3 for 2.5, qwen for 2.6, as upstream) may be left unset:
# the version is read from the checkpoint's config.json, and a LLM_TYPE that names another version stops the
# preflight in one line.
# Settings for your cards: `AUTO=1` applies `python -m finetune.plan` (memory levers: DeepSpeed config, 8-bit
# optimizer, loss chunk, checkpointing); README.md "Settings for the card you have" lists them, and bench/README.md
# has what each was measured to cost and save. Fastest on one large GPU (text rows, vision tower frozen):
# DS_CONFIG="" TUNE_VISION=false BATCH_SIZE=2 ... --gradient_checkpointing false
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)

MODEL=${MODEL:-"openbmb/MiniCPM-Llama3-V-2_5"}   # hub id or local checkpoint directory
DATA=${DATA:-"path/to/training_data.json"}          # file.json[l], or a mix "a.json:0.7,b.jsonl:0.3"
EVAL_DATA=${EVAL_DATA:-""}                          # optional held-out set
LLM_TYPE=${LLM_TYPE:-""}                            # llama3 (2.5) | qwen (2.6); empty: the checkpoint's version
OUTPUT_DIR=${OUTPUT_DIR:-"$HERE/output/output__lora"}
# DeepSpeed config: ZeRO-2 where nvidia-smi finds a GPU; DS_CONFIG="" trains without DeepSpeed, the default with no
# GPU (DeepSpeed on a CPU compiles a C++ extension, its shared-memory comm op, on first use: it needs a compiler).
DS_CONFIG_DEFAULT=${DS_CONFIG_DEFAULT:-"$HERE/ds_config_zero2.json"}  # finetune_ds.sh sets ZeRO-3
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-2048}
MAX_SLICE_NUMS=${MAX_SLICE_NUMS:-9}

# Distributed set-up: one node with every GPU by default; several nodes via NNODES/NODE_RANK/MASTER_ADDR.
if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${GPUS_PER_NODE:-0}" -gt 0 ] 2>/dev/null || GPUS_PER_NODE=1   # no GPU: one CPU process
fi
if [ -z "${DS_CONFIG+given}" ]; then
    if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        DS_CONFIG=$DS_CONFIG_DEFAULT
    else
        DS_CONFIG=""
        echo "[launch] no GPU: training without DeepSpeed (DS_CONFIG=$DS_CONFIG_DEFAULT to use it)"
    fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
# Rendezvous: one node without MASTER_PORT takes a free port (torchrun --standalone, which holds it from the start
# and gives it to the workers as MASTER_ADDR/MASTER_PORT), so two runs on one machine do not collide. Several
# nodes must agree on the port: MASTER_ADDR:MASTER_PORT, 6001 by default. An explicit MASTER_PORT is always used.
if [ "$NNODES" = "1" ] && [ -z "${MASTER_PORT:-}" ]; then
    RENDEZVOUS_ARGS="--standalone"
    RENDEZVOUS="a free port"
else
    MASTER_PORT=${MASTER_PORT:-6001}
    RENDEZVOUS_ARGS="--master_addr $MASTER_ADDR --master_port $MASTER_PORT"
    RENDEZVOUS="$MASTER_ADDR:$MASTER_PORT"
fi

LLM_TYPE_ARGS=""
[ -z "$LLM_TYPE" ] || LLM_TYPE_ARGS="--llm_type $LLM_TYPE"
EVAL_ARGS=""
if [ -n "$EVAL_DATA" ]; then
    EVAL_ARGS="--eval_data_path $EVAL_DATA --eval_strategy steps --eval_steps ${EVAL_STEPS:-1000}"
fi
DS_ARGS=""
if [ -n "$DS_CONFIG" ]; then
    DS_ARGS="--deepspeed $DS_CONFIG"
    # finetune.py says the same (distributed.check_cpu_deepspeed_compiler); here it is one line, not torchrun's report.
    if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU' && ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
        echo "DeepSpeed without a GPU needs a C++ compiler (${CXX:-c++} is not on PATH): install one (e.g. apt-get install g++) or set DS_CONFIG=\"\"" >&2
        exit 2
    fi
fi

# The planner and the preflight run on torchrun's own Python (the venv it belongs to), unless PYTHON names one.
if [ -z "${PYTHON:-}" ]; then
    TORCHRUN_PATH=$(command -v torchrun || true)
    if [ -n "$TORCHRUN_PATH" ] && [ -x "$(dirname "$TORCHRUN_PATH")/python" ]; then
        PYTHON="$(dirname "$TORCHRUN_PATH")/python"
    else
        PYTHON=python3
    fi
fi

# AUTO=1: settings from the memory planner (python -m finetune.plan) for these GPUs and MODEL's version; its flags
# go before the user's own arguments, so flags given on the command line still win. GPU_MEM (GiB per GPU) overrides
# the nvidia-smi reading; PLAN_OPTS passes more planner options (e.g. PLAN_OPTS="--q_lora --target-global-batch 32").
if [ "${AUTO:-0}" = "1" ]; then
    if [ -z "${GPU_MEM:-}" ]; then
        GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 || true)
        [ -n "$GPU_MIB" ] || { echo "AUTO=1: no GPU memory from nvidia-smi; set GPU_MEM=<GiB per GPU>" >&2; exit 2; }
        GPU_MEM=$(awk "BEGIN { print $GPU_MIB / 1024 }")
    fi
    # shellcheck disable=SC2086  # PLAN_OPTS is a list of words on purpose
    PLAN_FLAGS=$(cd "$HERE/.." && "$PYTHON" -m finetune.plan --emit-args --model "$MODEL" --gpus "$GPUS_PER_NODE" \
        --gpu-mem "$GPU_MEM" --tune-vision "${TUNE_VISION:-true}" ${PLAN_OPTS:-}) || exit $?
    echo "[auto] $PLAN_FLAGS"
    eval "set -- $PLAN_FLAGS \"\$@\""
fi

# The training command line, the user's arguments last (they win).
# shellcheck disable=SC2086  # LLM_TYPE_ARGS, EVAL_ARGS and DS_ARGS are lists of words on purpose
set -- \
    --model_name_or_path "$MODEL" \
    $LLM_TYPE_ARGS \
    --data_path "$DATA" \
    $EVAL_ARGS \
    --use_lora true \
    --tune_vision ${TUNE_VISION:-true} \
    --tune_llm false \
    --lora_target_modules "${LORA_TARGET_MODULES:-llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)}" \
    --model_max_length "$MODEL_MAX_LENGTH" \
    --max_slice_nums "$MAX_SLICE_NUMS" \
    --output_dir "$OUTPUT_DIR" \
    --max_steps ${MAX_STEPS:-10000} \
    --per_device_train_batch_size ${BATCH_SIZE:-1} \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps ${GRAD_ACCUM:-1} \
    --save_strategy steps --save_steps ${SAVE_STEPS:-1000} --save_total_limit 10 \
    --learning_rate ${LR:-1e-4} --weight_decay 0.1 --adam_beta2 0.95 \
    --warmup_steps 0.03 --lr_scheduler_type cosine \
    --logging_steps 1 \
    --gradient_checkpointing true \
    --report_to ${REPORT_TO:-tensorboard} \
    $DS_ARGS \
    "$@"

# Preflight: the same command line checked in one plain process (flags, data files, model directory, output
# directory; no weights, no process group), so that a mistake ends here in one line within seconds, not under
# torchrun's traceback. PREFLIGHT=0 skips it.
if [ "${PREFLIGHT:-1}" != "0" ]; then
    FINETUNE_WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) "$PYTHON" "$HERE/finetune.py" --preflight "$@" || exit $?
    export FINETUNE_PREFLIGHT_DONE=1  # the workers do not repeat the preflight's notices
fi

echo "[launch] model=$MODEL data=$DATA nodes=$NNODES x $GPUS_PER_NODE processes (rendezvous: $RENDEZVOUS) -> $OUTPUT_DIR"
# torchrun's workers end with it, even when it is killed outright (finetune.py's stop_with_launcher).
# shellcheck disable=SC2086  # RENDEZVOUS_ARGS is a list of words on purpose
exec torchrun \
    --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    $RENDEZVOUS_ARGS \
    "$HERE/finetune.py" \
    "$@"
