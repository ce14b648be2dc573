#!/usr/bin/env bash
# Mutation testing (not part of CI): break the code one exact edit at a time in a temporary copy of
# the working tree and check that the tests notice. Lowest CPU priority; arguments go to
# scripts/mutation.py (e.g. -m checkpointing, --list, -k ema#3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec nice -n 19 .venv/bin/python scripts/mutation.py "$@"
