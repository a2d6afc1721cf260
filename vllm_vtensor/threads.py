"""Helpers for the background threads of vllm-vtensor and flexoffload."""
from __future__ import annotations

import os
import threading


def run_on_any_core() -> None:
    """Let the calling thread run on any core.

    vLLM pins its CPU worker (and so every thread it starts) to the compute cores; a helper thread
    pinned there (chunk pre-creation, prefetch reads) would take compute time instead of running
    beside the compute.
    """
    try:
        os.sched_setaffinity(threading.get_native_id(), range(os.cpu_count() or 1))
    except (OSError, AttributeError):
        pass
