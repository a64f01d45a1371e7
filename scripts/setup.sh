#!/usr/bin/env bash
# Set-up, step 1: a virtualenv in .venv with CPU torch (pinned: an unpinned torch pulls CUDA wheels)
# and peal-backend installed with its test tools. Idempotent. VENV overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[test]"
"$VENV/bin/python" -c "import torch, transformers, peft, faiss, label_studio_sdk, rq; print('peal-backend ready: torch', torch.__version__)"
