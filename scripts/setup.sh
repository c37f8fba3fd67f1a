#!/usr/bin/env bash
# Create .venv (once) and install splatforge with its test dependencies into it.
# torch==2.13.0 is installed first, with torchvision==0.28.0 (the build that pairs with it, for
# LPIPS) in the same step: on CPU machines torch is the local CPU wheel, while a bare `torch` or
# `torchvision` requirement would pull several GB of CUDA packages or another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.splatforge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0" "torchvision==0.28.0"
  "$VPY" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
