#!/usr/bin/env bash
# One prepared call for a lent GPU machine (device tool): install, a quick check of the kernels on the GPU, the
# benchmarks, then the full kernel suite and the CUDA C++ build. Each stage has its own time limit (about 535 s in
# all, under the device's 600 s per command) so that a slow stage cannot take the others' results with it. Results
# land in $OUT (when set) and bench/results/, with the device named.
#   device run: bash bench/gpu_check.sh      (run(command="bash bench/gpu_check.sh", timeout_s=600))
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR" bench/results
LOG="$OUT_DIR/gpu_check.log"
stage() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
python3 -c "import torch, triton; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__,
            '| triton', triton.__version__)" | tee "$LOG"

stage "install (Python only)"
TLRP_SKIP_CUDA_BUILD=1 timeout 45 python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 \
  | tail -2 | tee -a "$LOG"

stage "quick check: the fused sweep on CUDA against the CPU float64 reference, bf16 against fp32"
timeout 90 python3 -m pytest -q -rfE tests/test_gpu.py > "$OUT_DIR/gpu_quick_tests.txt" 2>&1
tail -15 "$OUT_DIR/gpu_quick_tests.txt" | tee -a "$LOG"

stage "benchmarks: explain vs input gradient, torch and triton side by side"
for dt in "--dtype bfloat16" "--dtype float32 --tf32"; do
  timeout 85 python3 bench/bench_explain.py --device cuda --backend torch,triton $dt --vit-batch 64 \
    --bert-batch 32 --seq 512 --repeats 3 2>&1 | tee -a "$LOG"
done
timeout 30 python3 bench/bench_attention.py --repeats 10 2>&1 | tee -a "$LOG"
timeout 25 python3 bench/bench_explain.py --device cuda --backend torch,triton --dtype bfloat16 --vit-batch 64 \
  --only "vit_base_patch16_224 transformer" --repeats 2 --profile --no-save > "$OUT_DIR/gpu_profile.txt" 2>&1

stage "kernels against the reference (compiled for this GPU), the fused sweep, the autograd.Functions"
timeout 100 python3 -m pytest -q -rfE tests/test_attention_triton.py tests/test_layernorm_triton.py \
  tests/test_residual_triton.py tests/test_linear_triton.py tests/test_functions.py tests/test_explain_triton.py \
  "tests/test_fused_sweep.py::test_triton_explain_equals_torch" > "$OUT_DIR/gpu_tests.txt" 2>&1
tail -25 "$OUT_DIR/gpu_tests.txt" | tee -a "$LOG"

stage "CUDA C++ extension (where nvcc exists)"
if command -v nvcc >/dev/null; then
  TLRP_FORCE_CUDA_BUILD=1 TLRP_CUDA_ARCHS="9.0" MAX_JOBS=8 timeout 60 \
    python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG"
  timeout 15 python3 -m pytest -q tests/test_cuda_ext.py 2>&1 | tail -5 | tee -a "$LOG"
else
  echo "no nvcc on this machine" | tee -a "$LOG"
fi
cp bench/results/explain_ratio.csv bench/results/attention_kernels.csv "$OUT_DIR/" 2>/dev/null || true
stage "done"
