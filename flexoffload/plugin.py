"""Entry point ``vllm.general_plugins: flexoffload`` (runs in every vLLM process)."""
from __future__ import annotations

import multiprocessing
import os

from vllm_vtensor.log import get_logger

logger = get_logger("flexoffload.plugin")

_registered: bool | None = None  # None: not yet called


def register() -> bool:
    """Register ``--load-format flexinfer``; with another vLLM version, stay out of the way (the
    vtensor plugin's warning says why). Returns whether it registered."""
    global _registered
    if _registered is not None:
        return _registered
    from vllm_vtensor.patches import version_mismatch

    if version_mismatch():
        _registered = False
        return False
    _registered = True
    from vllm_vtensor import stats

    from . import loader  # noqa: F401  (registers --load-format flexinfer)

    stats.ensure_private_file(loader.STATS_ENV, "flexinfer.json")  # the figures /metrics reads
    logger.info("flexoffload plugin registered in pid %d (%s)", os.getpid(), multiprocessing.current_process().name)
    return True
