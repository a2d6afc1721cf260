"""VTENSOR's sizing policy: which block size a model gets, which block sizes are refused, and
when a CUDA KV space's virtual range is large enough to slow start-up.

A physical block is one chunk holding that block's pages of every layer; a chunk is a multiple of
the memory granularity (2 MiB on CUDA, a page on a CPU). A block whose KV pads its chunk by more
than :data:`MAX_CHUNK_PADDING` wastes memory on every block, so VTENSOR picks, and insists on,
blocks that fill their chunk.
"""
from __future__ import annotations

from .kv_space import chunk_bytes_for
from .log import get_logger

logger = get_logger(__name__)


class VTensorConfigError(ValueError):
    """A configuration VTENSOR cannot run; the message names the fix."""


MAX_CHUNK_PADDING = 0.10


def _pads_little(block_bytes: int, granularity: int) -> bool:
    return chunk_bytes_for(block_bytes, granularity) <= block_bytes * (1 + MAX_CHUNK_PADDING)


def smallest_block_size(bytes_per_token: int, granularity: int, multiple: int = 16) -> int:
    """The smallest block (a multiple of ``multiple`` tokens) whose chunk pads by at most 10%."""
    return next(b for b in range(multiple, 1 << 30, multiple) if _pads_little(b * bytes_per_token, granularity))


def preferred_block_size(default_block_size: int, granularity: int, multiple: int) -> int:
    """The smallest block (a multiple of ``multiple`` tokens, as the kernel needs) whose KV over all
    layers fills its chunk (a multiple of the memory ``granularity``) to within 10%, for the model
    of the current vLLM config; ``default_block_size`` without one."""
    from vllm.config import get_current_vllm_config

    cfg = get_current_vllm_config()
    mc = cfg.model_config
    if mc is None:
        return default_block_size
    per_token = (2 * mc.get_num_layers(cfg.parallel_config) * mc.get_num_kv_heads(cfg.parallel_config)
                 * mc.get_head_size() * mc.dtype.itemsize)
    return smallest_block_size(per_token, granularity, multiple=multiple)


def check_chunk_padding(block_bytes: int, block_size: int, granularity: int) -> None:
    """Refuse a block whose chunk (all layers' pages, rounded up to the VMM granularity: 2 MiB on
    CUDA) would waste more than 10% of its memory, naming the ``--block-size`` that fits."""
    if _pads_little(block_bytes, granularity):
        return
    chunk = chunk_bytes_for(block_bytes, granularity)
    fits = smallest_block_size(block_bytes // block_size, granularity)
    raise VTensorConfigError(
        f"VTENSOR maps one chunk per block holding all layers' KV; a block of {block_size} tokens is "
        f"{block_bytes} B, which pads to a {chunk} B chunk ({granularity} B granularity), wasting "
        f"{1 - block_bytes / chunk:.0%} of KV memory. Pass --block-size {fits} (block_size={fits}), the smallest "
        f"block that wastes at most {MAX_CHUNK_PADDING:.0%}, or leave --block-size unset (VTENSOR then picks it).")


SLOW_COVER_MAPPINGS = 1 << 18  # ~8 s of start-up at the 29-35 us per mapping measured on an H100 (benchmarks/results/vmm-reserve-h100.json)


def warn_if_slow_to_cover(device: str, virtual_bytes: int, granularity: int, max_num_seqs: int,
                          max_model_len: int) -> bool:
    """On CUDA the virtual range is covered with read-only zero memory at start-up, one cuMemMap per
    granule or, for a range of more than ``ZERO_PIECES_ABOVE`` granules, per zero piece of up to 32
    granules (:func:`vllm_vtensor.vmm.cuda.zero_piece_granules`): warn, naming what sizes the range,
    when that is many mappings."""
    from .vmm.cuda import zero_piece_granules

    granules = virtual_bytes // granularity
    mappings = granules // zero_piece_granules(granules)
    if not device.startswith("cuda") or mappings <= SLOW_COVER_MAPPINGS:
        return False
    logger.warning(
        "VTENSOR: the KV space's virtual range (--max-num-seqs %d x --max-model-len %d: %.1f GiB) is covered "
        "with zero memory by %d mappings at start-up, ~30 us each; lower --max-num-seqs or --max-model-len to "
        "start faster", max_num_seqs, max_model_len, virtual_bytes / 2**30, mappings)
    return True
