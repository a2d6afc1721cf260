"""What every engine is asked for under benchmarks/gpu_vllm.sh, which runs vLLM's Python source without
its compiled CUDA ops (``VTENSOR_NO_VLLM_OPS=1``): vLLM's native torch layers instead of its custom ops."""
from __future__ import annotations

import os

CUSTOM_OPS = ["none"]
KERNEL_CONFIG = {"ir_op_priority": {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}}


def without_vllm_ops() -> bool:
    """Whether vLLM's compiled CUDA ops are absent (gpu_vllm.sh sets ``VTENSOR_NO_VLLM_OPS=1``)."""
    return os.environ.get("VTENSOR_NO_VLLM_OPS") == "1"
