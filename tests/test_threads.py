"""Where helper threads run: off the worker's compute cores under vLLM's automatic binding, on them
under a binding of the user's own, or on the cores VTENSOR_HELPER_CORES names."""
from __future__ import annotations

import os
import threading

import pytest

from vllm_vtensor.threads import move_to_helper_cores


def _affinity_after_move(pinned: set[int]) -> set[int]:
    seen = {}

    def helper():
        os.sched_setaffinity(threading.get_native_id(), pinned)  # as if started by a pinned worker
        move_to_helper_cores()
        seen["cores"] = os.sched_getaffinity(0)

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    return seen["cores"]


two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")


@pytest.fixture(autouse=True)
def _binding(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VTENSOR_HELPER_CORES", raising=False)


@two_cores
@pytest.mark.parametrize("bind", [None, "auto"])
def test_pinned_helper_moves_to_the_other_cores(monkeypatch, bind):
    if bind:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    cores = sorted(os.sched_getaffinity(0))
    assert _affinity_after_move({cores[0]}) == set(cores) - {cores[0]}


@two_cores
def test_helper_stays_on_the_cores_of_a_users_binding(monkeypatch):
    """Engines bound to a core each (VLLM_CPU_OMP_THREADS_BIND=0 and =1): the other core is the other
    engine's, so a helper stays on its own worker's core."""
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", str(cores[0]))
    assert _affinity_after_move({cores[0]}) == {cores[0]}


@two_cores
def test_helper_cores_named_in_the_setting(monkeypatch):
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", str(cores[0]))
    monkeypatch.setenv("VTENSOR_HELPER_CORES", str(cores[1]))
    assert _affinity_after_move({cores[0]}) == {cores[1]}


@pytest.mark.parametrize("value", ["x", "3-1", "-1", "0,,1", str(os.cpu_count())])
def test_bad_helper_cores_are_refused_with_the_fix(monkeypatch, value):
    from vllm_vtensor import settings

    monkeypatch.setenv("VTENSOR_HELPER_CORES", value)
    with pytest.raises(settings.SettingError, match="VTENSOR_HELPER_CORES.*give auto or ids of this host's cores"):
        settings.check_all()


def test_core_lists_read_as_linux_writes_them():
    from vllm_vtensor.settings import parse_core_list

    assert parse_core_list("2") == {2}
    assert parse_core_list("0-2,6") == {0, 1, 2, 6}


def test_unpinned_helper_may_run_anywhere():
    every = os.sched_getaffinity(0)
    assert _affinity_after_move(every) == every


@two_cores
def test_helper_started_by_a_helper_stays_off_the_compute_cores():
    """A worker pins its main thread; a helper moves off its core and starts another helper (the way
    FlexInfer's prefetch thread starts its reader pool): that one must not move onto the compute core."""
    import subprocess
    import sys

    code = """
import os, threading
from vllm_vtensor.threads import move_to_helper_cores
cores = sorted(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cores[0]})  # the worker's main thread, pinned by vLLM
seen = {}
def inner():
    move_to_helper_cores()
    seen["inner"] = os.sched_getaffinity(0)
def outer():
    move_to_helper_cores()
    seen["outer"] = os.sched_getaffinity(0)
    t = threading.Thread(target=inner); t.start(); t.join()
t = threading.Thread(target=outer); t.start(); t.join()
rest = set(cores) - {cores[0]}
assert seen == {"outer": rest, "inner": rest}, (seen, rest)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_helper_cores_this_process_may_not_use_are_logged(monkeypatch, caplog):
    """Cores outside the process's CPU set (a container's, say) cannot be taken: the helper stays where it
    is and the log names the fix."""
    import logging

    from vllm_vtensor import threads

    every = os.sched_getaffinity(0)
    monkeypatch.setenv("VTENSOR_HELPER_CORES", "0")
    monkeypatch.setattr(threads.os, "sched_setaffinity", lambda *a: (_ for _ in ()).throw(OSError(22, "Invalid argument")))
    logger = logging.getLogger("vllm_vtensor")  # the package's loggers do not propagate to the root's
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="vllm_vtensor"):
            threads.move_to_helper_cores()
    finally:
        logger.removeHandler(caplog.handler)
    assert os.sched_getaffinity(0) == every
    assert "cannot run on VTENSOR_HELPER_CORES [0]" in caplog.text and "Name cores this process may use" in caplog.text
