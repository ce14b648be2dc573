#!/usr/bin/env bash
# GRPO straight from the released Calligrapher adapter (the official calligrapher.bin layout loads
# as is): --initial_ip_adapter_path calligrapher.bin --rl_warmup_steps 0, everything else as in
# examples/train_grpo.sh (same environment variables, DRY_RUN=1 included).
#
#   CALLIGRAPHER_BIN=/models/Calligrapher/calligrapher.bin \
#   FLUX=/models/FLUX.1-Fill-dev SIGLIP=/models/siglip-so400m-patch14-384 \
#   DATA=data/train.jsonl EVAL_DATA=data/heldout.jsonl OUT=runs/grpo-released \
#   REWARD_URLS=http://127.0.0.1:8000 bash examples/train_grpo_from_calligrapher_bin.sh
#
# DiffusionNFT from the same weights: INIT_ADAPTER=calligrapher.bin WARMUP_STEPS=0 bash examples/train_nft.sh
set -euo pipefail
HERE="$(dirname "$0")"
source "$HERE/rl_common.sh"

require CALLIGRAPHER_BIN "the released adapter weights" /models/Calligrapher/calligrapher.bin
INIT_ADAPTER="$CALLIGRAPHER_BIN" WARMUP_STEPS=0 exec bash "$HERE/train_grpo.sh" "$@"
