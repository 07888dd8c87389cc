"""Build script. The Python package always; the CUDA C++ ops (``csrc/`` → ``transformer_lrp._C``) when asked for.

Environment:
    TLRP_FORCE_CUDA_BUILD=1   build the CUDA extension (needs nvcc and CUDA_HOME; no GPU needed to compile)
    TLRP_SKIP_CUDA_BUILD=1    never build it
    (neither set)             build it when torch sees a GPU and a CUDA toolkit
    TLRP_CUDA_ARCHS           compute capabilities, e.g. "8.0;9.0" (else TORCH_CUDA_ARCH_LIST, else "8.0;9.0")
    NVCC_THREADS              nvcc's --threads (default 2)
Under pip's build isolation torch is absent and nothing is built: install with ``--no-build-isolation`` to build.
"""

import os

from setuptools import find_packages, setup


def _cuda_build():
    if os.environ.get("TLRP_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    if os.environ.get("TLRP_FORCE_CUDA_BUILD", "0") != "1":
        try:  # automatic: a visible GPU and a CUDA toolkit (torch's CUDA_HOME finds nvcc)
            import torch
            from torch.utils.cpp_extension import CUDA_HOME
        except ImportError:
            return [], {}
        if not torch.cuda.is_available() or CUDA_HOME is None:
            return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("TLRP_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    ext = CUDAExtension(
        "transformer_lrp._C",
        ["csrc/ops.cpp", "csrc/normalized_add.cu", "csrc/layernorm_relevance.cu", "csrc/attention_relevance.cu"],
        depends=["csrc/common.cuh", "csrc/attention_math.cuh", "csrc/norm_math.cuh"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", f"--threads={os.environ.get('NVCC_THREADS', '2')}"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_build()

setup(
    name="transformer-lrp",
    version="0.1.0",
    description="Batched transformer attribution (Chefer et al., CVPR 2021) and its baselines for timm and "
    "transformers classifiers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # triton_kernels/ is installed as transformer_lrp.triton_kernels (the top-level name belongs to triton-lang)
    packages=find_packages(include=["transformer_lrp", "transformer_lrp.*"]) + ["transformer_lrp.triton_kernels"],
    package_dir={"transformer_lrp.triton_kernels": "triton_kernels"},
    # the demo's trained parts (4.2 MB, rebuilt by scripts/build_demo_models.py)
    package_data={"transformer_lrp.demo": ["*.pt", "*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    entry_points={"console_scripts": ["transformer-lrp=transformer_lrp.cli:main"]},
    extras_require={
        "models": ["timm>=1.0", "transformers>=4.40", "safetensors"],
        "eval": ["scikit-image>=0.22", "tqdm", "onnx>=1.15"],
        "captum": ["captum>=0.7"],
        "clip": ["open_clip_torch>=2.20"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "timm>=1.0", "transformers>=4.40", "safetensors",
                 "scikit-image>=0.22", "scikit-learn>=1.3", "tqdm"],
    },
)
