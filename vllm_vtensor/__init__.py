"""vllm-vtensor: a virtual-memory-backed KV cache for vLLM 0.32.

Nothing here imports torch or vLLM at import time; vLLM loads
:func:`vllm_vtensor.plugin.register` through the ``vllm.general_plugins``
entry point in every process.
"""
__version__ = "0.1.0"

# The only vLLM release the patches and hooks were written for.
VLLM_VERSION = "0.32.0"

# The attention backend name users pass (`--attention-backend VTENSOR`) and its class on each platform.
BACKEND_NAME = "VTENSOR"
BACKEND_PATH = "vllm_vtensor.backend.VTensorCPUBackend"
BACKEND_PATH_CUDA = "vllm_vtensor.backend_cuda.VTensorCudaBackend"


def backend_path() -> str:
    """The VTENSOR backend class for the platform vLLM runs on (imports vLLM's platform module)."""
    from vllm.platforms import current_platform

    return BACKEND_PATH_CUDA if current_platform.is_cuda() else BACKEND_PATH
