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

_FIX = "Run it without --attention-backend VTENSOR (attention_backend=\"VTENSOR\")."


class VTensorCPUBackend(CPUAttentionBackend):
    """CPU attention over per-request contiguous virtual KV ranges."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME


def check_supported(cfg) -> None:
    """Refuse, naming the fix, what VTENSOR cannot serve (``cfg``: vLLM's ``AttentionSelectorConfig``)."""
    from vllm.v1.attention.backend import AttentionType

    problems = []
    if cfg.use_mla or cfg.use_sparse:
        problems.append("MLA and sparse attention models are not supported")
    if cfg.attn_type != AttentionType.DECODER:
        problems.append(f"only decoder self-attention keeps a KV cache here; this model's layers are {cfg.attn_type}")
    sizes = VTensorCPUBackend.get_supported_head_sizes()
    if cfg.head_size not in sizes:
        problems.append(f"head size {cfg.head_size} is not supported (supported: {sizes})")
    if cfg.dtype not in VTensorCPUBackend.supported_dtypes:
        names = [str(d).removeprefix("torch.") for d in VTensorCPUBackend.supported_dtypes]
        problems.append(f"dtype {str(cfg.dtype).removeprefix('torch.')} is not supported (supported: {names})")
    if cfg.kv_cache_dtype not in (None, "auto"):
        problems.append(f"kv_cache_dtype={cfg.kv_cache_dtype!r} is not supported (the vTensor KV cache keeps the "
                        "model dtype: use kv_cache_dtype='auto')")
    if problems:
        raise ValueError("--attention-backend VTENSOR cannot serve this model: " + "; ".join(problems) + ". " + _FIX)
