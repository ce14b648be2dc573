#!/usr/bin/env bash
# Supervised training of the style adapter on one node. Set the three paths, then run.
# Multi-GPU: ACCELERATE_CONFIG=examples/accelerate/ddp_8gpu.yaml bash examples/train_supervised.sh
set -euo pipefail
FLUX="${FLUX:-/models/FLUX.1-Fill-dev}"
SIGLIP="${SIGLIP:-/models/siglip-so400m-patch14-384}"
DATA="${DATA:-data/train.jsonl}"
OUT="${OUT:-runs/sft}"
CONFIG=()
[ -n "${ACCELERATE_CONFIG:-}" ] && CONFIG=(--config_file "$ACCELERATE_CONFIG")

python verify_deployment.py --pretrained_model_name_or_path "$FLUX" --siglip_path "$SIGLIP" \
  --train_data_json "$DATA" --output_dir "$OUT"
accelerate launch "${CONFIG[@]}" -m train.train \
  --pretrained_model_name_or_path "$FLUX" --siglip_path "$SIGLIP" \
  --train_data_json "$DATA" --output_dir "$OUT" \
  --resolution 512 --train_batch_size 1 --gradient_accumulation_steps 4 --learning_rate 1e-4 \
  --mixed_precision bf16 --gradient_checkpointing \
  --max_train_steps 10000 --checkpointing_steps 500 --checkpoints_total_limit 5 \
  --use_ema --ema_device cpu --resume_from_checkpoint latest "$@"
