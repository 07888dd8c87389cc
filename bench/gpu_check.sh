#!/usr/bin/env bash
# One prepared call for a lent GPU machine (device tool): build, check the kernels against the reference on the
# GPU, then benchmark, in one go. Every stage has its own time limit so that a slow stage cannot take the results
# of the others with it. Results land in $OUT (when set) and bench/results/, with the device named.
#   device run: bash bench/gpu_check.sh        (about 8 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR" bench/results
LOG="$OUT_DIR/gpu_check.log"
python3 -c "import torch, triton; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__,
            '| triton', triton.__version__)" | tee "$LOG"

# 1. install; the CUDA C++ ops too where nvcc exists (a failed build is logged, the rest goes on)
TLRP_SKIP_CUDA_BUILD=1 python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -2 | tee -a "$LOG"
if command -v nvcc >/dev/null; then
  TLRP_FORCE_CUDA_BUILD=1 TLRP_CUDA_ARCHS="9.0" MAX_JOBS=8 timeout 300 \
    python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG" \
    || echo "CUDA extension build failed" | tee -a "$LOG"
fi

# 2. kernels (compiled for this GPU) against the reference, the fused sweep, CUDA vs CPU, bf16 vs fp32
timeout 300 python3 -m pytest -q -x tests/test_gpu.py tests/test_attention_triton.py tests/test_layernorm_triton.py \
  tests/test_residual_triton.py tests/test_linear_triton.py tests/test_cuda_ext.py tests/test_functions.py \
  2>&1 | tail -15 | tee -a "$LOG"
timeout 200 python3 -m pytest -q tests/test_fused_sweep.py -k "triton" 2>&1 | tail -5 | tee -a "$LOG"

# 3. benchmarks: explain vs input gradient, torch and triton side by side (time, peak memory, samples/s)
for dt in "--dtype bfloat16" "--dtype float32 --tf32"; do
  timeout 240 python3 bench/bench_explain.py --device cuda --backend torch,triton $dt --vit-batch 64 \
    --bert-batch 32 --seq 512 --repeats 5 2>&1 | tee -a "$LOG"
done
timeout 120 python3 bench/bench_attention.py --repeats 10 2>&1 | tee -a "$LOG"
timeout 120 python3 bench/bench_explain.py --device cuda --backend torch,triton --dtype bfloat16 --vit-batch 64 \
  --only "vit_base_patch16_224 transformer" --repeats 2 --profile --no-save 2>&1 | tee "$OUT_DIR/gpu_profile.txt" \
  | tail -3
cp bench/results/explain_ratio.csv bench/results/attention_kernels.csv "$OUT_DIR/" 2>/dev/null || true
