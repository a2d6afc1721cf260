"""Entry point ``vllm.general_plugins: flexoffload`` (runs in every vLLM process)."""
from __future__ import annotations

import multiprocessing
import os

from vllm_vtensor.log import get_logger

logger = get_logger("flexoffload.plugin")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from . import loader  # noqa: F401  (registers --load-format flexinfer)
    logger.info("flexoffload plugin registered in pid %d (%s)", os.getpid(), multiprocessing.current_process().name)
