"""Where the background threads of vllm-vtensor and flexoffload run on a CPU."""
from __future__ import annotations

import os
import threading

from . import settings


def compute_cores() -> set[int]:
    """The cores the model computes on: those vLLM pinned the process's main thread to (its CPU
    worker computes there, and a Ray actor runs its tasks there), or, where the main thread is not
    pinned, those the calling thread inherited."""
    every = set(range(os.cpu_count() or 1))
    main = os.sched_getaffinity(os.getpid())  # the main thread's (Linux: a thread id is a pid)
    return main if main != every else os.sched_getaffinity(0)


def vllm_binds_automatically() -> bool:
    """Whether vLLM chose the worker's cores itself (``VLLM_CPU_OMP_THREADS_BIND`` unset or ``auto``):
    it then keeps the cores it did not give a worker for its other processes."""
    return os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") in ("", "auto")


def helper_cores() -> set[int]:
    """The cores a helper thread runs on (``VTENSOR_HELPER_CORES``).

    ``auto``: with vLLM's automatic binding, the cores other than the compute cores (where there are
    others). A helper left on a compute core takes time from the model's OpenMP threads - a parallel
    region waits for its slowest thread - instead of running beside them. With a binding of the
    user's own, the compute cores: the other cores may be another engine's compute cores, where a
    helper waits behind that engine's threads for its time slice while this worker waits for the
    helper (the pool's lock, the GIL). Measured with two engines on a 2-core host, each bound to a
    core: 108 tok/s in all with the helpers on the other engine's core, 157 on their own.

    The compute cores are read from the main thread, so a helper started by another helper
    (FlexInfer's reader pool, started from its prefetch thread) gets the same cores."""
    chosen = settings.get("VTENSOR_HELPER_CORES")
    if chosen != "auto":
        return set(chosen)
    compute = compute_cores()
    if not vllm_binds_automatically():
        return compute
    every = set(range(os.cpu_count() or 1))
    return (every - compute) or every


def move_to_helper_cores() -> None:
    """Move the calling helper thread to :func:`helper_cores` (left where it is if Linux refuses:
    cores named in ``VTENSOR_HELPER_CORES`` that this process may not use, say, which is logged)."""
    cores = helper_cores()
    try:
        os.sched_setaffinity(threading.get_native_id(), cores)
    except AttributeError:
        pass
    except OSError as e:
        if settings.get("VTENSOR_HELPER_CORES") != "auto":
            from .log import get_logger

            get_logger(__name__).warning("vTensor: a helper thread cannot run on VTENSOR_HELPER_CORES %s (%s); it "
                                         "stays on the cores it has. Name cores this process may use (%s).",
                                         sorted(cores), e, sorted(os.sched_getaffinity(0)))
