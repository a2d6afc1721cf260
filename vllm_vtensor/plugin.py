"""Entry point ``vllm.general_plugins: vtensor``.

vLLM calls :func:`register` once in each of its processes (API front end,
engine core, every worker).  It must be cheap and idempotent.
"""
from __future__ import annotations

import multiprocessing
import os

from vllm_vtensor.log import get_logger

logger = get_logger("vllm_vtensor.plugin")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from . import patches, stats

    stats.ensure_stats_path()
    patches.apply_all()
    logger.info("vllm-vtensor plugin registered in pid %d (%s)", os.getpid(), multiprocessing.current_process().name)
