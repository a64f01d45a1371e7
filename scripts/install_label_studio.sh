#!/usr/bin/env bash
# Install Label Studio 1.23.2 into its own virtual environment, so its many pinned
# dependencies never leak into the project's venv. Idempotent: re-running only
# checks the version. The path defaults to <repo>/.ls-venv; override with LS_VENV.
set -euo pipefail

LS_VERSION="1.23.2"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LS_VENV="${LS_VENV:-$REPO_ROOT/.ls-venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$LS_VENV/bin/python" ]; then
    echo "creating $LS_VENV"
    "$PYTHON" -m venv "$LS_VENV"
fi

installed="$("$LS_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null || true)"
if [ "$installed" = "$LS_VERSION" ]; then
    echo "label-studio $LS_VERSION already installed in $LS_VENV"
else
    "$LS_VENV/bin/python" -m pip install --quiet --upgrade pip
    "$LS_VENV/bin/python" -m pip install --quiet "label-studio==$LS_VERSION"
fi
echo "label-studio: $LS_VENV/bin/label-studio"
