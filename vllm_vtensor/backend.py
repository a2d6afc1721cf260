"""The ``VTENSOR`` attention backend.

The model runner works in *virtual* block ids (see :mod:`vllm_vtensor.worker`):
request r's j-th block is ``slot(r) * blocks_per_slot + j``, so its block
table row is consecutive ids and its KV is one contiguous range.  The KV write
path is vLLM's ``reshape_and_cache`` addressed by the same virtual slots.  The
attention itself, chosen by ``$VTENSOR_ATTENTION`` in the worker:

* ``cpu`` (default): vLLM's own CPU kernel reads that layout through the
  consecutive rows (it honours the per-layer block stride), with no copy and
  no gather from scattered pages;
* ``triton``: this project's Triton kernels (:mod:`vllm_vtensor.kernels`),
  given only each request's first virtual block - ``block_table[:, 0]`` -
  and plain strides, never the block table; on a CPU they need
  ``TRITON_INTERPRET=1`` (slow: for testing the wiring the GPU path will use);
* ``reference``: the kernels' torch (SDPA) reference, same addressing.

fp8 KV caches (``--kv-cache-dtype fp8``/``fp8_e4m3``/``fp8_e5m2``): with ``cpu``,
vLLM's CPU kernel writes and reads them (x86 with AVX-512 or AMX only); with
``triton``/``reference`` (any CPU) VTENSOR writes the cache itself (:func:`write_fp8`:
values divided by the layer's scales, per block and head K as ``[B, D]`` then V
as ``[B, D]``) and the kernels read the bytes upcast.

Before touching KV, both the write (``do_kv_cache_update``) and the attention
wait for the step's memory operations when a helper thread runs them while the
forward pass starts (``VTENSOR_ASYNC_MAPPING=1``, :mod:`vllm_vtensor.vmm.deferred`;
otherwise there is nothing to wait for).

On CUDA the backend is :mod:`vllm_vtensor.backend_cuda` (vLLM's Triton backend
with this project's kernels); :func:`vllm_vtensor.backend_path` picks the class.
"""
from __future__ import annotations

import functools
import mmap
import os

import torch
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from . import BACKEND_NAME, settings
from .vmm.deferred import wait_all as _kv_memory_ready
from .policy import preferred_block_size

_FIX = "Run it without --attention-backend VTENSOR (attention_backend=\"VTENSOR\")."
ATTENTION_ENV = "VTENSOR_ATTENTION"
ATTENTION_KERNELS = ("cpu", "triton", "reference")
TILED_ISAS = ("amx",)  # vLLM CPU kernels whose KV blocks are tiles, not strided rows (see block_layout)
CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention backend takes blocks of a multiple of 32 tokens (MultipleOf(32))


def chosen_kernel(choices: tuple[str, ...], where: str = "") -> str:
    """``$VTENSOR_ATTENTION`` among ``choices`` (the first is the default); anything else raises naming them."""
    name = settings.raw(ATTENTION_ENV) or choices[0]  # checked here against this platform's kernels
    if name not in choices:
        raise ValueError(f"{ATTENTION_ENV}={name!r} is not an attention kernel VTENSOR has{where}: use one of "
                         f"{', '.join(choices)} (default {choices[0]})")
    return name


def refuse_unsupported(impl, sliding_window: bool, fix: str, *more: tuple[str, bool]) -> None:
    """Raise, naming ``fix``, when ``impl``'s layer needs what this project's kernels do not implement."""
    unsupported = [what for what, present in (
        ("ALiBi slopes", impl.alibi_slopes is not None), ("logit soft-capping", bool(impl.logits_soft_cap)),
        ("attention sinks", impl.sinks is not None), ("a sliding window", sliding_window), *more,
    ) if present]
    if unsupported:
        raise ValueError(f"{ATTENTION_ENV}={impl.kernel} does not implement {', '.join(unsupported)}: {fix}")


def run_kernels(impl, query, output, k_cache, v_cache, attn_metadata, k_scale: float = 1.0, v_scale: float = 1.0):
    """``impl._decode`` for a decode-only batch, else ``impl._context``, over ``[blocks, H, B, D]`` views.

    Each request's block-table row is consecutive virtual ids, so the kernels get its first one
    (``block_table[:, 0]``, copied: the column is strided and the kernels read a plain array)."""
    n = attn_metadata.num_actual_tokens
    q = query[:n].view(n, impl.num_heads, impl.head_size)
    out = output[:n].view(n, impl.num_heads, impl.head_size)
    num_reqs = attn_metadata.seq_lens.shape[0]
    kv_start = _kv_start(attn_metadata, num_reqs)
    if attn_metadata.max_query_len == 1 and n == num_reqs:  # decode only: split-K over the context
        impl._decode(q=q, k_cache=k_cache, v_cache=v_cache, out=out, seq_lens=attn_metadata.seq_lens,
                     kv_start_block=kv_start, scale=impl.scale, max_seq_len=attn_metadata.max_seq_len,
                     k_scale=k_scale, v_scale=v_scale)
    else:
        impl._context(q=q, k_cache=k_cache, v_cache=v_cache, out=out, query_start_loc=attn_metadata.query_start_loc,
                      seq_lens=attn_metadata.seq_lens, kv_start_block=kv_start, scale=impl.scale,
                      max_query_len=attn_metadata.max_query_len, k_scale=k_scale, v_scale=v_scale)
    return output


def _kv_start(attn_metadata, num_reqs: int):
    """Each request's first virtual block, copied once per step: every layer of a KV cache group gets the
    same metadata object in a step, so the first layer's copy serves the others (one copy kernel a step,
    not one per layer, in CUDA graphs too). Kept with the block table it was copied from."""
    table = attn_metadata.block_table
    kept = getattr(attn_metadata, "_vtensor_kv_start", None)
    if kept is not None and kept[0] is table and kept[1] == num_reqs:
        return kept[2]
    kv_start = table[:num_reqs, 0].contiguous()
    try:
        attn_metadata._vtensor_kv_start = (table, num_reqs, kv_start)
    except AttributeError:  # a metadata class without a __dict__: copy per layer
        pass
    return kv_start


# vLLM's fp8 KV cache names -> the element type VTENSOR's kernels read (vLLM stores the bytes as uint8)
FP8_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def cpu_kernel_reads_fp8() -> bool:
    """Whether vLLM's CPU attention kernel takes fp8 KV on this CPU (x86 with AVX-512 or AMX)."""
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


def own_fp8(kv_cache_dtype: str, kernel: str) -> bool:
    """Whether VTENSOR writes and reads this KV cache itself: an fp8 one, read by ``kernel`` other than vLLM's."""
    return is_quantized_kv_cache(kv_cache_dtype) and kernel != "cpu"


def check_fp8_kernel(kv_cache_dtype: str, kernel: str) -> None:
    """Refuse, naming the fix, an fp8 KV cache for vLLM's CPU kernel on a CPU where it cannot read one."""
    if is_quantized_kv_cache(kv_cache_dtype) and kernel == "cpu" and not cpu_kernel_reads_fp8():
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r}: vLLM's CPU attention kernel reads fp8 KV only on x86 with AVX-512 "
            f"or AMX, which this CPU lacks. Set {ATTENTION_ENV}=reference (VTENSOR's torch attention, reading "
            f"fp8) - or {ATTENTION_ENV}=triton with TRITON_INTERPRET=1 - or run with --kv-cache-dtype auto")


def write_fp8(key, value, k_cache, v_cache, slot_mapping, k_scale: float, v_scale: float) -> None:
    """Store ``key``/``value`` ``[N, H, D]`` divided by their scales into fp8 ``[blocks, H, B, D]`` caches at
    ``slot_mapping`` (block * B + offset; negative entries are padding, skipped). Values beyond the fp8
    type's range saturate at its largest finite value."""
    n = slot_mapping.shape[0]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[2]
    blk, off = slots // block_size, slots % block_size
    for src, cache, scale in ((key[:n][keep], k_cache, k_scale), (value[:n][keep], v_cache, v_scale)):
        top = torch.finfo(cache.dtype).max
        q = (src.float() / scale).clamp_(-top, top).to(cache.dtype)
        cache.view(torch.uint8)[blk, :, off] = q.view(torch.uint8)  # index_put on the bytes: any dtype, in place


def attention_kernel() -> str:
    """The attention ``$VTENSOR_ATTENTION`` selects on CPU (default ``cpu``)."""
    name = chosen_kernel(ATTENTION_KERNELS)
    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise ValueError(f"{ATTENTION_ENV}=triton on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter: slow, "
                         f"for testing); use {ATTENTION_ENV}=cpu for speed")
    return name


class VTensorCPUImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, or this project's kernels over the contiguous ranges ($VTENSOR_ATTENTION)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel = attention_kernel()
        self.own_fp8 = own_fp8(self.kv_cache_dtype, self.kernel)
        check_fp8_kernel(self.kv_cache_dtype, self.kernel)
        if self.kernel == "cpu":
            return
        refuse_unsupported(self, self.sliding_window not in (None, -1),
                           f"unset {ATTENTION_ENV} (vLLM's CPU kernel handles them)")
        if self.kernel == "triton":
            from .kernels import attention as kernels

            self._context, self._decode = kernels.context_attention, kernels.decode_attention
        else:
            from .kernels import reference

            self._context, self._decode = reference.context_attention_ref, reference.decode_attention_ref

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        _kv_memory_ready()  # this step's blocks are mapped by a helper thread meanwhile (vmm.deferred)
        if self.own_fp8:
            k_cache, v_cache = self._views(kv_cache, layer)
            write_fp8(key, value, k_cache, v_cache, slot_mapping, layer._k_scale_float, layer._v_scale_float)
            return
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def _views(self, kv_cache, layer) -> tuple[torch.Tensor, torch.Tensor]:
        if self.own_fp8:  # this project's own layout (write_fp8), read as fp8
            return _kv_views(kv_cache.view(FP8_KV_DTYPES[self.kv_cache_dtype]), layout=None)
        return _kv_views(kv_cache, layout=block_layout(layer.isa, kv_cache.shape[2], kv_cache.shape[3] // 2,
                                                       kv_cache.dtype))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        _kv_memory_ready()
        if (self.kernel == "cpu" or attn_metadata is None or output_scale is not None
                or output_block_scale is not None or not isinstance(attn_metadata.causal, bool)
                or not attn_metadata.causal):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        k_cache, v_cache = self._views(kv_cache, layer)
        return run_kernels(self, query, output, k_cache, v_cache, attn_metadata,
                           layer._k_scale_float, layer._v_scale_float)


def _kv_views(kv_cache: torch.Tensor, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """``[blocks, H, B, D]`` K and V views of vLLM's CPU cache ``[blocks, H, B, 2D]`` (no copy).

    Per block and head the cache holds B*D key values, then B*D values, laid out as ``layout``
    says - ``((token stride, dim stride) of K, the same of V)``: as ``isa``'s kernel writes them
    (the "vec" kernel stores K transposed, ``[D, B]``: see :func:`block_layout`) - or, when None,
    each row-major ``[B, D]``."""
    num_blocks, heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    if kv_cache.stride(3) != 1 or kv_cache.stride(2) != two_d:
        raise RuntimeError(f"VTENSOR expects each block's per-head K/V area contiguous; got strides {kv_cache.stride()}")
    (k_t, k_d), (v_t, v_d) = layout or ((d, 1), (d, 1))
    s_b, s_h, off = kv_cache.stride(0), kv_cache.stride(1), kv_cache.storage_offset()
    shape = (num_blocks, heads, block_size, d)
    return (kv_cache.as_strided(shape, (s_b, s_h, k_t, k_d), off),
            kv_cache.as_strided(shape, (s_b, s_h, v_t, v_d), off + block_size * d))


@functools.cache
def block_layout(isa: str, block_size: int, head_size: int, dtype: torch.dtype) -> tuple[tuple[int, int], ...]:
    """``((token stride, dim stride) of K, the same of V)`` inside one block and head, as vLLM's CPU
    ``reshape_and_cache`` writes them for ``isa``: found by writing tokens whose values encode their
    position (token index in one pass, dim index in another, so bf16/fp16 keep them exact).  A
    layout that is not such a strided one (a tiled kernel's) is refused, naming the fix."""
    from vllm import _custom_ops as ops

    b, d = block_size, head_size
    where = []
    for code in (torch.arange(b)[:, None].expand(b, d), torch.arange(d)[None, :].expand(b, d)):  # token, then dim
        cache = torch.zeros(1, 1, 2 * b, d, dtype=dtype)
        k_cache, v_cache = cache.chunk(2, dim=2)
        vals = (code + 1).to(dtype).reshape(b, 1, d).contiguous()
        ops.cpu_attn_reshape_and_cache(vals, vals, k_cache, v_cache, torch.arange(b, dtype=torch.int64), isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        where.append(cache.view(2, b * d).float().round().long() - 1)  # [K or V area, position] -> index
    layouts = []
    for area in range(2):
        tok, dim = where[0][area], where[1][area]
        pos = torch.full((b, d), -1, dtype=torch.long)
        pos[tok, dim] = torch.arange(b * d)
        t_stride = int(pos[1, 0] - pos[0, 0]) if b > 1 else d
        d_stride = int(pos[0, 1] - pos[0, 0]) if d > 1 else 1
        strided = pos[0, 0] + torch.arange(b)[:, None] * t_stride + torch.arange(d)[None, :] * d_stride
        if int(pos[0, 0]) != 0 or not torch.equal(pos, strided):
            raise ValueError(f"vLLM's CPU kernel ({isa!r}) keeps a block's {'KV'[area]} in a tiled layout the "
                             f"{ATTENTION_ENV} kernels cannot address by strides: unset {ATTENTION_ENV}")
        layouts.append((t_stride, d_stride))
    return tuple(layouts)


class VTensorCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder; with an fp8 KV cache VTENSOR's kernels read themselves (see
    :func:`own_fp8`), it is built as for the model dtype: vLLM's would refuse an fp8 kernel the CPU
    lacks (AVX2), and VTENSOR's kernels use none of its scheduler metadata.

    When VTENSOR's kernels read the cache (``$VTENSOR_ATTENTION`` other than ``cpu``) on a CPU with
    AMX, bf16 layers get vLLM's ``vec`` kernel instead of its ``amx`` one: ``amx`` stores each block
    in tiles, which VTENSOR's kernels cannot address by strides (:func:`block_layout`); ``vec`` writes
    a strided layout, and vLLM's fallbacks (non-causal layers) read it as they would on a CPU without
    AMX."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        cache = vllm_config.cache_config
        dtype, kernel = cache.cache_dtype, attention_kernel()
        if not own_fp8(dtype, kernel):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        else:
            cache.cache_dtype = "auto"  # read by vLLM's __init__ alone; restored at once
            try:
                super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            finally:
                cache.cache_dtype = dtype
        if kernel != "cpu" and self.isa in TILED_ISAS:
            self.isa = "vec"
            self._set_isa_to_layers(layer_names)


class VTensorCPUBackend(CPUAttentionBackend):
    """CPU attention over per-request contiguous virtual KV ranges."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """Without --block-size: the CPU kernel's finest block, 32 tokens, unless its chunk would pad
        by more than 10% at page granularity.  Memory is mapped per block (the CPU platform's default of
        128 preallocates nothing here but leaves more of each request's last block empty) and prefix-cache
        hits land on block boundaries, so a finer block wastes less and recomputes less of a cached prefix."""
        return preferred_block_size(default_block_size, mmap.PAGESIZE, multiple=CPU_BLOCK_MULTIPLE)

    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return VTensorCPUImpl

    @staticmethod
    def get_builder_cls() -> type[CPUAttentionMetadataBuilder]:
        return VTensorCPUMetadataBuilder


def check_supported(cfg) -> None:
    """Refuse, naming the fix, what VTENSOR cannot serve (``cfg``: vLLM's ``AttentionSelectorConfig``)."""
    from vllm.v1.attention.backend import AttentionType

    if cfg.block_size is not None and cfg.block_size % CPU_BLOCK_MULTIPLE:
        fits = -(-cfg.block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
        raise ValueError(
            f"--attention-backend VTENSOR on CPU runs vLLM's CPU attention kernel, which takes blocks of a multiple "
            f"of {CPU_BLOCK_MULTIPLE} tokens; --block-size {cfg.block_size} is not one. Pass --block-size {fits} "
            f"(block_size={fits}) or leave it unset (VTENSOR then picks {CPU_BLOCK_MULTIPLE}).")
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
    if cfg.kv_cache_dtype not in (None, "auto", *FP8_KV_DTYPES):
        problems.append(f"kv_cache_dtype={cfg.kv_cache_dtype!r} is not supported (use auto, "
                        f"{', '.join(FP8_KV_DTYPES)})")
    if problems:
        raise ValueError("--attention-backend VTENSOR cannot serve this model: " + "; ".join(problems) + ". " + _FIX)


def check_config(vllm_config) -> None:
    """:func:`check_supported` and :func:`check_fp8_kernel` on what an engine's configuration already says: the
    model's head size and dtype, MLA, the KV cache dtype, a ``--block-size`` given and ``$VTENSOR_ATTENTION``.
    Run where the configuration is made (the user's process), so such a refusal comes before any engine
    process starts; the worker checks again, per attention layer, once the model is built."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionType

    model, cache = vllm_config.model_config, vllm_config.cache_config
    if model is None:
        return
    check_supported(SimpleNamespace(
        block_size=cache.block_size if cache.user_specified_block_size else None, use_mla=model.use_mla,
        use_sparse=False, attn_type=AttentionType.DECODER, head_size=model.get_head_size(), dtype=model.dtype,
        kv_cache_dtype=cache.cache_dtype))
    kernel = attention_kernel()
    if vllm_config.parallel_config.distributed_executor_backend != "ray":  # Ray may run the workers on other hosts' CPUs
        check_fp8_kernel(cache.cache_dtype, kernel)
