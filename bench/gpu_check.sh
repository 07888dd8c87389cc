#!/usr/bin/env bash
# One prepared call for a lent GPU machine (device tool): install the package, run the kernel/reference tests
# compiled on the GPU (TRITON_INTERPRET stays unset when CUDA is present) plus the CUDA-vs-CPU tests, then the
# explain/input-gradient benchmark. Results land in $OUT (when set) and bench/results/, with the device named.
#   device run: bash bench/gpu_check.sh            (about 5 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
python3 -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)" \
  | tee "$OUT_DIR/gpu_check.log"
python3 -m pytest -q tests/test_gpu.py tests/test_residual_triton.py tests/test_linear_triton.py tests/test_explain_triton.py \
  tests/test_parity_original.py tests/test_batching.py 2>&1 | tail -15 | tee -a "$OUT_DIR/gpu_check.log"
for batch in 8 64; do
  python3 bench/bench_explain.py --device cuda --batch "$batch" --repeats 10 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
done
cp bench/results/explain_ratio.csv "$OUT_DIR/" 2>/dev/null || true
