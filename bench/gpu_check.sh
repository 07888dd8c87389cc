#!/usr/bin/env bash
# One prepared call for a lent GPU machine (device tool): install and the CUDA C++ build, the compile check (which
# also warms Triton's cache for the benchmark shapes), a quick check of both kernel backends on the GPU, the
# benchmarks of the three backends side by side with the performance model's prediction next to them, then the
# full kernel suite. Each stage has its own time
# limit (about 580 s in all, under the device's 600 s per command) so that a slow stage cannot take the others'
# results with it. Results land in $OUT (when set) and bench/results/, with the device named.
#   device run: bash bench/gpu_check.sh      (run(command="bash bench/gpu_check.sh", timeout_s=600))
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR" bench/results
LOG="$OUT_DIR/gpu_check.log"
stage() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
python3 -c "import torch, triton; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__,
            '| triton', triton.__version__)" | tee "$LOG"

stage "install, with the CUDA C++ extension for this GPU (backend=\"cuda\")"
if command -v nvcc >/dev/null; then
  TLRP_FORCE_CUDA_BUILD=1 TLRP_CUDA_ARCHS="9.0" MAX_JOBS=12 NVCC_THREADS=4 timeout 100 \
    python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG"
else
  echo "no nvcc on this machine: backend=cuda is skipped" | tee -a "$LOG"
  TLRP_SKIP_CUDA_BUILD=1 timeout 40 python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 \
    | tail -2 | tee -a "$LOG"
fi
timeout 10 python3 -c "import torch; from transformer_lrp._backend import not_supported_reasons as r;
print('backend=cuda:', r('cuda', (torch.zeros(1, device='cuda'),)) or 'ready')" 2>&1 | tail -1 | tee -a "$LOG"

stage "compile check, CI subset, this machine's Triton (sm_90a; warms the cache for the benchmark shapes)"
env -u TRITON_INTERPRET timeout 50 python3 bench/compile_check.py --quick --jobs "$(nproc)" \
  --csv "$OUT_DIR/kernel_resources_gpu_machine.csv" 2>&1 | grep -v "^  compiled" | tail -12 | tee -a "$LOG"

stage "quick check: the sweep on triton and cuda against the CPU float64 reference, bf16 against fp32"
timeout 80 python3 -m pytest -q -rfE tests/test_gpu.py tests/test_cuda_ext.py > "$OUT_DIR/gpu_quick_tests.txt" 2>&1
tail -15 "$OUT_DIR/gpu_quick_tests.txt" | tee -a "$LOG"

stage "benchmarks: explain vs input gradient, torch, triton and cuda side by side (default tiles)"
for dt in "--dtype bfloat16" "--dtype float32 --tf32"; do
  TLRP_AUTOTUNE=0 timeout 95 python3 bench/bench_explain.py --device cuda $dt \
    --vit-batch 64 --bert-batch 32 --seq 512 --repeats 3 2>&1 | tee -a "$LOG"
done
stage "the performance model (bench/results/gpu_model.md) next to the measured ratios"
python3 bench/gpu_model.py --compare bench/results/explain_ratio.csv 2>&1 | tee -a "$LOG"

stage "autotuned tiles against the default ones (ViT-B/16, bf16, transformer attribution)"
TLRP_AUTOTUNE=1 timeout 40 python3 bench/bench_explain.py --device cuda --backend triton --dtype bfloat16 \
  --vit-batch 64 --only "vit_base_patch16_224 transformer" --repeats 2 --no-save 2>&1 | tee -a "$LOG"
timeout 20 python3 bench/bench_attention.py --repeats 10 2>&1 | tee -a "$LOG"
TLRP_AUTOTUNE=0 timeout 20 python3 bench/bench_explain.py --device cuda --backend torch,triton --dtype bfloat16 \
  --vit-batch 64 --only "vit_base_patch16_224 transformer" --repeats 2 --profile --no-save \
  > "$OUT_DIR/gpu_profile.txt" 2>&1

stage "kernels against the reference (compiled for this GPU), every tile candidate, the fused sweep, the Functions"
timeout 70 python3 -m pytest -q -rfE tests/test_attention_triton.py tests/test_layernorm_triton.py \
  tests/test_residual_triton.py tests/test_linear_triton.py tests/test_kernel_candidates.py tests/test_functions.py \
  "tests/test_sweep.py::test_triton_explain_equals_torch" \
  > "$OUT_DIR/gpu_tests.txt" 2>&1
tail -25 "$OUT_DIR/gpu_tests.txt" | tee -a "$LOG"

cp bench/results/explain_ratio.csv bench/results/attention_kernels.csv "$OUT_DIR/" 2>/dev/null || true
stage "done"
