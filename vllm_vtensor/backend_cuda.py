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
"""
from __future__ import annotations

import os

from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from . import BACKEND_NAME
from .backend import ATTENTION_ENV

CUDA_ATTENTION_KERNELS = ("triton", "vllm")


def cuda_attention_kernel() -> str:
    """The attention ``$VTENSOR_ATTENTION`` selects on CUDA (default ``triton``)."""
    name = os.environ.get(ATTENTION_ENV, "") or "triton"
    if name not in CUDA_ATTENTION_KERNELS:
        raise ValueError(f"{ATTENTION_ENV}={name!r} is not an attention kernel VTENSOR has on CUDA: use one of "
                         f"{', '.join(CUDA_ATTENTION_KERNELS)} (default triton)")
    return name


class VTensorTritonImpl(TritonAttentionImpl):
    """This project's Triton kernels over per-request contiguous KV ranges (or vLLM's, ``$VTENSOR_ATTENTION=vllm``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel = cuda_attention_kernel()
        if self.kernel == "vllm":
            return
        unsupported = [what for what, present in (
            ("ALiBi slopes", self.alibi_slopes is not None), ("logit soft-capping", bool(self.logits_soft_cap)),
            ("attention sinks", self.sinks is not None), ("a sliding window", self.sliding_window != (-1, -1)),
            ("a quantized KV cache", self.kv_cache_dtype != "auto"),
        ) if present]
        if unsupported:
            raise ValueError(f"VTENSOR's Triton kernels do not implement {', '.join(unsupported)}: "
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
        n = attn_metadata.num_actual_tokens
        # (blocks, H, N, 2D) -> K and V as (blocks, H, N, D) views: no copy, the kernels take strides
        k_cache, v_cache = kv_cache.split(self.head_size, dim=-1)
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        num_reqs = attn_metadata.seq_lens.shape[0]
        # each row is consecutive virtual ids from here; the column is strided, the kernels want an array
        kv_start = attn_metadata.block_table[:num_reqs, 0].contiguous()
        if attn_metadata.max_query_len == 1 and n == num_reqs:  # decode only: split-K over the context
            self._decode(q=q, k_cache=k_cache, v_cache=v_cache, out=out, seq_lens=attn_metadata.seq_lens,
                         kv_start_block=kv_start, scale=self.scale, max_seq_len=attn_metadata.max_seq_len)
        else:
            self._context(q=q, k_cache=k_cache, v_cache=v_cache, out=out,
                          query_start_loc=attn_metadata.query_start_loc, seq_lens=attn_metadata.seq_lens,
                          kv_start_block=kv_start, scale=self.scale, max_query_len=attn_metadata.max_query_len)
        return output


class VTensorCudaBackend(TritonAttentionBackend):
    """Triton attention over per-request contiguous virtual KV ranges (CUDA VMM)."""

    supported_kv_cache_dtypes = ["auto"]  # the KV space keeps the model dtype

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return VTensorTritonImpl

    @classmethod
    def supports_model_runner_v2(cls) -> bool:
        return False  # the KV allocation and step hooks are the V1 runner's (patches: v1-model-runner)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER  # only decoder self-attention keeps a KV cache here

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False
