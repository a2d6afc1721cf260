"""Attention kernels over contiguous virtual KV (Triton) and their torch reference.

Import :mod:`.attention` lazily: it needs Triton, and on a CPU only works under
``TRITON_INTERPRET=1`` (set before the import).
"""
from .reference import context_attention_ref, decode_attention_ref

__all__ = ["context_attention_ref", "decode_attention_ref"]
