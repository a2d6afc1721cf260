"""Package loggers that print in every vLLM process.

vLLM configures only the ``vllm`` logger, and in the API server it does so
*after* loading general plugins, so a plugin logging through ``vllm.*`` loses
its first lines.  Our loggers get their own handler in vLLM's format and honour
``VLLM_LOGGING_LEVEL``.
"""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"


def get_logger(name: str) -> logging.Logger:
    root_name = name.split(".")[0]
    root = logging.getLogger(root_name)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
