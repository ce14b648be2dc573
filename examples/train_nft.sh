#!/usr/bin/env bash
# DiffusionNFT on one node with 8 GPUs at 512x512. Paths come from the environment:
#
#   FLUX=/models/FLUX.1-Fill-dev SIGLIP=/models/siglip-so400m-patch14-384 \
#   DATA=data/train.jsonl EVAL_DATA=data/heldout.jsonl OUT=runs/nft \
#   REWARD_URLS=http://127.0.0.1:8000,http://127.0.0.1:8001 \
#   INIT_ADAPTER=runs/sft/checkpoint-10000/ip-adapter.bin bash examples/train_nft.sh [extra train.train flags]
#
# Required: FLUX, SIGLIP, DATA, OUT. Optional: EVAL_DATA (held-out set, strongly recommended),
# REWARD_URLS (from examples/serve_reward.sh; unset = score in-process on every GPU),
# REWARD_WEIGHTS, INIT_ADAPTER (start RL from these weights; without it the run first does
# WARMUP_STEPS supervised steps), WARMUP_STEPS, MAX_STEPS (optimizer steps, warm-up included),
# ACCELERATE_CONFIG, LAUNCH_ARGS (multi-node), SKIP_VERIFY=1, DRY_RUN=1 (print the commands).
# The reward server token is read from REWARD_SERVER_TOKEN by both sides.
set -euo pipefail
CALLER_DIR="$(pwd)"
cd "$(dirname "$0")/.."
source examples/rl_common.sh

require FLUX "a diffusers-layout FLUX.1-Fill-dev folder" /models/FLUX.1-Fill-dev
require SIGLIP "a SigLIP vision model folder" /models/siglip-so400m-patch14-384
require DATA "the training data (.jsonl/.json or a benchmark folder)" data/train.jsonl
require OUT "the run's output folder" runs/nft
for v in FLUX SIGLIP DATA OUT EVAL_DATA INIT_ADAPTER; do abs "$v"; done

if [ -n "${INIT_ADAPTER:-}" ]; then WARMUP_STEPS="${WARMUP_STEPS:-0}"; else WARMUP_STEPS="${WARMUP_STEPS:-1000}"; fi
ARGS=(
  --pretrained_model_name_or_path "$FLUX" --siglip_path "$SIGLIP"
  --train_data_json "$DATA" --output_dir "$OUT"
  --resolution 512 --mixed_precision bf16 --gradient_checkpointing --use_8bit_adam
  --max_train_steps "${MAX_STEPS:-$((WARMUP_STEPS + 1000))}" --learning_rate 1e-5
  # RL starts with a fresh AdamW at its own learning rate and weight decay (DiffusionNFT's 1e-4)
  --rl_learning_rate 1e-5 --rl_adam_weight_decay 1e-4
  --use_ema --ema_device cpu --ema_decay 0.995
  --use_rl --rl_method nft --rl_warmup_steps "$WARMUP_STEPS"
  # 8 GPUs x 1 image = one group of 8 per batch; 8 batches (64 images) per RL epoch; 2 optimizer steps per epoch
  --train_batch_size 1 --rl_num_images_per_prompt 8 --rl_num_batches_per_epoch 8 --gradient_accumulation_steps 4
  --rl_per_prompt_stat_tracking --rl_adv_clip_max 5
  # deterministic rollouts with the old adapter at the deployed guidance (--rl_guidance_scale follows
  # --guidance_scale, 30); half of the 12 noise levels trained per sample
  --rl_num_inference_steps 12 --rl_timestep_fraction 0.5
  # a decaying old adapter (stored in fp32); no KL reference copy, so that the run fits 8 x 80 GB
  # (python -m train.plan: 71.4 GiB per process; with --rl_kl_beta 0.01 77.0 GiB, over the usable 75 GiB;
  # on 80 GB GPUs a KL anchor fits with --nft_decay_type 0: 69.4 GiB)
  --nft_beta 0.5 --nft_adv_mode normal --nft_decay_type 1 --rl_kl_beta 0 --rl_copy_dtype bf16
  --reward_weights "${REWARD_WEIGHTS:-ocr=0.7,style=0.2,background=0.1}"
  --rl_image_log_every 10
  --checkpointing_steps 100 --checkpoints_total_limit 5 --resume_from_checkpoint latest
)
if [ -n "${EVAL_DATA:-}" ]; then ARGS+=(--rl_eval_data "$EVAL_DATA" --rl_eval_every 10); fi
if [ -n "${REWARD_URLS:-}" ]; then ARGS+=(--reward_server_url "$REWARD_URLS"); fi
if [ -n "${INIT_ADAPTER:-}" ]; then ARGS+=(--initial_ip_adapter_path "$INIT_ADAPTER"); fi

launch "${ARGS[@]}" "$@"
