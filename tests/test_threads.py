"""Helper threads leave the cores the worker computes on (when there are other cores)."""
from __future__ import annotations

import os
import threading

import pytest

from vllm_vtensor.threads import move_off_compute_cores


def _affinity_after_move(pinned: set[int]) -> set[int]:
    seen = {}

    def helper():
        os.sched_setaffinity(threading.get_native_id(), pinned)  # as if started by a pinned worker
        move_off_compute_cores()
        seen["cores"] = os.sched_getaffinity(0)

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    return seen["cores"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_pinned_helper_moves_to_the_other_cores():
    cores = sorted(os.sched_getaffinity(0))
    assert _affinity_after_move({cores[0]}) == set(cores) - {cores[0]}


def test_unpinned_helper_may_run_anywhere():
    every = os.sched_getaffinity(0)
    assert _affinity_after_move(every) == every


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_helper_started_by_a_helper_stays_off_the_compute_cores():
    """A worker pins its main thread; a helper moves off its core and starts another helper (the way
    FlexInfer's prefetch thread starts its reader pool): that one must not move onto the compute core."""
    import subprocess
    import sys

    code = """
import os, threading
from vllm_vtensor.threads import move_off_compute_cores
cores = sorted(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cores[0]})  # the worker's main thread, pinned by vLLM
seen = {}
def inner():
    move_off_compute_cores()
    seen["inner"] = os.sched_getaffinity(0)
def outer():
    move_off_compute_cores()
    seen["outer"] = os.sched_getaffinity(0)
    t = threading.Thread(target=inner); t.start(); t.join()
t = threading.Thread(target=outer); t.start(); t.join()
rest = set(cores) - {cores[0]}
assert seen == {"outer": rest, "inner": rest}, (seen, rest)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
