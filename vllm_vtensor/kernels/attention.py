"""Triton attention over contiguous virtual KV: prefix-prefill and (split-K) decode.

Every request's KV is one contiguous virtual range, so key tile ``j`` of
request ``r`` is found by arithmetic, never by loading a block table:

    token t of request r, kv-head h  ->  K + (kv_start_block[r] + t // B) * stride_b
                                           + (t % B) * stride_t + h * stride_h

``[blocks, H, B, D]`` caches with any strides work (the head dimension too): vLLM's CPU
layout, a per-layer packed layout, or a single block per request (``B`` as
large as the context, so ``t // B == 0``).

Runs compiled on CUDA and under ``TRITON_INTERPRET=1`` on CPU tensors (where
bf16/fp16 loads are converted to fp32 first: the interpreter computes them
wrongly).  The same signatures are implemented in :mod:`.reference`.

fp8 caches (``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` views, values stored
divided by ``k_scale``/``v_scale`` as vLLM stores them) are read as bytes and
upcast in the kernel; the scales are folded into the scores and the output.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked tile never produces NaN
_LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in base 2 (exp2 is one instruction on GPUs)


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _kv_tile_ptrs(base, start_block, offs_n, offs_d, kv_head, stride_b, stride_t, stride_h, stride_d,
                  BLOCK_SIZE: tl.constexpr):
    """Pointers to a [BLOCK_D, BLOCK_N] tile of one request's keys (or values, transposed)."""
    blk = start_block + offs_n // BLOCK_SIZE
    within = offs_n % BLOCK_SIZE
    return (base + blk[None, :] * stride_b + within[None, :] * stride_t + kv_head * stride_h
            + offs_d[:, None] * stride_d)


@triton.jit
def _load_tile(base, start_block, offs_n, offs_d, kv_head, n_ok, d_ok, stride_b, stride_t, stride_h, stride_d,
               BLOCK_SIZE: tl.constexpr, CAST_F32: tl.constexpr, KV_FP8: tl.constexpr, COMPUTE: tl.constexpr):
    """A masked [BLOCK_D, BLOCK_N] K or V tile (fp32 when CAST_F32); fp8 bytes (KV_FP8 1: e4m3, 2: e5m2)
    upcast to ``COMPUTE``, the queries' type."""
    t = tl.load(_kv_tile_ptrs(base, start_block, offs_n, offs_d, kv_head, stride_b, stride_t, stride_h, stride_d,
                              BLOCK_SIZE),
                mask=d_ok[:, None] & n_ok[None, :], other=0)
    if KV_FP8 == 1:
        t = t.to(tl.float8e4nv, bitcast=True).to(COMPUTE)
    elif KV_FP8 == 2:
        t = t.to(tl.float8e5, bitcast=True).to(COMPUTE)
    if CAST_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, CAST_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Fold one tile of masked base-2 scores ``s`` [M, N] and values ``v`` [D, N] into the running
    row max ``m_i``, row sum ``l_i`` and unnormalised output ``acc``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if not CAST_F32:
        p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, tl.trans(v), input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _query_tile(Q, q_start, q_len, h, m, stride_qt, stride_qh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, CAST_F32: tl.constexpr):
    """Query rows ``m * BLOCK_M ..`` of one request and head: their offsets, masks and values."""
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    return offs_m, offs_d, row_ok, d_ok, q


@triton.jit
def _key_range(seq, prefix, m, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr):
    """The keys query tile ``m`` attends to: ``[lo, hi)``; key tiles below ``full_hi`` are seen by every
    query row of the tile (no mask needed)."""
    hi = tl.minimum(seq, prefix + (m + 1) * BLOCK_M)  # causal: no key past the tile's last query
    lo = 0
    full_hi = 0  # keys below this are seen by every query row of the tile: no mask needed
    if USE_WINDOW:
        lo = tl.maximum(0, prefix + m * BLOCK_M - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    else:
        full_hi = ((prefix + m * BLOCK_M) // BLOCK_N) * BLOCK_N
    return lo, full_hi, hi


@triton.jit
def _store_rows(O, acc, l_i, v_scale, q_start, offs_m, offs_d, row_ok, d_ok, h, stride_ot, stride_oh):
    """The normalised output rows of a query tile."""
    out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = O + (q_start + offs_m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- prefix-prefill
@triton.jit
def _context_attention_kernel(
    Q, K, V, O,  # Q, O: [T, Hq, D]; K, V: [blocks, Hkv, B, D]
    QSL,  # [R + 1] query start offsets
    SEQ,  # [R] context length (prefix + new tokens)
    KV0,  # [R] first block of each request's range
    scale, k_scale, v_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    # head-dim strides are compile-time: 1, or the block size (vLLM's CPU layout keeps keys as [D, B])
    stride_kb: tl.int64, stride_kt: tl.int64, stride_kh: tl.int64, stride_kd: tl.constexpr,
    stride_vb: tl.int64, stride_vt: tl.int64, stride_vh: tl.int64, stride_vd: tl.constexpr,
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, CAST_F32: tl.constexpr,
    DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    m = tl.program_id(2)
    q_start = tl.load(QSL + r)
    q_len = tl.load(QSL + r + 1) - q_start
    if m * BLOCK_M >= q_len:
        return
    seq = tl.load(SEQ + r)
    kv0 = tl.load(KV0 + r).to(tl.int64)
    prefix = seq - q_len
    kvh = h // GQA
    offs_m, offs_d, row_ok, d_ok, q = _query_tile(Q, q_start, q_len, h, m, stride_qt, stride_qh, HEAD_DIM, BLOCK_D,
                                                  BLOCK_M, CAST_F32)
    pos = prefix + offs_m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    qk_scale = scale * k_scale * _LOG2E
    lo, full_hi, hi = _key_range(seq, prefix, m, window, BLOCK_M, BLOCK_N, USE_WINDOW)
    all_n = tl.full([BLOCK_N], 1, tl.int1)
    for n0 in range(0, full_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv0, offs_n, offs_d, kvh, all_n, d_ok,
                       stride_kb, stride_kt, stride_kh, stride_kd, BLOCK_SIZE, CAST_F32, KV_FP8, Q.dtype.element_ty)
        s = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale
        v = _load_tile(V, kv0, offs_n, offs_d, kvh, all_n, d_ok,
                       stride_vb, stride_vt, stride_vh, stride_vd, BLOCK_SIZE, CAST_F32, KV_FP8, Q.dtype.element_ty)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, CAST_F32, DOT_PREC)
    for n0 in range(tl.maximum(lo, full_hi), hi, BLOCK_N):  # the diagonal (and window edge): masked
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq
        k = _load_tile(K, kv0, offs_n, offs_d, kvh, n_ok, d_ok,
                       stride_kb, stride_kt, stride_kh, stride_kd, BLOCK_SIZE, CAST_F32, KV_FP8, Q.dtype.element_ty)
        s = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale
        allowed = n_ok[None, :] & (offs_n[None, :] <= pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        v = _load_tile(V, kv0, offs_n, offs_d, kvh, n_ok, d_ok,
                       stride_vb, stride_vt, stride_vh, stride_vd, BLOCK_SIZE, CAST_F32, KV_FP8, Q.dtype.element_ty)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, CAST_F32, DOT_PREC)

    _store_rows(O, acc, l_i, v_scale, q_start, offs_m, offs_d, row_ok, d_ok, h, stride_ot, stride_oh)


@triton.jit
def _desc_tile(desc, kv0, n0, kvh, mask_n, BLOCK_SIZE: tl.constexpr, NB: tl.constexpr, TB: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAST_F32: tl.constexpr, MASKED: tl.constexpr):
    """Keys (or values) ``n0 .. n0 + BLOCK_N`` of one request and kv-head as a [BLOCK_N, BLOCK_D] tile,
    through a tensor descriptor over the cache's [blocks, Hkv, B, D] (Hopper's TMA): ``NB`` whole blocks
    of ``TB == B`` tokens, or ``TB == BLOCK_N`` tokens of one block. Rows past the context are zeroed when
    ``MASKED`` (memory there may hold anything, NaN included: 0 x NaN is NaN)."""
    t = desc.load([kv0 + n0 // BLOCK_SIZE, kvh, n0 % BLOCK_SIZE, 0])
    t = tl.reshape(t, [BLOCK_N, BLOCK_D])
    if MASKED:
        t = tl.where(mask_n[:, None], t, 0.0)
    if CAST_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _context_attention_tma_kernel(
    Q, K_DESC, V_DESC, O,  # K_DESC/V_DESC: tensor descriptors over [blocks, Hkv, B, D] (box [NB, 1, TB, BLOCK_D])
    QSL, SEQ, KV0,
    scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, TB: tl.constexpr,
    USE_WINDOW: tl.constexpr, CAST_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """:func:`_context_attention_kernel` with K and V tiles loaded by tensor descriptors (TMA on Hopper):
    the same tiles, masks and online softmax; 16-bit caches whose head dimension is contiguous."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    m = tl.program_id(2)
    q_start = tl.load(QSL + r)
    q_len = tl.load(QSL + r + 1) - q_start
    if m * BLOCK_M >= q_len:
        return
    seq = tl.load(SEQ + r)
    kv0 = tl.load(KV0 + r).to(tl.int32)  # a descriptor coordinate
    prefix = seq - q_len
    kvh = h // GQA
    offs_m, offs_d, row_ok, d_ok, q = _query_tile(Q, q_start, q_len, h, m, stride_qt, stride_qh, HEAD_DIM, BLOCK_D,
                                                  BLOCK_M, CAST_F32)
    pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    qk_scale = scale * _LOG2E
    lo, full_hi, hi = _key_range(seq, prefix, m, window, BLOCK_M, BLOCK_N, USE_WINDOW)
    all_n = tl.full([BLOCK_N], 1, tl.int1)
    for n0 in tl.range(0, full_hi, BLOCK_N):
        k = _desc_tile(K_DESC, kv0, n0, kvh, all_n, BLOCK_SIZE, NB, TB, BLOCK_N, BLOCK_D, CAST_F32, False)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        v = _desc_tile(V_DESC, kv0, n0, kvh, all_n, BLOCK_SIZE, NB, TB, BLOCK_N, BLOCK_D, CAST_F32, False)
        m_i, l_i, acc = _online_softmax_step(s, tl.trans(v), m_i, l_i, acc, CAST_F32, DOT_PREC)
    for n0 in tl.range(tl.maximum(lo, full_hi), hi, BLOCK_N):  # the diagonal (and window edge): masked
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq
        k = _desc_tile(K_DESC, kv0, n0, kvh, n_ok, BLOCK_SIZE, NB, TB, BLOCK_N, BLOCK_D, CAST_F32, False)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        allowed = n_ok[None, :] & (offs_n[None, :] <= pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        v = _desc_tile(V_DESC, kv0, n0, kvh, n_ok, BLOCK_SIZE, NB, TB, BLOCK_N, BLOCK_D, CAST_F32, True)
        m_i, l_i, acc = _online_softmax_step(s, tl.trans(v), m_i, l_i, acc, CAST_F32, DOT_PREC)

    _store_rows(O, acc, l_i, 1.0, q_start, offs_m, offs_d, row_ok, d_ok, h, stride_ot, stride_oh)


# ----------------------------------------------------------------------------- decode
@triton.jit
def _decode_kernel(
    Q, K, V, O,  # Q, O: [R, Hq, D]
    PART_ACC, PART_ML,  # [R, Hq, S, D], [R, Hq, S, 2] (used when NUM_SPLITS > 1)
    SEQ, KV0, scale, k_scale, v_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb: tl.int64, stride_kt: tl.int64, stride_kh: tl.int64, stride_kd: tl.constexpr,
    stride_vb: tl.int64, stride_vt: tl.int64, stride_vh: tl.int64, stride_vd: tl.constexpr,
    GQA: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, CAST_F32: tl.constexpr, DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One program = one request x one kv head (all its GQA query heads) x one split of the keys."""
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(SEQ + r)
    kv0 = tl.load(KV0 + r).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GQA
    d_ok = offs_d < HEAD_DIM
    heads = kvh * GQA + offs_g
    q = tl.load(Q + r * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)

    per_split = tl.cdiv(tl.cdiv(seq, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(seq, lo + per_split)
    if USE_WINDOW:
        lo = tl.maximum(lo, ((seq - window) // BLOCK_N) * BLOCK_N)

    m_i = tl.full([BLOCK_G], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if USE_WINDOW:
            n_ok = n_ok & (offs_n > seq - 1 - window)
        k = _load_tile(K, kv0, offs_n, offs_d, kvh, n_ok, d_ok,
                       stride_kb, stride_kt, stride_kh, stride_kd, BLOCK_SIZE, CAST_F32, KV_FP8, Q.dtype.element_ty)
        s = tl.where(n_ok[None, :], tl.dot(q, k, input_precision=DOT_PREC) * (scale * k_scale * _LOG2E),
                     float("-inf"))
        v = _load_tile(V, kv0, offs_n, offs_d, kvh, n_ok, d_ok,
                       stride_vb, stride_vt, stride_vh, stride_vd, BLOCK_SIZE, CAST_F32, KV_FP8, Q.dtype.element_ty)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, CAST_F32, DOT_PREC)

    acc = acc * v_scale
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + r * stride_ot + heads[:, None] * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
    else:
        hq = tl.num_programs(1) * GQA
        row = (r * hq + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(PART_ACC + row[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_ok[:, None] & d_ok[None, :])
        tl.store(PART_ML + row * 2, m_i, mask=g_ok)
        tl.store(PART_ML + row * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(
    O, PART_ACC, PART_ML, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Combine the splits of one (request, query head): flash-decoding's log-sum-exp merge."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    hq = tl.num_programs(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    row = (r * hq + h) * NUM_SPLITS + offs_s
    m = tl.load(PART_ML + row * 2, mask=s_ok, other=_NEG)
    l = tl.load(PART_ML + row * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(PART_ACC + row[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)  # the splits' maxima are base-2 scores
    total = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + r * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------- launchers
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(q, k_cache, v_cache, out, *per_request):
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors "
                           "(slow; vllm_vtensor.kernels.reference is the CPU fallback)")
    assert q.dim() == 3 and out.shape == q.shape, (q.shape, out.shape)
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape)
    assert q.shape[2] == k_cache.shape[3], "head dims of q and the cache differ"
    assert q.shape[1] % k_cache.shape[1] == 0, "query heads must be a multiple of kv heads"
    assert q.stride(2) == 1 and out.stride(2) == 1, "the head dimension of q and out must be contiguous"
    for t in per_request:  # the kernels index these as plain arrays (ptr + r)
        if t.dim() != 1 or (t.shape[0] > 1 and t.stride(0) != 1):
            raise ValueError(f"per-request tensors (query_start_loc, seq_lens, kv_start_block) must be contiguous "
                             f"1-D; got shape {tuple(t.shape)}, strides {t.stride()}: pass .contiguous() (a "
                             "block table's first column, block_table[:, 0], is strided)")


# Tile shapes and launch options on a GPU ("BLOCK_M"/"BLOCK_N" tiles, Triton's num_warps and
# num_stages).  The interpreter uses small tiles.  ``launch_config=`` overrides them per call.
# Picked from benchmarks/kernels.py's sweeps on an H100 and an H200 (benchmarks/results/kernels-h100-sweep.json, kernels-h200-sweep.json):
# 16-bit prefill runs 128x128 tiles with 8 warps (within 5% of the best everywhere measured) unless
# the grid would leave most SMs idle (one request with a short chunk: 64x128 with 4 warps); fp32
# tiles take twice the shared memory and keep 64x64.  Decode uses 64-key tiles, or 32-key tiles with
# 2 warps and a deeper pipeline once the grid has a few programs per SM (large batches).
CONTEXT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
CONTEXT_CONFIG_LARGE = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
CONTEXT_CONFIG_NARROW = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
DECODE_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
DECODE_CONFIG_LARGE = {"BLOCK_N": 32, "num_warps": 2, "num_stages": 4}
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


def _launch_options(defaults: dict, override: dict | None) -> dict:
    cfg = dict(_INTERPRETER_CONFIG if _interpreting() else defaults)
    if override:
        unknown = set(override) - set(defaults)
        if unknown:
            raise ValueError(f"unknown launch_config keys {sorted(unknown)}: use {', '.join(defaults)}")
        cfg.update(override)
    if _interpreting():
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    return {k: v for k, v in cfg.items() if k in defaults}


_FITTING: dict = {}  # (kernel, asked config, constants) -> the config that fit in shared memory


def _shrink(cfg: dict) -> dict | None:
    """A config needing less shared memory: fewer pipeline stages, then smaller key tiles, then query tiles."""
    if cfg.get("num_stages", 1) > 1:
        return {**cfg, "num_stages": 1}
    if cfg.get("BLOCK_N", 16) > 16:
        return {**cfg, "BLOCK_N": cfg["BLOCK_N"] // 2}
    if cfg.get("BLOCK_M", 16) > 16:
        return {**cfg, "BLOCK_M": cfg["BLOCK_M"] // 2}
    return None


def _launch(kernel, grid, args, cfg: dict, consts: dict) -> None:
    """Launch ``kernel``; if its tiles need more shared memory than this GPU has (large head dims in
    fp32, say), retry with a smaller config and remember the one that fits. ``args``: the positional
    arguments, or a function of the config giving them and more constants (tensor descriptors, whose
    boxes are the tiles)."""
    key = None  # built only once some launch has needed a fallback: launches are a hot path
    if _FITTING:
        key = _fitting_key(kernel, cfg, consts)
        cfg = _FITTING.get(key, cfg)
    while True:
        try:
            positional, more = args(cfg) if callable(args) else (args, {})
            kernel[grid(cfg)](*positional, **cfg, **consts, **more)
            return
        except OutOfResources:
            smaller = _shrink(cfg)
            if smaller is None:
                raise
            key = key or _fitting_key(kernel, cfg, consts)
            _FITTING[key] = cfg = smaller


def _fitting_key(kernel, cfg: dict, consts: dict) -> tuple:
    return kernel, tuple(sorted(cfg.items())), tuple(sorted((k, str(v)) for k, v in consts.items()))


# fp8 cache dtypes the kernels read (as bytes, upcast inside): the KV_FP8 code of each
FP8_CODES = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}


def _as_loaded(cache: torch.Tensor) -> torch.Tensor:
    """What the kernels are handed: the cache, or the bytes of an fp8 cache (loaded as uint8, bitcast inside)."""
    if cache.dtype in FP8_CODES:
        return cache.view(torch.uint8)
    if cache.dtype == torch.uint8:
        raise ValueError("a uint8 KV cache is ambiguous: view it as torch.float8_e4m3fn or torch.float8_e5m2")
    return cache


def _common(q, k_cache, v_cache, sliding_window):
    head_dim = q.shape[2]
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"K and V caches differ in dtype ({k_cache.dtype}, {v_cache.dtype})")
    return dict(
        KV_FP8=FP8_CODES.get(k_cache.dtype, 0),
        GQA=q.shape[1] // k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[2], USE_WINDOW=sliding_window is not None,
        CAST_F32=_interpreting() or q.dtype == torch.float32,
        # fp32 models get fp32 products (Triton's default would round them to TF32 on GPUs)
        DOT_PREC="ieee" if _interpreting() or q.dtype == torch.float32 else "tf32",
    )


def context_attention(
    *,
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [blocks, Hkv, B, D], any strides but the last
    v_cache: torch.Tensor,  # [blocks, Hkv, B, D]
    out: torch.Tensor,  # [T, Hq, D]
    query_start_loc: torch.Tensor,  # [R + 1] int32
    seq_lens: torch.Tensor,  # [R] int32: prefix + new tokens
    kv_start_block: torch.Tensor,  # [R] int32/int64: first block of each request's range
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    launch_config: dict | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Chunked prefill (and mixed prefill/decode): new tokens attend to their cached prefix and causally to each other.

    ``launch_config`` overrides the tile sizes, warps and stages chosen for the shape (see
    :data:`CONTEXT_CONFIG`). ``k_scale``/``v_scale``: what an fp8 cache's values are multiplied by."""
    _check(q, k_cache, v_cache, out, query_start_loc, seq_lens, kv_start_block)
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0 or q.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    launch_config = dict(launch_config or {})
    tma = launch_config.pop("TMA", None)
    cfg = _launch_options(_context_defaults(num_reqs, q.shape[1], max_query_len, q.dtype, q.device), launch_config)
    if tma is None:  # by default where measured faster, and where it can read these caches
        tma = TMA_BY_DEFAULT and _hopper(q.device) and not _tma_refusal(q, k_cache, v_cache, cfg["BLOCK_N"])
    elif tma and (why_not := _tma_refusal(q, k_cache, v_cache, cfg["BLOCK_N"])):
        raise ValueError(f"launch_config TMA: {why_not}")
    if tma:
        _launch(
            _context_attention_tma_kernel,
            lambda c: (num_reqs, q.shape[1], triton.cdiv(max(max_query_len, 1), c["BLOCK_M"])),
            lambda c: _tma_args(q, k_cache, v_cache, out, query_start_loc, seq_lens, kv_start_block, scale,
                                sliding_window, c),
            cfg, {k: v for k, v in _common(q, k_cache, v_cache, sliding_window).items() if k != "KV_FP8"},
        )
        return out
    _launch(
        _context_attention_kernel, lambda c: (num_reqs, q.shape[1], triton.cdiv(max(max_query_len, 1), c["BLOCK_M"])),
        (q, _as_loaded(k_cache), _as_loaded(v_cache), out, query_start_loc, seq_lens, kv_start_block, scale,
         float(k_scale), float(v_scale), sliding_window or 0,
         q.stride(0), q.stride(1), out.stride(0), out.stride(1),
         k_cache.stride(0), k_cache.stride(2), k_cache.stride(1), k_cache.stride(3),
         v_cache.stride(0), v_cache.stride(2), v_cache.stride(1), v_cache.stride(3)),
        cfg, _common(q, k_cache, v_cache, sliding_window),
    )
    return out


# Prefix-prefill through tensor descriptors (TMA) where Hopper has them: chosen by default once
# benchmarks/kernels.py has measured it faster on a Hopper GPU; ``launch_config={"TMA": True}`` (or
# False) chooses per call, under the interpreter too.
TMA_BY_DEFAULT = False


@functools.cache
def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_refusal(q, k_cache, v_cache, block_n: int) -> str | None:
    """Why the descriptor kernel cannot read these caches with ``block_n``-key tiles (None: it can)."""
    block, dim = k_cache.shape[2], k_cache.shape[3]
    if k_cache.dtype != q.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the cache ({k_cache.dtype}) must be in the queries' 16- or 32-bit type ({q.dtype})"
    if dim < 16 or dim & (dim - 1):
        return f"head dim {dim} is not a power of two >= 16"
    if not (block & (block - 1) == 0 and block <= block_n or block % block_n == 0):
        return f"block size {block} neither a power of two <= the key tile ({block_n}) nor a multiple of it"
    for c in (k_cache, v_cache):
        if c.stride(3) != 1:
            return "the head dimension of the cache must be contiguous"
        if c.data_ptr() % 16 or any(st * c.element_size() % 16 for st in c.stride()[:3]):
            return "the cache's base and strides must be multiples of 16 bytes"
    return None


def _tma_args(q, k_cache, v_cache, out, query_start_loc, seq_lens, kv_start_block, scale, sliding_window, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor

    block, dim, block_n = k_cache.shape[2], k_cache.shape[3], cfg["BLOCK_N"]
    nb, tb = (block_n // block, block) if block <= block_n else (1, block_n)
    desc = [TensorDescriptor(c, list(c.shape), list(c.stride()), [nb, 1, tb, dim]) for c in (k_cache, v_cache)]
    return ((q, *desc, out, query_start_loc, seq_lens, kv_start_block, scale, sliding_window or 0,
             q.stride(0), q.stride(1), out.stride(0), out.stride(1)), {"NB": nb, "TB": tb})


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _context_defaults(num_reqs: int, heads: int, max_query_len: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda" or dtype == torch.float32:  # fp32 tiles take twice the shared memory
        return CONTEXT_CONFIG
    sms = _sm_count(device)
    if 2 * num_reqs * heads * triton.cdiv(max_query_len, 128) < sms:
        return CONTEXT_CONFIG_NARROW
    return CONTEXT_CONFIG_LARGE


def _decode_defaults(num_reqs: int, kv_heads: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return DECODE_CONFIG
    sms = _sm_count(device)
    return DECODE_CONFIG_LARGE if num_reqs * kv_heads >= 2 * sms else DECODE_CONFIG


def _default_splits(num_reqs: int, kv_heads: int, max_seq: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    programs = num_reqs * kv_heads
    if programs >= sms or max_seq <= 1024:
        return 1
    return int(min(triton.cdiv(max_seq, 512), triton.cdiv(2 * sms, programs), 64))


def decode_attention(
    *,
    q: torch.Tensor,  # [R, Hq, D]: one new token per request
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [R, Hq, D]
    seq_lens: torch.Tensor,  # [R] int32, including the new token
    kv_start_block: torch.Tensor,  # [R]
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    launch_config: dict | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Decode over long contexts; with ``num_splits > 1`` keys are split (flash-decoding) and merged.

    ``launch_config`` overrides the key tile, warps and stages chosen for the shape (see
    :data:`DECODE_CONFIG`). ``k_scale``/``v_scale``: what an fp8 cache's values are multiplied by."""
    _check(q, k_cache, v_cache, out, seq_lens, kv_start_block)
    num_reqs, hq, head_dim = q.shape
    if num_reqs == 0:
        return out
    kv_heads = k_cache.shape[1]
    if num_splits is None:
        max_seq = max_seq_len if max_seq_len is not None else int(seq_lens.max())
        num_splits = _default_splits(num_reqs, kv_heads, max_seq, q.device)
    common = _common(q, k_cache, v_cache, sliding_window)
    cfg = _launch_options(_decode_defaults(num_reqs, kv_heads, q.device), launch_config)
    if num_splits > 1:
        part_acc = torch.empty(num_reqs, hq, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_reqs, hq, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _launch(
        _decode_kernel, lambda c: (num_reqs, kv_heads, num_splits),
        (q, _as_loaded(k_cache), _as_loaded(v_cache), out, part_acc, part_ml, seq_lens, kv_start_block, scale,
         float(k_scale), float(v_scale), sliding_window or 0,
         q.stride(0), q.stride(1), out.stride(0), out.stride(1),
         k_cache.stride(0), k_cache.stride(2), k_cache.stride(1), k_cache.stride(3),
         v_cache.stride(0), v_cache.stride(2), v_cache.stride(1), v_cache.stride(3)),
        cfg, dict(BLOCK_G=max(16, triton.next_power_of_2(common["GQA"])), NUM_SPLITS=num_splits, **common),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_reqs, hq)](
            out, part_acc, part_ml, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=common["BLOCK_D"], NUM_SPLITS=num_splits,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        )
    return out
