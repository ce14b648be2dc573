#!/usr/bin/env bash
# Supervised flow-matching training of the style adapter on one node with 8 GPUs at 512x512
# (the warm-up before RL). Paths come from the environment:
#
#   FLUX=/models/FLUX.1-Fill-dev SIGLIP=/models/siglip-so400m-patch14-384 \
#   DATA=data/train.jsonl OUT=runs/sft bash examples/train_supervised.sh [extra train.train flags]
#
# Required: FLUX, SIGLIP, DATA, OUT. Optional: INIT_ADAPTER (e.g. the released calligrapher.bin),
# MAX_STEPS (10000), ACCELERATE_CONFIG (default examples/accelerate/ddp_8gpu.yaml; one GPU:
# examples/accelerate/single_gpu.yaml), LAUNCH_ARGS (multi-node), SKIP_VERIFY=1, DRY_RUN=1.
set -euo pipefail
CALLER_DIR="$(pwd)"
cd "$(dirname "$0")/.."
source examples/rl_common.sh

require FLUX "a diffusers-layout FLUX.1-Fill-dev folder" /models/FLUX.1-Fill-dev
require SIGLIP "a SigLIP vision model folder" /models/siglip-so400m-patch14-384
require DATA "the training data (.jsonl/.json or a benchmark folder)" data/train.jsonl
require OUT "the run's output folder" runs/sft
for v in FLUX SIGLIP DATA OUT INIT_ADAPTER; do abs "$v"; done

ARGS=(
  --pretrained_model_name_or_path "$FLUX" --siglip_path "$SIGLIP"
  --train_data_json "$DATA" --output_dir "$OUT"
  --resolution 512 --train_batch_size 1 --gradient_accumulation_steps 4 --learning_rate 1e-4
  --mixed_precision bf16 --gradient_checkpointing --use_8bit_adam
  --max_train_steps "${MAX_STEPS:-10000}" --checkpointing_steps 500 --checkpoints_total_limit 5
  --use_ema --ema_device cpu --resume_from_checkpoint latest
)
if [ -n "${INIT_ADAPTER:-}" ]; then ARGS+=(--initial_ip_adapter_path "$INIT_ADAPTER"); fi

launch "${ARGS[@]}" "$@"
