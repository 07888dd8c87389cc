#!/usr/bin/env bash
# The device check for one lent GPU slot (bench/gpu_check.py says what each command returns and why it fits):
#   run(command="bash bench/gpu_check.sh verdicts", timeout_s=480)   # 1. correctness verdicts
#   run(command="bash bench/gpu_check.sh ratios", timeout_s=480)     # 2. explanation / input gradient, memory
#   run(command="bash bench/gpu_check.sh extras", timeout_s=480)     # 3. autotuning, kernel ceilings, profile
# No install: the tree runs as it is (PYTHONPATH=.), output unbuffered, results in $OUT (or bench/results/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python3 -u bench/gpu_check.py "$@"
