#!/usr/bin/env bash
# One reward server per GPU (CUDA_VISIBLE_DEVICES=i, port BASE_PORT+i), then the
# --reward_server_url list to give training. Runs until Ctrl-C, which stops every server.
#
#   SIGLIP=/models/siglip-so400m-patch14-384 NUM_GPUS=8 bash examples/serve_reward.sh
#
# Optional: NUM_GPUS (8), BASE_PORT (8000), HOST (127.0.0.1; another address needs
# REWARD_SERVER_TOKEN, which the servers and training both read), PUBLIC_HOST (the name
# training nodes use to reach this machine; default HOST), SCORERS (ocr,style,background),
# DEVICE (cuda; cpu for a machine without GPUs), VLM_URL / VLM_MODEL (for the vlm scorer),
# LOG_DIR (runs/reward_servers), DRY_RUN=1 (print the commands and the URL list).
set -euo pipefail
CALLER_DIR="$(pwd)"
cd "$(dirname "$0")/.."
source examples/rl_common.sh

NUM_GPUS="${NUM_GPUS:-8}"
BASE_PORT="${BASE_PORT:-8000}"
HOST="${HOST:-127.0.0.1}"
PUBLIC_HOST="${PUBLIC_HOST:-$HOST}"
SCORERS="${SCORERS:-ocr,style,background}"
DEVICE="${DEVICE:-cuda}"
LOG_DIR="${LOG_DIR:-runs/reward_servers}"
abs LOG_DIR
if [[ ",$SCORERS," == *",style,"* ]]; then
  require SIGLIP "the SigLIP folder the style scorer needs" /models/siglip-so400m-patch14-384
  abs SIGLIP
fi
case "$HOST" in
  127.*|localhost|::1) ;;
  *) if [ -z "${REWARD_SERVER_TOKEN:-}" ]; then
       echo "error: HOST=$HOST is reachable from other machines; set REWARD_SERVER_TOKEN (a shared secret)" >&2
       exit 2
     fi ;;
esac

EXTRA=()
if [ -n "${SIGLIP:-}" ]; then EXTRA+=(--siglip_path "$SIGLIP"); fi
if [ -n "${VLM_URL:-}" ]; then EXTRA+=(--vlm_url "$VLM_URL" --vlm_model "${VLM_MODEL:?set VLM_MODEL with VLM_URL}"); fi

PIDS=()
stop_all() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

URLS=()
[ "${DRY_RUN:-0}" = 1 ] || mkdir -p "$LOG_DIR"
for ((i = 0; i < NUM_GPUS; i++)); do
  port=$((BASE_PORT + i))
  cmd=(env CUDA_VISIBLE_DEVICES="$i" "${PYTHON:-python}" -m train.reward_server --host "$HOST" --port "$port"
       --scorers "$SCORERS" --device "$DEVICE" "${EXTRA[@]}")
  URLS+=("http://$PUBLIC_HOST:$port")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    run "${cmd[@]}"
    continue
  fi
  "${cmd[@]}" >"$LOG_DIR/server-$i.out" 2>"$LOG_DIR/server-$i.log" &
  PIDS+=($!)
done
LIST="$(IFS=,; echo "${URLS[*]}")"
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "--reward_server_url $LIST"
  exit 0
fi

# Each server prints one JSON start event on stdout once its port accepts connections.
for ((i = 0; i < NUM_GPUS; i++)); do
  for _ in $(seq 1 1200); do
    grep -q reward_server_start "$LOG_DIR/server-$i.out" 2>/dev/null && break
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      echo "error: reward server $i exited; $LOG_DIR/server-$i.log:" >&2
      tail -n 20 "$LOG_DIR/server-$i.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  grep -q reward_server_start "$LOG_DIR/server-$i.out" || { echo "error: reward server $i did not start in 10 min" >&2; exit 1; }
done
echo "$NUM_GPUS reward servers ($SCORERS) are up; logs in $LOG_DIR. Give training:"
echo "  --reward_server_url $LIST"
echo "  (examples: REWARD_URLS=$LIST)"
echo "Ctrl-C stops them."
wait
