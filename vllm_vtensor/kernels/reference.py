"""Torch reference for the vTensor attention kernels (same signature), built on SDPA.

KV addressing shared by every implementation: request ``r``'s token ``t`` of
kv-head ``h`` is ``cache[kv_start_block[r] + t // B, h, t % B, :]`` with
``B = cache.shape[2]`` - a base plus strides, never a block-table lookup.
Token ``t`` of a request whose ``seq_lens[r]`` tokens include ``q_len`` new
ones sits at position ``t``; new query ``i`` is at ``seq_len - q_len + i`` and
attends causally (and within ``sliding_window`` when given).  An fp8 cache's values
are multiplied by ``k_scale``/``v_scale`` as they are read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_kv(cache: torch.Tensor, start_block: int, seq_len: int) -> torch.Tensor:
    """``[seq_len, H, D]`` of one request, read by strides from ``[blocks, H, B, D]``."""
    bsz = cache.shape[2]
    n_blocks = -(-seq_len // bsz)
    kv = cache[start_block : start_block + n_blocks]  # [n, H, B, D]
    return kv.permute(0, 2, 1, 3).reshape(n_blocks * bsz, cache.shape[1], cache.shape[3])[:seq_len]


def context_attention_ref(
    *,
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [blocks, Hkv, B, D]
    v_cache: torch.Tensor,  # [blocks, Hkv, B, D]
    out: torch.Tensor,  # [T, Hq, D]
    query_start_loc: torch.Tensor,  # [R + 1]
    seq_lens: torch.Tensor,  # [R]
    kv_start_block: torch.Tensor,  # [R]
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,  # accepted for signature parity; not needed here
    launch_config: dict | None = None,  # likewise (the Triton kernels' tiles)
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    qsl, lens, starts = query_start_loc.tolist(), seq_lens.tolist(), kv_start_block.tolist()
    gqa = q.shape[1] // k_cache.shape[1]
    for r, (seq_len, start) in enumerate(zip(lens, starts)):
        q0, q1 = qsl[r], qsl[r + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        k = (gather_kv(k_cache, start, seq_len).float() * k_scale).repeat_interleave(gqa, dim=1)
        v = (gather_kv(v_cache, start, seq_len).float() * v_scale).repeat_interleave(gqa, dim=1)
        pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        pos_k = torch.arange(seq_len, device=q.device)[None, :]
        allowed = pos_k <= pos_q
        if sliding_window is not None:
            allowed &= pos_k > pos_q - sliding_window
        o = F.scaled_dot_product_attention(
            q[q0:q1].float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=scale
        )
        out[q0:q1] = o.transpose(0, 1).to(out.dtype)
    return out


def decode_attention_ref(*, q, k_cache, v_cache, out, seq_lens, kv_start_block, scale, sliding_window=None,
                         num_splits=None, max_seq_len=None, launch_config=None, k_scale=1.0, v_scale=1.0):
    """One query token per request: ``q`` and ``out`` are ``[R, Hq, D]``.

    ``num_splits``, ``max_seq_len`` and ``launch_config`` tune the Triton kernel; accepted here for signature parity.
    """
    qsl = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return context_attention_ref(q=q, k_cache=k_cache, v_cache=v_cache, out=out, query_start_loc=qsl,
                                 seq_lens=seq_lens, kv_start_block=kv_start_block, scale=scale,
                                 sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale)
