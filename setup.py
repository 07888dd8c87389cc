"""Build script. The package is pure Python for now; the CUDA extension (``csrc/``) is built here once it exists."""

from setuptools import find_packages, setup

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
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    entry_points={"console_scripts": ["transformer-lrp=transformer_lrp.cli:main"]},
    extras_require={
        "models": ["timm>=1.0", "transformers>=4.40", "safetensors"],
        "eval": ["scikit-image>=0.22", "tqdm", "onnx>=1.15"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "timm>=1.0", "transformers>=4.40", "safetensors",
                 "scikit-image>=0.22", "scikit-learn>=1.3", "tqdm"],
    },
)
