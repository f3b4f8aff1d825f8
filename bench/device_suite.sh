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
#   OUT=$OUT bash bench/device_suite.sh 6   # fast kernels (liger, compile) on text rows | multimodal rows; fast-path numerics tests
#   OUT=$OUT bash bench/device_suite.sh 7   # ZeRO-3 memory levers on 2 GPUs (originals dropped, fewer live parameters, 8-bit AdamW)
#   OUT=$OUT bash bench/device_suite.sh 8   # compiled layers alone (part 6: liger slows every row), bench loop and finetune.py; ZeRO-3 LoRA-only squeeze
#   OUT=$OUT bash bench/device_suite.sh 9   # finetune.py --compile_layers (now dynamic shapes from the start): text, and multimodal with checkpointing
#   OUT=$OUT bash bench/device_suite.sh 10  # varlen attention: GPU numerics tests; bench loop multimodal rows (GPU0) | finetune.py multimodal (GPU1)
#   OUT=$OUT bash bench/device_suite.sh 11  # GPU numerics tests again (part 10's ran after liger's global patches); ZeRO-2 1 -> 2 GPUs with the new defaults
#   OUT=$OUT bash bench/device_suite.sh 12  # 1 GPU: why finetune.py's text speed mode trails the bench loop (the benchmark's own syncs, logging each step)
#   OUT=$OUT bash bench/device_suite.sh 13  # vision tower varlen + compiled: GPU tests; bench loop multimodal A/B (GPU0) | finetune.py multimodal, AdamW and 8-bit AdamW (GPU1)
#   OUT=$OUT bash bench/device_suite.sh 15  # finetune.py multimodal A/B of the vision tower's fast paths (GPU0) | text speed mode at 1 and 2 rows a step (GPU1)
#   OUT=$OUT bash bench/device_suite.sh 16  # 1 GPU alone: text speed mode vs the checkpointed baseline at 1 and 2 rows a step, bench loop and finetune.py
#   OUT=$OUT bash bench/device_suite.sh 17  # diagnostics: GPU idle gaps of the one-row text step (bench loop vs finetune.py); what is alive at the memory peak (multimodal 1 GPU, ZeRO-3 LoRA only)
#   OUT=$OUT bash bench/device_suite.sh 18  # text speed mode with the dummy image's zero-gradient stand-in vs the baseline (GPU0) | 2 rows, multimodal 3 samples + 8-bit (GPU1); ZeRO-3 LoRA-only memory by phase
#   OUT=$OUT bash bench/device_suite.sh 19  # text speed mode at 1 and 2 rows, bench loop (GPU0) | finetune.py on 96 text samples, no epoch boundary in the timing (GPU1); ZeRO-3 LoRA-only memory timeline
#   OUT=$OUT bash bench/device_suite.sh 20  # ZeRO-3 LoRA-only memory timeline with the gathered parameters at every mark
#   OUT=$OUT bash bench/device_suite.sh 21  # ZeRO-3 with lm_head gathered per loss chunk (commit 8223987, reverted: it peaked higher): LoRA only and upstream recipe peaks, LoRA-only timeline
#   OUT=$OUT bash bench/device_suite.sh 22  # ZeRO-3 with the loss on each rank's rows of lm_head vs gathering it: LoRA only and upstream recipe, LoRA-only timeline
#   OUT=$OUT bash bench/device_suite.sh 23  # multimodal: LoRA only without backward through the frozen vision tower; 8-bit AdamW without per-parameter syncs; memory by phase; ZeRO-3 LoRA only
#   OUT=$OUT bash bench/device_suite.sh 24  # multimodal upstream recipe with the vision residual in bf16 (A/B), 8-bit AdamW at 4 and 5 samples a step; ZeRO-3 LoRA only
#   OUT=$OUT bash bench/device_suite.sh 25  # ZeRO-3 LoRA only: with / without the dummy image's backward through the frozen vision tower
#   OUT=$OUT bash bench/device_suite.sh 26  # multimodal step's GPU time by phase (upstream recipe, LoRA only) | the upstream recipe profiled, GPU idle gaps
#   OUT=$OUT bash bench/device_suite.sh 27  # part 26 again with its phase marks fixed (GPU0) | torch's attention kernels on the step's shapes, then LoRA only by phase (GPU1)
#   OUT=$OUT bash bench/device_suite.sh 28  # multimodal upstream recipe on the set with upstream's averages (and the default set): baseline mode, suite, the Trainer's own synchronisation
#   OUT=$OUT bash bench/device_suite.sh 29  # part 28's upstream-like rows again (another call), 6 samples a step; baseline mode for both recipes
#   OUT=$OUT bash bench/device_suite.sh 30  # LoRA only on the upstream-like set: the suite (GPU0) | the baseline mode (GPU1), one call
#   OUT=$OUT bash bench/device_suite.sh 31  # 1 GPU alone: text speed mode with the step's host work trimmed vs not, baseline before and after; attention kernels on the text row
#   OUT=$OUT bash bench/device_suite.sh 32  # 1 GPU alone: trimmed speed mode at 1 and 2 rows; logging every 10 steps, window-synchronised, with / without non-blocking copies; GPU numerics tests
#   OUT=$OUT bash bench/device_suite.sh 33  # 1 GPU: GPU numerics tests; speed mode logging every 5 steps with non-blocking copies, window- and step-synchronised
#   OUT=$OUT bash bench/device_suite.sh 34  # 1 GPU alone: the text speed mode as shipped (logging every step, non-blocking copies, no bench syncs) at 1 and 2 rows, between both baselines
#   OUT=$OUT bash bench/device_suite.sh 35  # 1 GPU alone: the multimodal targets again with today's defaults (data like upstream's): baseline mode, upstream recipe, LoRA only
#   OUT=$OUT bash bench/device_suite.sh 36  # 1 GPU alone: the one-row speed mode host-ahead vs step-synchronised, 40 steps each, with the GPU's clocks and power sampled
#   OUT=$OUT bash bench/device_suite.sh all   # parts 2, 3 and 4 one after the other (a machine without a call limit)
#
# Needs the wheels in .whl/ (deepspeed and its needs) and .whl_qlora/ (bitsandbytes), carried; parts 6-7 also
# .whl_fast/ (liger-kernel, and pytest for the GPU tests). Results:
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
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_qlora/*.whl \
        $(ls .whl_fast/*.whl 2>/dev/null) || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
LIMIT=${LIMIT:-570}   # seconds this part may take in all
TINY_FLAG=""; [ -n "${TINY:-}" ] && TINY_FLAG="--tiny"
{ date -u; nvidia-smi -L 2>/dev/null; python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  python3 -c 'import deepspeed, bitsandbytes; print("deepspeed", deepspeed.__version__, "bitsandbytes", bitsandbytes.__version__)'; } >> "$OUT/env.txt" 2>&1

# bench_train.py NAME ARGS...: one bench_train.py invocation; its rows appended to bench_rows.jsonl, its kernel
# profiles (--profile-dir /tmp/profile_NAME) to profiles.txt
bench_train() {
    local name=$1; shift
    timeout $((LIMIT - SECONDS)) python3 bench/bench_train.py $TINY_FLAG --json /tmp/bt_$name.json "$@" > /tmp/bt_$name.log 2>&1
    echo "bench_train $name: rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
    { echo "===== bench_train $name: $*"; grep -v -E '^\s*[0-9]+%\|' /tmp/bt_$name.log | tail -n 30; } >> "$OUT/logs.txt"
    [ -f /tmp/bt_$name.json ] && python3 -c "
import json; d = json.load(open('/tmp/bt_$name.json'))
for r in d['results']: print(json.dumps(dict(r, invocation='$name', date=d['date'], device=d['device'], versions=d['versions'])))" >> "$OUT/bench_rows.jsonl"
    [ -d /tmp/profile_$name ] && cat /tmp/profile_$name/*.txt >> "$OUT/profiles.txt"
}

# gpu_tests [pytest flags...]: the GPU numerics tests (tests/test_fast_paths.py), the end of their output to logs.txt
gpu_tests() {
    timeout $((LIMIT - SECONDS)) python3 -m pytest -q "$@" -p no:cacheprovider tests/test_fast_paths.py > /tmp/pytest_fast.log 2>&1
    echo "pytest fast paths: rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
    { echo "===== pytest tests/test_fast_paths.py (GPU)"; tail -n 40 /tmp/pytest_fast.log; } >> "$OUT/logs.txt"
}

if [ "$PART" = 9 ]; then CKPT_GPU=1; fi
if [ "$PART" = 11 ]; then  # the tests do not wait for the set-up (GPU1 builds the checkpoint)
    (
        export CUDA_VISIBLE_DEVICES=0
        timeout $((LIMIT - SECONDS)) python3 -m pytest -q -rA --tb=short -p no:cacheprovider tests/test_fast_paths.py > /tmp/pytest_fast.log 2>&1
        echo "pytest fast paths: rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
        { echo "===== pytest tests/test_fast_paths.py (GPU)"; grep -v -E "^\s*$" /tmp/pytest_fast.log | tail -n 80; } >> "$OUT/logs.txt"
    ) &
    TEST_PID=$!
    CKPT_GPU=1
fi
if [ "$PART" = 33 ]; then  # the GPU tests do not wait for the set-up
    gpu_tests -rfEs &
    TEST_PID=$!
fi
if [ "$PART" = 13 ]; then  # GPU0 does not wait for the set-up (GPU1 builds the checkpoint)
    (
        export CUDA_VISIBLE_DEVICES=0
        gpu_tests -rfEs
        MMA="--steps 8 --warmup 4 --mm-dir /tmp/mm_gpu0"
        bench_train mm_llm13 $MMA --fast-kernels varlen,compile --config mm_upstream_baseline,mm_upstream_suite_fast
        bench_train mm_vvarlen13 $MMA --fast-kernels varlen,vision-varlen,compile --config mm_upstream_suite_fast
        bench_train mm_vboth13 $MMA --fast-kernels varlen,vision-varlen,compile,vision-compile --config mm_upstream_suite_fast --profile-dir /tmp/profile_mm_vboth13
    ) &
    SPEED_PID=$!
    CKPT_GPU=1
fi
if [ "$PART" = 15 ]; then  # GPU1 does not wait for the set-up (GPU0 builds the checkpoint): the text rows, bench loop
    (
        export CUDA_VISIBLE_DEVICES=1
        bench_train text_rows1_15 --steps 8 --warmup 3 --config text_lora_baseline
        bench_train text_rows2_15 --steps 8 --warmup 3 --text-rows 2 --fast-kernels varlen,compile --config text_lora_baseline,text_lora_suite_nogc_fast
    ) &
    SPEED_PID=$!
    CKPT_GPU=0
fi
if [ "$PART" = 17 ]; then  # GPU0 does not wait for the set-up (GPU1 builds the checkpoint): the bench loop's row, profiled
    (
        export CUDA_VISIBLE_DEVICES=0
        bench_train text_rows1_17 --steps 8 --warmup 3 --fast-kernels varlen,compile --config text_lora_suite_nogc_fast --profile-dir /tmp/profile_text_rows1_17
    ) &
    SPEED_PID=$!
    CKPT_GPU=1
fi
if [ "$PART" = 18 ]; then  # GPU0 does not wait for the set-up (GPU1 builds the checkpoint): baseline and speed mode, bench loop
    (
        export CUDA_VISIBLE_DEVICES=0
        bench_train text18 --steps 8 --warmup 3 --fast-kernels varlen,vision-varlen,compile,vision-compile --config text_lora_baseline,text_lora_suite_nogc_fast
    ) &
    SPEED_PID=$!
    CKPT_GPU=1
fi
if [ "$PART" = 31 ] || [ "$PART" = 32 ] || [ "$PART" = 33 ] || [ "$PART" = 34 ] || [ "$PART" = 36 ]; then  # 96 text samples: finetune.py's timed steps stay in one epoch
    export TEXT_SAMPLES=96
    [ "$(python3 -c 'import json; print(len(json.load(open("/tmp/data/text/train.json"))))' 2>/dev/null)" = 96 ] || rm -f /tmp/data/text/train.json
fi
if [ "$PART" = 19 ]; then  # GPU0 does not wait for the set-up (GPU1 builds the checkpoint): text at 1 and 2 rows, bench loop
    export TEXT_SAMPLES=96  # (a warm machine's 24-sample set is rebuilt: finetune.py's timed steps then stay in one epoch)
    rm -f /tmp/data/text/train.json
    (
        export CUDA_VISIBLE_DEVICES=0
        BT="--steps 8 --warmup 3 --fast-kernels varlen,vision-varlen,compile,vision-compile --config text_lora_baseline,text_lora_suite_nogc_fast"
        bench_train text_rows1_19 $BT
        bench_train text_rows2_19 $BT --text-rows 2
    ) &
    SPEED_PID=$!
    CKPT_GPU=1
fi
if [ "$PART" = 10 ]; then  # GPU0 does not wait for the set-up (GPU1 builds the checkpoint)
    (
        export CUDA_VISIBLE_DEVICES=0
        gpu_tests
        MMA="--steps 8 --warmup 4 --mm-dir /tmp/mm_gpu0"
        bench_train mm_plain10 $MMA --config mm_upstream_baseline,mm_upstream_suite
        bench_train mm_varlen $MMA --fast-kernels varlen --config mm_upstream_suite_fast --profile-dir /tmp/profile_mm_varlen
        bench_train mm_varlen_compile $MMA --fast-kernels varlen,compile --config mm_upstream_suite_fast,mm_upstream_suite_nogc_fast
        bench_train text_varlen_compile --steps 8 --warmup 3 --fast-kernels varlen,compile --config text_lora_suite_nogc_fast
    ) &
    SPEED_PID=$!
    CKPT_GPU=1
fi
if [ "$PART" = 8 ]; then  # GPU0 does not wait for the set-up (GPU1 builds the checkpoint)
    (
        export CUDA_VISIBLE_DEVICES=0
        bench_train text_compile2 --steps 8 --warmup 3 --fast-kernels compile \
            --config text_lora_baseline,text_lora_suite,text_lora_suite_fast,text_lora_suite_nogc_fast,text_upstream_baseline,text_upstream_suite_nogc_fast
        bench_train mm_compile --steps 8 --warmup 6 --mm-dir /tmp/mm_gpu0 --fast-kernels compile --config mm_upstream_suite,mm_upstream_suite_fast,mm_upstream_suite_nogc_fast
    ) &
    SPEED_PID=$!
    CKPT_GPU=1
fi
if [ "$PART" = 6 ]; then  # GPU0 does not wait for the set-up (GPU1 builds the checkpoint)
    (
        export CUDA_VISIBLE_DEVICES=0
        BT="--steps 8 --warmup 3"
        bench_train text_plain $BT --config text_lora_baseline,text_lora_suite_nogc,text_upstream_baseline,text_upstream_suite_nogc --profile-dir /tmp/profile_text_plain
        bench_train text_liger $BT --fast-kernels liger --config text_lora_suite_nogc_fast,text_lora_suite_fast
        bench_train text_compile $BT --fast-kernels compile --config text_lora_suite_nogc_fast
        bench_train text_both $BT --fast-kernels liger,compile --config text_lora_suite_nogc_fast,text_upstream_suite_nogc_fast,text_lora_suite_fast --profile-dir /tmp/profile_text_both
        gpu_tests
    ) &
    SPEED_PID=$!
    CKPT_GPU=1
fi

# --- set-up (skipped when a warm machine still has it) -----------------------------------------------------------
if [ ! -f /tmp/ckpt/config.json ] || [ ! -f /tmp/data/text/train.json ]; then
    # DeepSpeedCPUAdam (offload rows) is JIT-compiled on first use: build it now, beside the set-up.
    [ "$PART" = 1 ] && [ -z "${TINY:-}" ] && { python3 -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()' > /tmp/cpu_adam_build.log 2>&1 & }
    CUDA_VISIBLE_DEVICES=${CKPT_GPU:-0} python3 bench/make_checkpoint.py /tmp/ckpt $TINY_FLAG >> "$OUT/env.txt" 2>&1 &
    CHECKPOINT_PID=$!
    python3 bench/make_datasets.py /tmp/data $TINY_FLAG --text-samples ${TEXT_SAMPLES:-24} >> "$OUT/env.txt" 2>&1
    wait $CHECKPOINT_PID
fi
echo "part $PART: set-up done at ${SECONDS}s" >> "$OUT/env.txt"

COMMON="--model_name_or_path /tmp/ckpt --use_lora true --model_max_length 2048 --save_strategy no --logging_steps 1
 --report_to none --disable_tqdm true --max_steps 7"
TEXT="$COMMON --data_path /tmp/data/text/train.json --per_device_train_batch_size 1 --dataloader_num_workers 2"
MM="$COMMON --data_path /tmp/data/mm/train.json --per_device_train_batch_size 4 --max_slice_nums 9 --dataloader_num_workers 6"
# the multimodal set with the averages of upstream's published measurement (bench_train.UPSTREAM_LIKE)
MM_UL="$COMMON --data_path /tmp/data/mm_upstream_like/train.json --per_device_train_batch_size 4 --max_slice_nums 9 --dataloader_num_workers 6"
UPSTREAM="--tune_vision true"; LORA_ONLY="--tune_vision false"
PORT=6300

# trainer NAME GPUS(list) TIMEOUT finetune.py-args...: one trainer_bench.py run, its report appended to results.jsonl
trainer() {
    local name=$1 gpus=$2 limit=$3; shift 3
    local left=$((LIMIT - SECONDS)); [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 45 ]; then echo "$name: skipped (${limit}s left)" >> "$OUT/env.txt"; return; fi
    local nproc; nproc=$(echo "$gpus" | tr ',' '\n' | wc -l)
    PORT=$((PORT + 1))
    CUDA_VISIBLE_DEVICES=$gpus BENCH_WARMUP=${WARMUP:-2} BENCH_TRAINER_JSON=/tmp/$name.json timeout "$limit" \
        torchrun --nproc_per_node "$nproc" --master_port $PORT bench/trainer_bench.py "$@" --output_dir /tmp/out_$name > /tmp/$name.log 2>&1
    local rc=$?
    echo "$name: rc=$rc at ${SECONDS}s" >> "$OUT/env.txt"
    # (both GPUs' runs append here: one writer at a time, or two reports ending together interleave)
    (
        flock 9
        [ -f /tmp/$name.json ] && python3 -c "import json,sys; r=json.load(open('/tmp/$name.json')); r['name']='$name'; print(json.dumps(r))" >> "$OUT/results.jsonl"
        { echo "===== $name (rc=$rc): $*"; grep -v -E '^\s*[0-9]+%\||it/s\]$' /tmp/$name.log | tail -n 60; } >> "$OUT/logs.txt"
    ) 9> /tmp/device_suite_append.lock
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
        trainer t1_upstream_z2 0 100 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json --max_steps 10
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
6)  # GPU1 (GPU0 runs the text rows and the tests, started above): multimodal rows, then the flags through finetune.py
    (
        export CUDA_VISIBLE_DEVICES=1
        bench_train mm_plain --steps 8 --warmup 2 --mm-dir /tmp/data/mm --config mm_upstream_baseline,mm_upstream_suite,mm_upstream_suite_nogc --profile-dir /tmp/profile_mm_plain
        bench_train mm_both --steps 8 --warmup 4 --mm-dir /tmp/data/mm --fast-kernels liger,compile --config mm_upstream_suite_fast,mm_upstream_suite_nogc_fast
        PORT=6500
        trainer s1_lora_nogc_fast 1 150 $TEXT $LORA_ONLY --gradient_checkpointing false --use_liger_kernel true --compile_layers true
    )
    wait $SPEED_PID
    ;;
7)  # ZeRO-3 on 2 GPUs: PEFT's frozen originals now dropped (all rows); fewer live parameters; 8-bit AdamW states
    python3 - <<'PY'
import json
config = json.load(open("finetune/ds_config_zero3.json"))
zero = config["zero_optimization"]
zero["stage3_max_live_parameters"] = zero["stage3_max_reuse_distance"] = 2e8  # about one decoder layer (218 M)
json.dump(config, open("/tmp/ds_config_zero3_lean.json", "w"), indent=1)
del config["optimizer"]  # the Trainer's --optim, wrapped by DeepSpeed
json.dump(config, open("/tmp/ds_config_zero3_lean_clientopt.json", "w"), indent=1)
PY
    trainer t2_upstream_z3_c512 0,1 130 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero3.json --loss_chunk_size 512
    trainer t2_upstream_z3lean_8bit_c512 0,1 130 $TEXT $UPSTREAM --deepspeed /tmp/ds_config_zero3_lean_clientopt.json --optim adamw_bnb_8bit --loss_chunk_size 512
    trainer t2_lora_z3lean_8bit_c512 0,1 130 $TEXT $LORA_ONLY --deepspeed /tmp/ds_config_zero3_lean_clientopt.json --optim adamw_bnb_8bit --loss_chunk_size 512
    trainer t2_upstream_z3lean_c512 0,1 130 $TEXT $UPSTREAM --deepspeed /tmp/ds_config_zero3_lean.json --loss_chunk_size 512
    ;;
8)  # GPU1 (GPU0 runs bench_train.py, started above): the finetune.py flag, 14 steps, the first 5 untimed (compiling
    # for the first length, then recompiling with dynamic shapes, takes the first steps); then ZeRO-3 LoRA only
    (
        export WARMUP=5
        PORT=6500
        trainer s1_lora_nogc_compile 1 150 $TEXT $LORA_ONLY --gradient_checkpointing false --compile_layers true --max_steps 14
        trainer s1_lora_nogc 1 100 $TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14
        trainer s1_lora_gc_compile 1 150 $TEXT $LORA_ONLY --compile_layers true --max_steps 14
    )
    wait $SPEED_PID
    echo "phase A done at ${SECONDS}s" >> "$OUT/env.txt"
    python3 - <<'PY'
import json
config = json.load(open("finetune/ds_config_zero3.json"))
del config["optimizer"]
zero = config["zero_optimization"]
zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"], zero["stage3_prefetch_bucket_size"] = 1e8, 0, 0
json.dump(config, open("/tmp/ds_config_zero3_tight_clientopt.json", "w"), indent=1)
PY
    trainer t2_lora_z3tight_8bit_c256 0,1 130 $TEXT $LORA_ONLY --deepspeed /tmp/ds_config_zero3_tight_clientopt.json --optim adamw_bnb_8bit --loss_chunk_size 256
    ;;
9)  # the finetune.py flag as shipped (dynamic shapes from the first step), 14 steps, the first 5 untimed
    export WARMUP=5
    (
        PORT=6400
        trainer s1_lora_nogc_compile_dyn 0 120 $TEXT $LORA_ONLY --gradient_checkpointing false --compile_layers true --max_steps 14
        trainer m1_upstream_gc 0 120 $MM $UPSTREAM --max_steps 14
    ) &
    (
        PORT=6500
        trainer m1_upstream_gc_compile 1 200 $MM $UPSTREAM --compile_layers true --max_steps 14
    )
    wait
    ;;
10) # GPU1 (GPU0 runs the tests and bench_train.py, started above): finetune.py on the multimodal set, compiled
    # layers (the default) with sdpa, then with the new default varlen; 12 steps, the first 4 untimed
    export WARMUP=4
    PORT=6500
    trainer m1_upstream_gc_compile_sdpa 1 200 $MM $UPSTREAM --attn_implementation sdpa --max_steps 12
    trainer m1_upstream_gc_compile_varlen 1 200 $MM $UPSTREAM --max_steps 12
    wait $SPEED_PID
    ;;
11) # ZeRO-2 scaling with finetune.py's CUDA defaults (compiled layers, varlen attention): 1 GPU on each
    # workload side by side, then 2 GPUs; 10 steps, the first 4 untimed (compiling)
    export WARMUP=4
    (
        PORT=6400
        while kill -0 $TEST_PID 2>/dev/null; do sleep 2; done
        trainer t1_upstream_z2 0 100 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json --max_steps 10
    ) &
    (
        PORT=6500
        trainer m1_upstream_z2 1 150 $MM $UPSTREAM --deepspeed finetune/ds_config_zero2.json --max_steps 10
    )
    wait
    echo "phase A done at ${SECONDS}s" >> "$OUT/env.txt"
    trainer m2_upstream_z2 0,1 150 $MM $UPSTREAM --deepspeed finetune/ds_config_zero2.json --max_steps 10
    trainer t2_upstream_z2 0,1 100 $TEXT $UPSTREAM --deepspeed finetune/ds_config_zero2.json --max_steps 10
    ;;
12) # one GPU: the baseline and the compiled bench-loop row, then finetune.py's speed mode (no checkpointing; compiled
    # layers and varlen by default) timed with synchronisations at step ends only, as before (around every
    # training_step too), and with the loss logged every 10 steps instead of every step (profiled: steps 3-5)
    export WARMUP=5
    bench_train text12 --steps 8 --warmup 3 --fast-kernels varlen,compile --config text_lora_baseline,text_lora_suite_nogc_fast
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14"
    BENCH_SYNC=steps trainer s1_lora_nogc_stepsync 0 130 $NOGC
    trainer s1_lora_nogc_allsync 0 110 $NOGC
    BENCH_SYNC=steps BENCH_PROFILE=$OUT/profile_trainer.txt trainer s1_lora_nogc_stepsync_log10 0 110 $NOGC --logging_steps 10
    ;;
13) # GPU1 (GPU0 runs the tests and the bench loop's multimodal rows, started above): finetune.py on the
    # multimodal set with its CUDA defaults (both towers varlen and compiled), 12 steps, the first 4 untimed;
    # then the same with 8-bit AdamW states (the memory lever for the trained vision tower's fp32 states)
    export WARMUP=4
    PORT=6500
    trainer m1_upstream_defaults13 1 200 $MM $UPSTREAM --max_steps 12
    trainer m1_upstream_defaults_8bit13 1 200 $MM $UPSTREAM --max_steps 12 --optim adamw_bnb_8bit
    wait $SPEED_PID
    ;;
15) # GPU0: finetune.py on the multimodal set, A/B of the vision tower's fast paths (its defaults; the vision
    # tower back on sdpa; its layers not compiled), 10 steps, the first 4 untimed. GPU1, after its bench-loop
    # rows: finetune.py's text speed mode at two rows a step (packed into one, each sample attended on its own)
    # and at one
    export WARMUP=4
    (
        PORT=6600
        while kill -0 $SPEED_PID 2>/dev/null; do sleep 2; done
        NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14"
        WARMUP=5 BENCH_SYNC=steps trainer s1_lora_nogc_rows2_15 1 130 $NOGC --per_device_train_batch_size 2
        WARMUP=5 BENCH_SYNC=steps trainer s1_lora_nogc_rows1_15 1 130 $NOGC
    ) &
    PORT=6500
    trainer m1_defaults15 0 175 $MM $UPSTREAM --max_steps 10
    BENCH_VISION_ATTENTION=sdpa trainer m1_vision_sdpa15 0 175 $MM $UPSTREAM --max_steps 10
    BENCH_VISION_COMPILE=0 trainer m1_vision_eager15 0 175 $MM $UPSTREAM --max_steps 10
    wait
    ;;
16) # one GPU, nothing else running: the text speed mode against the checkpointed baseline, one and two
    # 2048-token rows a step, in the bench loop and through finetune.py (part 15 ran them beside GPU0's compiling)
    bench_train text_rows1_16 --steps 8 --warmup 3 --fast-kernels varlen,compile --config text_lora_baseline,text_lora_suite_nogc_fast
    bench_train text_rows2_16 --steps 8 --warmup 3 --text-rows 2 --fast-kernels varlen,compile --config text_lora_baseline,text_lora_suite_nogc_fast
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14"
    export WARMUP=5 BENCH_SYNC=steps
    trainer s1_lora_nogc_rows1_16 0 130 $NOGC
    trainer s1_lora_nogc_rows2_16 0 130 $NOGC --per_device_train_batch_size 2
    ;;
17) # GPU0, after the bench loop's row: finetune.py's one-row text step profiled (steps 3-5, Python stacks) and
    # timed (steps 8-15). GPU1: the same step with the vision tower's fast paths off (the dummy image's path:
    # sdpa, eager), then what is alive at the multimodal upstream recipe's memory peak. Then ZeRO-3 LoRA only
    # on both GPUs, its memory peak.
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 16"
    (
        PORT=6600
        while kill -0 $SPEED_PID 2>/dev/null; do sleep 2; done
        WARMUP=8 BENCH_SYNC=steps BENCH_PROFILE=/tmp/profile_s1_17.txt trainer s1_lora_nogc_profiled17 0 200 $NOGC
    ) &
    GPU0_PID=$!
    PORT=6500
    WARMUP=8 BENCH_SYNC=steps BENCH_VISION_ATTENTION=sdpa BENCH_VISION_COMPILE=0 trainer s1_lora_nogc_vision_plain17 1 150 $NOGC
    BENCH_MEMORY=/tmp/memory_mm17.md trainer m1_upstream_memory17 1 200 $MM $UPSTREAM --max_steps 5
    while kill -0 $GPU0_PID 2>/dev/null; do sleep 2; done
    BENCH_MEMORY=/tmp/memory_z3lora17.md trainer t2_lora_z3lean_8bit_memory17 0,1 150 $TEXT $LORA_ONLY --max_steps 5 \
        --deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512
    {
        for trace in /tmp/profile_text_rows1_17/*.trace.json /tmp/profile_s1_17.txt.trace.json; do
            [ -f "$trace" ] && python3 bench/gpu_gaps.py "$trace" --top 30 && echo
        done
        for report in /tmp/memory_mm17.md /tmp/memory_z3lora17.md; do
            [ -f "$report" ] && echo "## $report" && cat "$report" && echo
        done
    } > "$OUT/analysis.md" 2>&1
    [ -f /tmp/profile_s1_17.txt ] && cat /tmp/profile_s1_17.txt >> "$OUT/profiles.txt"
    ;;
18) # GPU0, after its bench-loop rows: finetune.py's one-row speed mode with its defaults (the dummy image's
    # zero-gradient stand-in), then with the dummy image run as published. GPU1: two rows a step; the multimodal
    # upstream recipe at 3 samples a step with 8-bit AdamW states. Then ZeRO-3 LoRA only: memory by phase.
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14"
    export BENCH_SYNC=steps
    (
        PORT=6600
        while kill -0 $SPEED_PID 2>/dev/null; do sleep 2; done
        WARMUP=5 trainer s1_lora_nogc_rows1_18 0 130 $NOGC
        WARMUP=5 BENCH_DUMMY_IMAGE=run trainer s1_lora_nogc_rows1_dummy18 0 130 $NOGC
    ) &
    GPU0_PID=$!
    PORT=6500
    WARMUP=5 trainer s1_lora_nogc_rows2_18 1 130 $NOGC --per_device_train_batch_size 2
    WARMUP=4 trainer m1_upstream_bs3_8bit18 1 170 $MM $UPSTREAM --max_steps 10 --per_device_train_batch_size 3 --optim adamw_bnb_8bit
    while kill -0 $GPU0_PID 2>/dev/null; do sleep 2; done
    unset BENCH_SYNC
    BENCH_MEMORY=/tmp/memory_z3lora18.md trainer t2_lora_z3lean_8bit_memory18 0,1 130 $TEXT $LORA_ONLY --max_steps 4 \
        --deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512
    [ -f /tmp/memory_z3lora18.md ] && cp /tmp/memory_z3lora18.md "$OUT/memory_z3lora.md"
    ;;
19) # GPU1: finetune.py's speed mode at 1 and 2 rows a step (96 text samples: 48-96 steps an epoch, so no epoch
    # boundary falls in the 14 steps). Then ZeRO-3 LoRA only on both GPUs: memory by phase, lm_head marked.
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14"
    PORT=6500
    WARMUP=5 BENCH_SYNC=steps trainer s1_lora_nogc_rows1_19 1 130 $NOGC
    WARMUP=5 BENCH_SYNC=steps trainer s1_lora_nogc_rows2_19 1 130 $NOGC --per_device_train_batch_size 2
    while kill -0 $SPEED_PID 2>/dev/null; do sleep 2; done
    BENCH_MEMORY=/tmp/memory_z3lora19.md trainer t2_lora_z3lean_8bit_memory19 0,1 130 $TEXT $LORA_ONLY --max_steps 4 \
        --deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512
    [ -f /tmp/memory_z3lora19.md ] && cp /tmp/memory_z3lora19.md "$OUT/memory_z3lora.md"
    ;;
20) # ZeRO-3 LoRA only on both GPUs: memory by phase, with the bytes of parameters held gathered at every mark
    PORT=6500
    BENCH_MEMORY=/tmp/memory_z3lora20.md trainer t2_lora_z3lean_8bit_memory20 0,1 130 $TEXT $LORA_ONLY --max_steps 4 \
        --deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512
    [ -f /tmp/memory_z3lora20.md ] && cp /tmp/memory_z3lora20.md "$OUT/memory_z3lora.md"
    ;;
21) # ZeRO-3 on both GPUs, lean config + 8-bit AdamW (Update 3's rows), with the loss gathering lm_head chunk by
    # chunk (commit 8223987; reverted after this part): LoRA only and the upstream recipe (peaks as measured), then
    # LoRA only's timeline by phase
    PORT=6500
    Z3="--deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512"
    trainer t2_lora_z3lean_8bit_c512_21 0,1 130 $TEXT $LORA_ONLY $Z3
    trainer t2_upstream_z3lean_8bit_c512_21 0,1 130 $TEXT $UPSTREAM $Z3
    BENCH_MEMORY=/tmp/memory_z3lora21.md trainer t2_lora_z3lean_8bit_memory21 0,1 130 $TEXT $LORA_ONLY --max_steps 4 $Z3
    [ -f /tmp/memory_z3lora21.md ] && cp /tmp/memory_z3lora21.md "$OUT/memory_z3lora.md"
    ;;
22) # ZeRO-3 on both GPUs, lean config + 8-bit AdamW: the loss on each rank's rows of lm_head (never gathered)
    # against the chunked loss gathering it (BENCH_VOCAB_SHARDS=off), LoRA only and the upstream recipe; then
    # LoRA only's memory timeline by phase
    PORT=6500
    Z3="--deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512"
    trainer t2_lora_z3lean_8bit_c512_shards22 0,1 130 $TEXT $LORA_ONLY $Z3
    BENCH_VOCAB_SHARDS=off trainer t2_lora_z3lean_8bit_c512_gather22 0,1 130 $TEXT $LORA_ONLY $Z3
    trainer t2_upstream_z3lean_8bit_c512_shards22 0,1 130 $TEXT $UPSTREAM $Z3
    BENCH_VOCAB_SHARDS=off trainer t2_upstream_z3lean_8bit_c512_gather22 0,1 130 $TEXT $UPSTREAM $Z3
    BENCH_MEMORY=/tmp/memory_z3lora22.md trainer t2_lora_z3lean_8bit_memory22 0,1 130 $TEXT $LORA_ONLY --max_steps 4 $Z3
    [ -f /tmp/memory_z3lora22.md ] && cp /tmp/memory_z3lora22.md "$OUT/memory_z3lora.md"
    ;;
23) # GPU0: multimodal LoRA only, without / with backward through the frozen vision tower (transformers'
    # checkpointing hooks, BENCH_INPUT_GRADS=library); the upstream recipe with fused AdamW. GPU1: the upstream
    # recipe with 8-bit AdamW, without / with bitsandbytes' sync after every parameter; then with loss chunk 512,
    # memory by phase. Then ZeRO-3 LoRA only on both GPUs (the dummy image's backward no longer runs through the tower).
    (
        PORT=6600
        WARMUP=4 trainer m1_lora23 0 170 $MM $LORA_ONLY --max_steps 10
        WARMUP=4 BENCH_INPUT_GRADS=library trainer m1_lora_library23 0 150 $MM $LORA_ONLY --max_steps 10
        WARMUP=4 trainer m1_upstream23 0 150 $MM $UPSTREAM --max_steps 10
    ) &
    GPU0_PID=$!
    PORT=6500
    WARMUP=4 trainer m1_upstream_8bit23 1 170 $MM $UPSTREAM --max_steps 10 --optim adamw_bnb_8bit
    WARMUP=4 BENCH_BNB_SYNCS=each trainer m1_upstream_8bit_syncs23 1 150 $MM $UPSTREAM --max_steps 10 --optim adamw_bnb_8bit
    BENCH_MEMORY=/tmp/memory_mm23.md trainer m1_upstream_8bit_c512_memory23 1 150 $MM $UPSTREAM --max_steps 6 --optim adamw_bnb_8bit --loss_chunk_size 512
    [ -f /tmp/memory_mm23.md ] && cp /tmp/memory_mm23.md "$OUT/memory_mm.md"
    while kill -0 $GPU0_PID 2>/dev/null; do sleep 2; done
    trainer t2_lora_z3lean_8bit_c512_23 0,1 120 $TEXT $LORA_ONLY --deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512
    ;;
24) # The upstream recipe on the multimodal set with the vision residual in bf16. GPU0: fused AdamW, against the
    # fp32 residual (BENCH_VISION_RESIDUAL=fp32). GPU1: 8-bit AdamW at 4 samples a step, and at 5 with loss chunk
    # 512. Then ZeRO-3 LoRA only on both GPUs (part 23 ran out of time for it).
    (
        PORT=6600
        WARMUP=4 trainer m1_upstream24 0 170 $MM $UPSTREAM --max_steps 10
        WARMUP=4 BENCH_VISION_RESIDUAL=fp32 trainer m1_upstream_fp32res24 0 150 $MM $UPSTREAM --max_steps 10
    ) &
    GPU0_PID=$!
    PORT=6500
    WARMUP=4 trainer m1_upstream_8bit24 1 170 $MM $UPSTREAM --max_steps 10 --optim adamw_bnb_8bit
    WARMUP=4 trainer m1_upstream_8bit_bs5_c512_24 1 150 $MM $UPSTREAM --max_steps 10 --optim adamw_bnb_8bit \
        --loss_chunk_size 512 --per_device_train_batch_size 5
    while kill -0 $GPU0_PID 2>/dev/null; do sleep 2; done
    trainer t2_lora_z3lean_8bit_c512_24 0,1 100 $TEXT $LORA_ONLY --deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512
    ;;
25) # ZeRO-3 LoRA only on both GPUs (part 24's ran 1.3x slower than part 22's): the dummy image's backward through
    # the frozen vision tower (BENCH_INPUT_GRADS=library) against without, in one call, the default twice
    PORT=6500
    Z3="--deepspeed finetune/ds_config_zero3_lean.json --optim adamw_bnb_8bit --loss_chunk_size 512"
    trainer t2_lora_z3lean_8bit_c512_25a 0,1 80 $TEXT $LORA_ONLY $Z3
    BENCH_INPUT_GRADS=library trainer t2_lora_z3lean_8bit_c512_library25 0,1 80 $TEXT $LORA_ONLY $Z3
    trainer t2_lora_z3lean_8bit_c512_25b 0,1 80 $TEXT $LORA_ONLY $Z3
    ;;
26) # Where the multimodal step's time goes, at part 24's best setting within 26.8 GiB (5 samples a step, 8-bit
    # AdamW, loss chunk 512). GPU0: GPU time by phase (BENCH_PHASES), upstream recipe then LoRA only. GPU1: the
    # upstream recipe profiled (steps 3-5: kernel tables, GPU idle gaps by Python frame).
    BEST="$MM --max_steps 10 --optim adamw_bnb_8bit --loss_chunk_size 512 --per_device_train_batch_size 5"
    (
        PORT=6600
        WARMUP=4 BENCH_PHASES=/tmp/phases_upstream26.md trainer m1_upstream_phases26 0 170 $BEST $UPSTREAM
        WARMUP=4 BENCH_PHASES=/tmp/phases_lora26.md trainer m1_lora_phases26 0 150 $BEST $LORA_ONLY
    ) &
    GPU0_PID=$!
    PORT=6500
    BENCH_SYNC=steps BENCH_PROFILE=/tmp/profile_mm26.txt trainer m1_upstream_profiled26 1 200 $BEST $UPSTREAM
    {
        [ -f /tmp/profile_mm26.txt.trace.json ] && python3 bench/gpu_gaps.py /tmp/profile_mm26.txt.trace.json --top 30
    } > "$OUT/analysis.md" 2>&1
    [ -f /tmp/profile_mm26.txt ] && cat /tmp/profile_mm26.txt >> "$OUT/profiles.txt"
    while kill -0 $GPU0_PID 2>/dev/null; do sleep 2; done
    for report in /tmp/phases_upstream26.md /tmp/phases_lora26.md; do
        [ -f "$report" ] && { echo "## $report"; cat "$report"; echo; } >> "$OUT/phases.md"
    done
    ;;
27) # Part 26's phase runs failed (a CUDA event traced by dynamo inside a compiled layer was never recorded; the
    # marks now break the graph). GPU0: the upstream recipe by phase. GPU1: the attention kernels torch ships on
    # the step's vision and LLM shapes, then LoRA only by phase.
    BEST="$MM --max_steps 10 --optim adamw_bnb_8bit --loss_chunk_size 512 --per_device_train_batch_size 5"
    (
        PORT=6600
        WARMUP=4 BENCH_PHASES=/tmp/phases_upstream27.md trainer m1_upstream_phases27 0 190 $BEST $UPSTREAM
    ) &
    GPU0_PID=$!
    PORT=6500
    CUDA_VISIBLE_DEVICES=1 timeout 120 python3 bench/attention_kernels.py --json "$OUT/attention_kernels.json" > /tmp/attention27.log 2>&1
    echo "attention_kernels: rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
    { echo "===== bench/attention_kernels.py"; cat /tmp/attention27.log; } >> "$OUT/logs.txt"
    WARMUP=4 BENCH_PHASES=/tmp/phases_lora27.md trainer m1_lora_phases27 1 170 $BEST $LORA_ONLY
    while kill -0 $GPU0_PID 2>/dev/null; do sleep 2; done
    for report in /tmp/phases_upstream27.md /tmp/phases_lora27.md; do
        [ -f "$report" ] && { echo "## $report"; cat "$report"; echo; } >> "$OUT/phases.md"
    done
    ;;
28) # The multimodal target is stated on data comparable to upstream's measurement (865 tokens and 5.7 views per
    # sample here, against 1209 and 7.6 in the default set). Part 24's best setting within 26.8 GiB (5 samples a
    # step, 8-bit AdamW, loss chunk 512), upstream recipe. GPU0: the baseline mode (bench loop) on that set, then
    # the suite on it, with the benchmark's synchronisation around every training_step (as all rows before) and
    # with the Trainer's own (BENCH_SYNC=steps). GPU1: the same two on the default set; then LoRA only on the
    # upstream-like set.
    BEST="--max_steps 10 --optim adamw_bnb_8bit --loss_chunk_size 512 --per_device_train_batch_size 5 $UPSTREAM"
    (
        PORT=6600
        CUDA_VISIBLE_DEVICES=0 bench_train mm_baseline_ul28 --steps 8 --warmup 3 --mm-dir /tmp/mm_ul_gpu0 --mm-set upstream_like --config mm_upstream_baseline
        WARMUP=4 trainer m1_upstream_ul28 0 150 $MM_UL $BEST
        WARMUP=4 BENCH_SYNC=steps trainer m1_upstream_ul_stepsync28 0 150 $MM_UL $BEST
    ) &
    GPU0_PID=$!
    PORT=6500
    WARMUP=4 trainer m1_upstream28 1 170 $MM $BEST
    WARMUP=4 BENCH_SYNC=steps trainer m1_upstream_stepsync28 1 150 $MM $BEST
    WARMUP=4 trainer m1_lora_ul28 1 150 $MM_UL --max_steps 10 --optim adamw_bnb_8bit --loss_chunk_size 512 --per_device_train_batch_size 5 $LORA_ONLY
    while kill -0 $GPU0_PID 2>/dev/null; do sleep 2; done
    ;;
29) # Part 28's upstream-like rows in another call. GPU0: the suite, upstream recipe, 5 then 6 samples a step.
    # GPU1: the baseline mode (bench loop), upstream recipe and LoRA only, on the same set.
    BEST="--max_steps 10 --optim adamw_bnb_8bit --loss_chunk_size 512 --per_device_train_batch_size 5 $UPSTREAM"
    (
        PORT=6600
        WARMUP=4 trainer m1_upstream_ul29 0 150 $MM_UL $BEST
        WARMUP=4 trainer m1_upstream_ul_bs6_29 0 150 $MM_UL $BEST --per_device_train_batch_size 6
    ) &
    GPU0_PID=$!
    CUDA_VISIBLE_DEVICES=1 bench_train mm_baseline_ul29 --steps 8 --warmup 3 --mm-dir /tmp/mm_ul_gpu1 --mm-set upstream_like --config mm_upstream_baseline,mm_lora_baseline
    while kill -0 $GPU0_PID 2>/dev/null; do sleep 2; done
    ;;
30) # LoRA only on the upstream-like set, suite (GPU0) and baseline mode (GPU1) in one call (part 28 ran the
    # suite's row, part 29 the baseline's).
    CUDA_VISIBLE_DEVICES=1 bench_train mm_lora_baseline_ul30 --steps 8 --warmup 3 --mm-dir /tmp/mm_ul_gpu1 --mm-set upstream_like --config mm_lora_baseline &
    GPU1_PID=$!
    PORT=6600
    WARMUP=4 trainer m1_lora_ul30 0 150 $MM_UL --max_steps 10 --optim adamw_bnb_8bit --loss_chunk_size 512 --per_device_train_batch_size 5 $LORA_ONLY
    while kill -0 $GPU1_PID 2>/dev/null; do sleep 2; done
    ;;
31) # one GPU, nothing else running: the text speed mode through finetune.py with the step's host work trimmed
    # (MiniCPMV.train's skip, no nan filter) against the same without the trim, and the checkpointed
    # baseline before and after; first the attention kernels on the text row's shape
    timeout $((LIMIT - SECONDS)) python3 bench/attention_kernels.py --json "$OUT/attention_kernels.json" > /tmp/attention31.log 2>&1
    echo "attention_kernels: rc=$? at ${SECONDS}s" >> "$OUT/env.txt"
    { echo "===== attention_kernels"; tail -n 30 /tmp/attention31.log; } >> "$OUT/logs.txt"
    bench_train text_baseline31a --steps 8 --warmup 3 --config text_lora_baseline
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14"
    export WARMUP=5 BENCH_SYNC=steps
    trainer s1_lora_nogc_trimmed31 0 130 $NOGC
    BENCH_MODEL_TRAIN=library trainer s1_lora_nogc_untrimmed31 0 130 $NOGC --logging_nan_inf_filter true
    trainer s1_lora_nogc_trimmed31b 0 130 $NOGC
    bench_train text_baseline31b --steps 8 --warmup 3 --config text_lora_baseline
    ;;
32) # one GPU, nothing else running: the trimmed speed mode at 1 and 2 rows a step synchronised at step ends (as
    # part 31); at 1 row logging every 10 steps and synchronised only at the timed window's ends, without and with
    # non-blocking host-to-device copies; the baseline at 1 and 2 rows around them; then the GPU numerics tests
    bench_train text_baseline32a --steps 8 --warmup 3 --config text_lora_baseline
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14"
    export WARMUP=5
    BENCH_SYNC=steps trainer s1_lora_nogc_rows1_32 0 130 $NOGC
    BENCH_SYNC=steps trainer s1_lora_nogc_rows2_32 0 130 $NOGC --per_device_train_batch_size 2
    BENCH_SYNC=window trainer s1_lora_nogc_log10_32 0 130 $NOGC --logging_steps 10
    BENCH_SYNC=window trainer s1_lora_nogc_log10_nonblocking32 0 130 $NOGC --logging_steps 10 --accelerator_config '{"non_blocking": true}'
    bench_train text_baseline32b --steps 8 --warmup 3 --config text_lora_baseline
    bench_train text_baseline_rows2_32 --steps 8 --warmup 3 --text-rows 2 --config text_lora_baseline
    gpu_tests -rfEs
    ;;
33) # one GPU: the GPU numerics tests (started above, beside the set-up; part 32's ran out of time), then the
    # baseline and the speed mode logging every 5 steps (the first log, which took 0.5 s in part 32's window,
    # falls in the warm-up) with non-blocking copies, synchronised at the window's ends, then at every step end
    wait $TEST_PID
    bench_train text_baseline33 --steps 8 --warmup 3 --config text_lora_baseline
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14 --logging_steps 5"
    export WARMUP=5
    BENCH_SYNC=window trainer s1_lora_nogc_log5_nonblocking33 0 130 $NOGC --accelerator_config '{"non_blocking": true}'
    BENCH_SYNC=steps trainer s1_lora_nogc_log5_nonblocking_stepsync33 0 130 $NOGC --accelerator_config '{"non_blocking": true}'
    ;;
34) # one GPU, nothing else running: the text speed mode with finetune.py's defaults (non-blocking copies),
    # logging every step as finetune_lora.sh does, and no synchronisation of the benchmark's own (the logging's
    # is then the only one a step), at 1 and 2 rows a step; at 1 row also synchronised at step ends (as parts
    # 31-33). Around them the plain transformers+PEFT baselines with and without checkpointing, before and after
    BASELINES="text_lora_baseline,text_lora_baseline_nogc"
    bench_train text_baselines34a --steps 8 --warmup 3 --config $BASELINES
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 14"
    export WARMUP=5
    BENCH_SYNC=window trainer s1_lora_nogc_shipped34 0 130 $NOGC
    BENCH_SYNC=window trainer s1_lora_nogc_shipped_rows2_34 0 130 $NOGC --per_device_train_batch_size 2
    BENCH_SYNC=steps trainer s1_lora_nogc_stepsync34 0 130 $NOGC
    bench_train text_baselines34b --steps 8 --warmup 3 --config $BASELINES
    bench_train text_baseline_rows2_34 --steps 8 --warmup 3 --text-rows 2 --config text_lora_baseline
    ;;
35) # one GPU, nothing else running: the multimodal rows of parts 28-30 (data like upstream's, Update 9's best
    # setting within 26.8 GiB) with the defaults changed since (non-blocking copies, no nan filter, the
    # model.train skip), after the baseline mode of both recipes in the same call
    bench_train mm_baselines_ul35 --steps 8 --warmup 3 --mm-dir /tmp/mm_ul_gpu0 --mm-set upstream_like --config mm_upstream_baseline,mm_lora_baseline
    BEST="--max_steps 10 --optim adamw_bnb_8bit --loss_chunk_size 512 --per_device_train_batch_size 5"
    WARMUP=4 trainer m1_upstream_ul35 0 170 $MM_UL $BEST $UPSTREAM
    WARMUP=4 trainer m1_lora_ul35 0 150 $MM_UL $BEST $LORA_ONLY
    ;;
36) # one GPU, nothing else running: why letting the host run ahead (the shipped way) was faster than
    # synchronising at every step end on some machines and slower on others (parts 33, 34, 34b). The one-row
    # speed mode both ways, 40 steps each (35 timed), while nvidia-smi samples the SM clock, power and the
    # clock-limiting reasons every 100 ms; each run's start and end times are in marks.txt
    FIELDS="timestamp,clocks.sm,power.draw,temperature.gpu,utilization.gpu"
    nvidia-smi --query-gpu=$FIELDS,clocks_event_reasons.active --format=csv -i 0 > /dev/null 2>&1 && FIELDS="$FIELDS,clocks_event_reasons.active"
    nvidia-smi --query-gpu=$FIELDS --format=csv -i 0 -lms 100 > "$OUT/clocks.csv" 2>&1 &
    SAMPLER_PID=$!
    NOGC="$TEXT $LORA_ONLY --gradient_checkpointing false --max_steps 40"
    export WARMUP=5
    for sync in window steps; do
        echo "start $sync $(date -u +%Y/%m/%d\ %H:%M:%S.%N)" >> "$OUT/marks.txt"
        BENCH_SYNC=$sync trainer s1_lora_nogc_40steps_${sync}36 0 150 $NOGC
        echo "end $sync $(date -u +%Y/%m/%d\ %H:%M:%S.%N)" >> "$OUT/marks.txt"
    done
    kill $SAMPLER_PID 2>/dev/null
    ;;
esac
echo "part $PART done at ${SECONDS}s" >> "$OUT/env.txt"
[ -f "$OUT/results.jsonl" ] && python3 bench/summarize.py "$OUT/results.jsonl" > "$OUT/table.md"
