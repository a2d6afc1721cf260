"""vllm-vtensor: a virtual-memory-backed KV cache for vLLM 0.32.

Nothing here imports torch or vLLM at import time; vLLM loads
:func:`vllm_vtensor.plugin.register` through the ``vllm.general_plugins``
entry point in every process.
"""
__version__ = "0.1.0"

# The only vLLM release the patches and hooks were written for.
VLLM_VERSION = "0.32.0"

# The attention backend name users pass (`--attention-backend VTENSOR`) and its class.
BACKEND_NAME = "VTENSOR"
BACKEND_PATH = "vllm_vtensor.backend.VTensorCPUBackend"
