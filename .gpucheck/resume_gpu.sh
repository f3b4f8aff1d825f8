#!/bin/bash
# Resume under DeepSpeed on a GPU in bf16: are the checkpoint's pickles inside the weights-only allow-list?
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import deepspeed, torch, transformers; print(deepspeed.__version__, torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
W=/tmp/work; mkdir -p $W
python3 -m finetune.model.build_tiny $W/model >/dev/null && python3 -m finetune.demo_data $W/data >/dev/null || exit 1
for cfg in zero2 zero3; do
  common="--model_name_or_path $W/model --data_path $W/data/train.json --output_dir $W/out_$cfg --report_to none --dataloader_num_workers 0 --disable_tqdm true --save_strategy steps --save_steps 2 --logging_steps 1 --deepspeed finetune/ds_config_$cfg.json --compile_layers false"
  torchrun --nproc_per_node 1 --master_port 29511 finetune/finetune.py $common --max_steps 2 > $OUT/first_$cfg.log 2>&1; echo "first $cfg rc=$?"
  tail -3 $OUT/first_$cfg.log
  python3 .gpucheck/list_globals.py $W/out_$cfg/checkpoint-2
  torchrun --nproc_per_node 1 --master_port 29512 finetune/finetune.py $common --max_steps 4 --resume_from_checkpoint true > $OUT/resume_$cfg.log 2>&1; echo "resume $cfg rc=$?"
  grep -E "resum|error|Error|'loss'" $OUT/resume_$cfg.log | head -8
done
