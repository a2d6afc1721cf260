"""The ``VTENSOR`` attention backend on CUDA GPUs.

Same model as on CPU (:mod:`vllm_vtensor.backend`, :mod:`vllm_vtensor.worker`): the runner works
in virtual block ids, request r's blocks are ``slot(r) * blocks_per_slot + j`` and its KV, all
layers, is one contiguous range of a :class:`~vllm_vtensor.kv_space.KVSpace` reserved with the
CUDA VMM backend (:mod:`vllm_vtensor.vmm.cuda`); chunks are mapped as requests grow and the
virtual addresses never move, so CUDA graphs captured over the layer views stay valid.

Built on vLLM's Triton backend, which keeps each layer's cache in the logical ``(blocks, H, N,
2 * D)`` order the KV space's layer views have, and writes new K/V with vLLM's Triton
``reshape_and_cache_flash`` through the virtual slot mapping.  The attention, chosen by
``$VTENSOR_ATTENTION``:

* ``triton`` (default on CUDA): this project's Triton kernels (:mod:`vllm_vtensor.kernels`),
  given each request's first virtual block (``block_table[:, 0]``) and plain strides - no block
  table is read inside a kernel;
* ``vllm``: vLLM's own ``unified_attention`` over the same layout (through the block table), for
  comparison.

fp8 KV caches (``--kv-cache-dtype fp8``/``fp8_e4m3``/``fp8_e5m2``, per-tensor scales, SM89+ as in
vLLM's Triton backend): vLLM's writer stores every one of them as the platform's fp8 type, divided
by the layer's scale; both kernels read those bytes and upcast them in registers.
"""
from __future__ import annotations

from vllm.v1.attention.backend import AttentionType
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from . import BACKEND_NAME
from .backend import ATTENTION_ENV, chosen_kernel, refuse_unsupported, run_kernels
from .policy import preferred_block_size

CUDA_ATTENTION_KERNELS = ("triton", "vllm")
# The CUDA VMM granularity (cuMemGetAllocationGranularity, minimum) on NVIDIA GPUs: a chunk is a
# multiple of it. Used to pick the block size before any CUDA context exists; the worker checks the real one.
CUDA_GRANULARITY = 2 << 20


def cuda_attention_kernel() -> str:
    """The attention ``$VTENSOR_ATTENTION`` selects on CUDA (default ``triton``)."""
    return chosen_kernel(CUDA_ATTENTION_KERNELS, " on CUDA")


class VTensorTritonImpl(TritonAttentionImpl):
    """This project's Triton kernels over per-request contiguous KV ranges (or vLLM's, ``$VTENSOR_ATTENTION=vllm``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel = cuda_attention_kernel()
        if self.kernel == "vllm":
            return
        refuse_unsupported(self, self.sliding_window != (-1, -1),
                           f"set {ATTENTION_ENV}=vllm (vLLM's kernel over the same layout) or run without VTENSOR")
        from .kernels import attention as kernels

        self._context, self._decode = kernels.context_attention, kernels.decode_attention

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if (self.kernel == "vllm" or attn_metadata is None or output_scale is not None
                or output_block_scale is not None or self.attn_type != AttentionType.DECODER
                or not isinstance(attn_metadata.causal, bool) or not attn_metadata.causal):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        # (blocks, H, N, 2D) -> K and V as (blocks, H, N, D) views: no copy, the kernels take strides
        k_cache, v_cache = kv_cache.split(self.head_size, dim=-1)
        if not is_quantized_kv_cache(self.kv_cache_dtype):
            return run_kernels(self, query, output, k_cache, v_cache, attn_metadata)
        # fp8: the bytes vLLM's writer stored (as the platform's fp8 type, whichever fp8 was asked for)
        return run_kernels(self, query, output, k_cache.view(self.fp8_dtype), v_cache.view(self.fp8_dtype),
                           attn_metadata, layer._k_scale_float, layer._v_scale_float)


class VTensorCudaBackend(TritonAttentionBackend):
    """Triton attention over per-request contiguous virtual KV ranges (CUDA VMM)."""

    supported_kv_cache_dtypes = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]  # the model dtype, or fp8 per-tensor scaled

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return VTensorTritonImpl

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """Without --block-size: the smallest block (a multiple of ``default_block_size``) whose KV over
        all layers fills its chunk to within 10% (SmolLM2-135M in bf16: 176 tokens, a 4 MiB chunk)."""
        return preferred_block_size(default_block_size, CUDA_GRANULARITY, multiple=default_block_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER  # only decoder self-attention keeps a KV cache here

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        """vLLM's reasons for refusing VTENSOR here, each with what to do about it."""
        return _with_fixes(super().validate_configuration(*args, **kwargs))


# vLLM's reasons for refusing a backend at selection -> what to do about them with VTENSOR on CUDA
_CUDA_FIXES = {
    "kv_cache_dtype not supported": "VTENSOR's CUDA path keeps KV in the model's dtype or in fp8 with per-tensor "
                                    "scales: use --kv-cache-dtype auto or fp8",
    "sliding window not supported": "VTENSOR's CUDA path has not run sliding-window models yet (they run on CPU)",
    "attention sinks not supported": "VTENSOR's CUDA path has not run attention sinks yet (they run on CPU)",
}


def _with_fixes(reasons: list[str]) -> list[str]:
    if not reasons:
        return reasons
    return [f"{r}: {_CUDA_FIXES[r]}" if r in _CUDA_FIXES else r for r in reasons] + [
        "or run without --attention-backend VTENSOR"]


# What the kernels do not implement (sinks, partial multimodal prefixes, sliding windows, R-SWA,
# non-causal attention), and the V2 model runner, which calls none of VTENSOR's KV allocation and
# step hooks (patches: v1-model-runner): vLLM refuses these configurations for VTENSOR by name.
for _feature in ("supports_sink", "supports_mm_prefix", "supports_sliding_window", "supports_rswa",
                 "supports_non_causal", "supports_model_runner_v2"):
    setattr(VTensorCudaBackend, _feature, classmethod(lambda cls, *args: False))
