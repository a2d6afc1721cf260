"""Entry point ``vllm.general_plugins: vtensor``.

vLLM calls :func:`register` once in each of its processes (API front end,
engine core, every worker).  It must be cheap and idempotent.
"""
from __future__ import annotations

import multiprocessing
import os

from vllm_vtensor.log import get_logger

logger = get_logger("vllm_vtensor.plugin")

_registered: bool | None = None  # None: not yet called


def register() -> bool:
    """Register VTENSOR and its patches; with another vLLM version, warn once and change nothing
    (``--attention-backend VTENSOR`` is then not a backend vLLM knows). Returns whether it registered."""
    global _registered
    if _registered is not None:
        return _registered
    from . import patches, settings, stats

    problem = patches.version_mismatch()
    if problem:
        _registered = False
        logger.warning(problem)
        return False
    _registered = True
    stats.ensure_stats_path()
    settings.carry_to_ray_workers()
    patches.apply_all()
    logger.info("vllm-vtensor plugin registered in pid %d (%s)", os.getpid(), multiprocessing.current_process().name)
    return True
