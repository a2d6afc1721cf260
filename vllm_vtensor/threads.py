"""Helpers for the background threads of vllm-vtensor and flexoffload."""
from __future__ import annotations

import os
import threading


def move_off_compute_cores() -> None:
    """Move the calling helper thread off the compute cores where there are others.

    vLLM pins its CPU worker (and so every thread it starts) to its compute cores and keeps a core
    or more for its other processes. A helper thread (chunk pre-creation, prefetch reads) left on a
    compute core would take time from the model's OpenMP threads - a parallel region waits for its
    slowest thread - instead of running beside them. So: the cores this thread was not pinned to,
    or every core when it was not pinned at all.
    """
    try:
        inherited = os.sched_getaffinity(0)
        every = set(range(os.cpu_count() or 1))
        os.sched_setaffinity(threading.get_native_id(), (every - inherited) or every)
    except (OSError, AttributeError):
        pass
