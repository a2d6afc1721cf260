"""The ``VTENSOR`` attention backend.

The model runner works in *virtual* block ids (see :mod:`vllm_vtensor.worker`):
request r's j-th block is ``slot(r) * blocks_per_slot + j``, so its block
table row is consecutive ids and its KV is one contiguous range.  On CPU,
vLLM's own attention kernel reads that layout through the consecutive rows
(the kernel honours the per-layer block stride), with no copy and no gather
from scattered pages; the KV write path is vLLM's ``reshape_and_cache``
addressed by the same virtual slots.

GPU: the Triton kernels of :mod:`vllm_vtensor.kernels` are not wired into a
CUDA backend yet, so VTENSOR is refused on CUDA with a clear error.
"""
from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from . import BACKEND_NAME


class VTensorCPUBackend(CPUAttentionBackend):
    """CPU attention over per-request contiguous virtual KV ranges."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME
