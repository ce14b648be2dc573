#!/usr/bin/env bash
# The main job end to end on the built-in tiny model (CPU, no downloads):
#   tiny FLUX.1-Fill + SigLIP folders -> synthetic Latin + Chinese training set and held-out set
#   -> reward server (a separate process on a free loopback port) -> supervised warm-up
#   -> GRPO and DiffusionNFT, each from the warm-up checkpoint, with EMA and a held-out evaluation
#   -> one HTML report comparing base / warm-up / GRPO (EMA) / NFT (EMA) -> a short summary.
# The RL phases learn the `contrast` reward (luminance contrast inside the mask), which the tiny
# random model can visibly improve in a few minutes.
#
#   bash scripts/demo.sh                 # full demo (a few minutes on 2 CPU cores), into runs/demo/
#   DEMO_FAST=1 bash scripts/demo.sh     # reduced sizes (what the test suite runs)
#   DEMO_DIR=/tmp/demo bash scripts/demo.sh
#
# DEMO_DIR (relative paths are taken from the repository root) belongs to the demo: each run replaces
# its results there, and a non-empty folder the demo did not make is refused. Ctrl-C (or SIGTERM)
# stops the running step and the reward server; nothing is left running.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON_BIN:-.venv/bin/python}"
D="${DEMO_DIR:-runs/demo}"
FAST="${DEMO_FAST:-0}"

# ---------------------------------------------------------------------------- processes and cleanup
SERVER_PID=""
CHILD_PID=""

stop_pid() {  # TERM, up to 10 s to exit, then KILL
  local pid="$1"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$CHILD_PID"
  stop_pid "$SERVER_PID"
  rm -f "$D/reward_server.pid"
  if [ "$rc" -ne 0 ]; then
    echo "demo stopped (exit $rc); the reward server and running steps were stopped" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Every step runs as a background job that the shell waits for, so a signal reaches the trap
# at once (bash runs traps only between commands) and the trap can stop the step.
step() {  # step NAME COMMAND... : run with its output in $D/logs/NAME.log, show the tail on failure
  local name="$1" rc=0 start=$SECONDS
  shift
  printf '[demo] %-10s ' "$name"
  "$@" >"$D/logs/$name.log" 2>&1 &
  CHILD_PID=$!
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=""
  if [ "$rc" -ne 0 ]; then
    echo "FAILED (exit $rc); last lines of $D/logs/$name.log:"
    tail -n 30 "$D/logs/$name.log"
    return "$rc"
  fi
  echo "done in $((SECONDS - start)) s"
  echo "$name $((SECONDS - start))" >>"$D/timings.txt"
}

# ---------------------------------------------------------------------------- settings
if [ "$FAST" = 1 ]; then
  NUM_TRAIN=8 NUM_HELDOUT=4 WARMUP_STEPS=4 GRPO_STEPS=3 NFT_STEPS=2 GRPO_EVAL_EVERY=0 NFT_EVAL_EVERY=0
  REPORT_LIMIT=2 IMAGE_LOG_EVERY=1 VERIFY=0
else
  NUM_TRAIN=16 NUM_HELDOUT=8 WARMUP_STEPS=20 GRPO_STEPS=36 NFT_STEPS=12 GRPO_EVAL_EVERY=3 NFT_EVAL_EVERY=4
  REPORT_LIMIT=8 IMAGE_LOG_EVERY=4 VERIFY=1
fi
MODELS=(--pretrained_model_name_or_path "$D/models/flux-fill" --siglip_path "$D/models/siglip")
TINY=(--resolution 64 --num_tokens 8 --max_sequence_length 32 --reference_strip_height 16 --seed 0 --logging_steps 1)
# Found by experiment on the tiny model: a large LR, no KL, groups of 4 normalised per prompt,
# half the sampler steps trained, 4 sampler steps. GRPO's log-probability gradient is noisier:
# it rolls out 2 batches per RL epoch and takes 3 passes over them (3 optimizer steps per epoch).
RL=(--use_rl --rl_warmup_steps 0 --train_data_json "$D/data/data.jsonl" --rl_eval_data "$D/heldout/data.jsonl"
    --reward_weights contrast=1 --learning_rate 0.03 --rl_kl_beta 0 --rl_per_prompt_stat_tracking
    --rl_num_images_per_prompt 4 --train_batch_size 8 --rl_timestep_fraction 0.5 --rl_num_inference_steps 4
    --rl_copy_dtype fp32 --use_ema --checkpointing_steps 1000
    --rl_image_log_every "$IMAGE_LOG_EVERY")

# ---------------------------------------------------------------------------- the demo folder
if [ -e "$D" ] && [ ! -e "$D/.calligrapher-demo" ] && [ -n "$(ls -A "$D" 2>/dev/null)" ]; then
  echo "error: DEMO_DIR $D exists and was not made by this demo; choose another DEMO_DIR" >&2
  exit 2
fi
rm -rf "$D/models" "$D/data" "$D/heldout" "$D/warmup" "$D/grpo" "$D/nft" "$D/eval" "$D/logs" \
  "$D/timings.txt" "$D/summary.json" "$D/reward_server".*
mkdir -p "$D/logs"
touch "$D/.calligrapher-demo"

bash scripts/setup.sh
echo "[demo] writing to $D ($([ "$FAST" = 1 ] && echo reduced || echo full) size; logs in $D/logs/)"

step models $PY -m train.models.tiny --out "$D/models"
step data $PY -m train.data.synthesize --out "$D/data" --num "$NUM_TRAIN" --resolution 64 --lang en,zh --seed 0
step heldout $PY -m train.data.synthesize --out "$D/heldout" --num "$NUM_HELDOUT" --resolution 64 --lang en,zh --seed 5

# ---------------------------------------------------------------------------- reward server
printf '[demo] %-10s ' "server"
$PY -m train.reward_server --host 127.0.0.1 --port 0 --scorers contrast,background,style \
  --siglip_path "$D/models/siglip" --torch_threads 1 >"$D/reward_server.out" 2>"$D/logs/reward_server.log" &
SERVER_PID=$!
echo "$SERVER_PID" >"$D/reward_server.pid"
PORT=""
for _ in $(seq 1 600); do  # the start event is printed once the port accepts connections
  PORT="$(sed -n 's/.*"port": *\([0-9][0-9]*\).*/\1/p' "$D/reward_server.out" | head -n 1)"
  [ -n "$PORT" ] && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "FAILED: the reward server exited; $D/logs/reward_server.log:"
    tail -n 30 "$D/logs/reward_server.log"
    exit 1
  fi
  sleep 0.2
done
[ -n "$PORT" ] || { echo "FAILED: no start event from the reward server in 120 s"; exit 1; }
URL="http://127.0.0.1:$PORT"
$PY -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=10).read()' "$URL"
echo "$URL" >"$D/reward_server.url"
echo "healthy at $URL (pid $SERVER_PID)"

# ---------------------------------------------------------------------------- warm-up, GRPO, NFT
step warmup $PY -m train.train "${MODELS[@]}" "${TINY[@]}" --train_data_json "$D/data/data.jsonl" \
  --output_dir "$D/warmup" --train_batch_size 4 --learning_rate 1e-3 --max_train_steps "$WARMUP_STEPS" \
  --checkpointing_steps "$WARMUP_STEPS"
WARM="$D/warmup/checkpoint-$WARMUP_STEPS/ip-adapter.bin"

GRPO=("${MODELS[@]}" "${TINY[@]}" "${RL[@]}" --initial_ip_adapter_path "$WARM" --reward_server_url "$URL"
      --output_dir "$D/grpo" --rl_method grpo --rl_num_inner_epochs 3 --rl_num_batches_per_epoch 2
      --gradient_accumulation_steps 2 --max_train_steps "$GRPO_STEPS"
      --rl_eval_every "$GRPO_EVAL_EVERY")
if [ "$VERIFY" = 1 ]; then  # the pre-flight check a real run starts with, on the GRPO run's own flags
  step verify $PY verify_deployment.py "${GRPO[@]}" --min_free_gb 1
fi
step grpo $PY -m train.train "${GRPO[@]}"
step nft $PY -m train.train "${MODELS[@]}" "${TINY[@]}" "${RL[@]}" --initial_ip_adapter_path "$WARM" \
  --reward_server_url "$URL" --output_dir "$D/nft" --rl_method nft --max_train_steps "$NFT_STEPS" \
  --rl_eval_every "$NFT_EVAL_EVERY"

# ---------------------------------------------------------------------------- one report
step report $PY -m train.evaluate "${MODELS[@]}" --data "$D/heldout/data.jsonl" --limit "$REPORT_LIMIT" \
  --output_dir "$D/eval" --no_adapter \
  --ip_adapter_path "$D/warmup/checkpoint-$WARMUP_STEPS" --label warm-up \
  --ip_adapter_path "$D/grpo/checkpoint-$GRPO_STEPS@ema" --label "GRPO (EMA)" \
  --ip_adapter_path "$D/nft/checkpoint-$NFT_STEPS@ema" --label "NFT (EMA)" \
  --resolution 64 --reference_strip_height 16 --max_sequence_length 32 --num_inference_steps 4 \
  --guidance_scale 3.5 --reward_weights contrast=1,background=0,style=0 --reward_server_url "$URL" \
  --title "Calligrapher demo: contrast reward on the held-out set"

stop_pid "$SERVER_PID"
SERVER_PID=""
rm -f "$D/reward_server.pid"
echo "[demo] server     stopped"
$PY scripts/demo_summary.py --demo_dir "$D"
