"""Helpers for the background threads of vllm-vtensor and flexoffload."""
from __future__ import annotations

import os
import threading


def compute_cores() -> set[int]:
    """The cores the model computes on: those vLLM pinned the process's main thread to (its CPU
    worker computes there, and a Ray actor runs its tasks there), or, where the main thread is not
    pinned, those the calling thread inherited."""
    every = set(range(os.cpu_count() or 1))
    main = os.sched_getaffinity(os.getpid())  # the main thread's (Linux: a thread id is a pid)
    return main if main != every else os.sched_getaffinity(0)


def move_off_compute_cores() -> None:
    """Move the calling helper thread off the compute cores where there are others.

    vLLM pins its CPU worker (and so every thread it starts) to its compute cores and keeps a core
    or more for its other processes. A helper thread (chunk pre-creation, prefetch reads) left on a
    compute core would take time from the model's OpenMP threads - a parallel region waits for its
    slowest thread - instead of running beside them. So: the cores other than the compute cores, or
    every core when nothing is pinned. A helper started by another helper (FlexInfer's reader pool,
    started from its prefetch thread) inherits that helper's cores, not the compute cores: the compute
    cores are read from the main thread, so it stays off them too.
    """
    try:
        every = set(range(os.cpu_count() or 1))
        os.sched_setaffinity(threading.get_native_id(), (every - compute_cores()) or every)
    except (OSError, AttributeError):
        pass
