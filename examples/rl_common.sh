# Sourced by the example scripts (not run on its own): required paths from the environment,
# relative paths resolved against the caller's folder, and DRY_RUN=1 (print, do not run).

CALLER_DIR="${CALLER_DIR:-$(pwd)}"

# require NAME "what it is" EXAMPLE: a clear error when NAME is unset or empty.
require() {
  if [ -z "${!1:-}" ]; then
    echo "error: environment variable $1 is not set: $2 (e.g. $1=$3 bash $0)" >&2
    exit 2
  fi
}

# abs NAME: make the path in NAME absolute against the folder the script was started from
# (the scripts themselves run from the repository root, as `python -m train.train` must).
abs() {
  local value="${!1:-}"
  if [ -n "$value" ] && [[ "$value" != /* ]]; then
    printf -v "$1" '%s' "$CALLER_DIR/$value"
  fi
}

# run COMMAND...: run it, or with DRY_RUN=1 print it shell-quoted on one line.
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# launch TRAIN_ARGS...: the pre-flight check on the run's own flags (SKIP_VERIFY=1 skips it), then
# `accelerate launch` with ACCELERATE_CONFIG (default: one node, 8 GPUs) and LAUNCH_ARGS
# (e.g. "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500" on a second node).
launch() {
  local config="${ACCELERATE_CONFIG:-examples/accelerate/ddp_8gpu.yaml}"
  local -a extra=()
  read -r -a extra <<<"${LAUNCH_ARGS:-}"
  if [ "${SKIP_VERIFY:-0}" != 1 ]; then
    run "${PYTHON:-python}" verify_deployment.py --require_gpu "$@"
  fi
  run "${ACCELERATE:-accelerate}" launch --config_file "$config" "${extra[@]}" -m train.train "$@"
}
