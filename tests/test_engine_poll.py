"""The engine core's reply readers on a CPU: vLLM's shared-memory queue, read with vLLM's
sched_yield loop and with engine_poll's sleep between checks."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from vllm_vtensor import engine_poll, settings

WAIT_S = 0.4  # how long the writer keeps the reader waiting, inside vLLM's 1 s busy window


def _wait_for_a_reply(interval_s: float | None, busy_loop_s: float | None = None) -> dict:
    """A writer and a reader of one vLLM MessageQueue (as the worker and the engine core): the reader
    reads one message (its busy window starts), then waits WAIT_S for the next. ``interval_s``: the reader
    sleeps that long between checks (None: vLLM's loop); ``busy_loop_s``: its busy window (None: vLLM's
    1 s). Returns the reader's CPU seconds during that wait and how late it saw the message."""
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    writer = MessageQueue(1, 1)
    reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
    if interval_s is not None:
        engine_poll.sleep_between_checks(reader._spin_condition, interval_s)
    if busy_loop_s is not None:
        reader._spin_condition.busy_loop_s = busy_loop_s
    ready = threading.Thread(target=writer.wait_until_ready)
    ready.start()
    reader.wait_until_ready()
    ready.join()
    out: dict = {}

    def read():
        reader.dequeue(timeout=10)
        cpu0 = time.thread_time()
        sent_at = reader.dequeue(timeout=10)
        out["late_s"] = time.monotonic() - sent_at
        out["cpu_s"] = time.thread_time() - cpu0

    thread = threading.Thread(target=read)
    thread.start()
    writer.enqueue(0.0)
    time.sleep(WAIT_S)
    writer.enqueue(time.monotonic())
    thread.join(timeout=20)
    assert not thread.is_alive(), "the reader never saw the second message"
    reader.shutdown()
    return out


def test_a_sleeping_reader_frees_the_core_and_still_sees_each_reply_within_its_interval():
    for _ in range(3):  # a machine loaded by other work gives vLLM's spinning reader less of a core: measure again
        looping = _wait_for_a_reply(None)
        sleeping = _wait_for_a_reply(0.001)
        if looping["cpu_s"] > 0.2 * WAIT_S:
            break
    # vLLM's loop keeps the reader on a core for the whole wait; sleeping 1 ms between checks does not
    assert looping["cpu_s"] > 0.2 * WAIT_S, looping
    assert sleeping["cpu_s"] < looping["cpu_s"] / 4, (sleeping, looping)
    # a reply is seen within about one interval (generous bound for a loaded machine)
    assert sleeping["late_s"] < 0.05, sleeping


def test_an_idle_reader_still_waits_on_its_socket():
    """After vLLM's busy window the patched reader goes back to vLLM's idle wait (the notification socket):
    a message written after the window is still seen at once, without the reader waking every interval."""
    # a short busy window, so the test need not wait 1 s; WAIT_S is well past it: the reader parks on its socket
    out = _wait_for_a_reply(0.001, busy_loop_s=0.05)
    assert out["late_s"] < 0.05, out
    assert out["cpu_s"] < 0.05, out  # ~50 wakeups in the window, then none


def test_only_a_reader_can_be_made_to_sleep():
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    writer = MessageQueue(1, 1)
    with pytest.raises(ValueError, match="reader"):
        engine_poll.sleep_between_checks(writer._spin_condition, 0.001)


def _config(load_format):
    return SimpleNamespace(load_config=SimpleNamespace(load_format=load_format))


@pytest.mark.parametrize("value,load_format,on_cpu,expected", [
    (None, "flexinfer", True, settings.ENGINE_POLL_AUTO_US / 1e6),  # auto: FlexInfer on a CPU sleeps
    (None, "auto", True, None),  # auto: any other engine keeps vLLM's loop
    ("auto", "flexinfer", False, None),  # GPUs: never
    ("0", "flexinfer", True, None),  # 0: vLLM's loop
    ("500", "auto", True, 500e-6),  # a number: every engine on a CPU
    ("500", "auto", False, None),
])
def test_the_interval_follows_the_setting_and_the_loader(monkeypatch, value, load_format, on_cpu, expected):
    if value is None:
        monkeypatch.delenv("VTENSOR_ENGINE_POLL_US", raising=False)
    else:
        monkeypatch.setenv("VTENSOR_ENGINE_POLL_US", value)
    assert engine_poll.poll_interval_s(_config(load_format), on_cpu) == expected


@pytest.mark.parametrize("bad", ["-1", "1e3", "fast", "100001"])
def test_a_bad_interval_names_the_fix(monkeypatch, bad):
    monkeypatch.setenv("VTENSOR_ENGINE_POLL_US", bad)
    with pytest.raises(settings.SettingError, match="VTENSOR_ENGINE_POLL_US.*give auto, 0"):
        engine_poll.poll_interval_s(_config("flexinfer"), True)
