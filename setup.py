"""qwenvl-megatron: Qwen-VL on Megatron-Core. Builds the C++ indexed-dataset reader from csrc/."""
import glob

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError as e:  # pybind11 is a build requirement (pyproject / setup_env.sh install it)
    raise SystemExit("pybind11 is required to build qwenvl_megatron: pip install pybind11") from e

sources = sorted(glob.glob("csrc/*.cpp"))
ext_modules = [
    Pybind11Extension(
        "qwenvl_megatron._indexed",
        sources,
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
] if sources else []

setup(
    name="qwenvl-megatron",
    version="0.1.0",
    description="Megatron-Core trainer for the Qwen-VL vision-language model",
    packages=find_packages(include=["qwenvl_megatron", "qwenvl_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # CPU environment pins are exact in tools/setup_env.sh; ranges here admit a cluster's newer stack.
        "torch>=2.3",
        "megatron-core>=0.16.1,<0.20",
        "numpy>=1.24",
        "psutil",
        "safetensors>=0.4",
        "tiktoken>=0.5",
        "sentencepiece>=0.1.99",
        "pillow>=10",
    ],
    extras_require={
        "test": ["pytest>=7", "pycocoevalcap>=1.2", "webdataset>=0.2.86", "megatron-energon>=7.4,<8"],
        # tools/preprocess_data.py: WebDataset tar shards (img2dataset's output) and energon datasets.
        "data": ["webdataset>=0.2.86", "megatron-energon>=7.4,<8"],
        # tools/evaluate.py's CIDEr (pycocoevalcap's scorer; its PTB tokenizer uses Java when present).
        "eval": ["pycocoevalcap>=1.2"],
        # GPU clusters: Transformer Engine fused kernels and DALI GPU image decode (apex is used if present).
        "gpu": ["transformer-engine[pytorch]>=1.9", "nvidia-dali-cuda120>=1.30"],
        "dali": ["nvidia-dali-cuda120>=1.30"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
