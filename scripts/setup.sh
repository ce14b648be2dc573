#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and the system packages it needs.
#   bash scripts/setup.sh            python packages + CJK font
#   bash scripts/setup.sh --test     also what the test suite uses (tesseract, headless chromium; the
#                                    web-app test drives that chromium with Playwright: no browser download)
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

with_test=0
[ "${1:-}" = "--test" ] && with_test=1

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing python packages into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned, so nothing later pulls an unpinned (multi-GB CUDA) build.
  "$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' requirements.txt)"
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi

# System packages (Debian): a CJK font for Chinese rendering; for tests also tesseract and chromium.
missing=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
have_pkg fonts-wqy-microhei || missing+=(fonts-wqy-microhei)
have_pkg fonts-dejavu-core || missing+=(fonts-dejavu-core)
if [ "$with_test" = 1 ]; then
  have_pkg chromium || missing+=(chromium)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] please install these Debian packages (needs root): ${missing[*]}" >&2
  fi
fi
