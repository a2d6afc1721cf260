"""How a CPU engine core waits for its workers' replies while a step runs.

vLLM's multiprocess executor (every engine on a CPU uses it) reads each worker's reply from a
shared-memory queue. For a second after each message its reader polls that queue with
``sched_yield`` (``SpinCondition.wait`` in ``vllm/distributed/device_communicators/shm_broadcast.py``):
on a GPU machine with cores to spare that answers within microseconds; on a CPU it keeps one core
busy for the whole forward pass. FlexInfer's reader threads run beside the worker's compute core,
on the core that loop takes, and in a virtual machine an always-busy guest leaves the host no idle
core for the disk's emulation (measured as steal time: 25-27% of both cores during a FlexInfer
decode, 0-1% with the engine sleeping between checks).

:func:`sleep_between_checks` makes one reader sleep a fixed interval between checks while busy
instead of yielding; vLLM's protocol is otherwise unchanged (after a second without messages the
reader still waits on its notification socket). A reply is seen at most one interval (plus the
kernel's timer slack) late. ``VTENSOR_ENGINE_POLL_US`` picks the interval; the patch
``engine-reply-poll`` applies it to the engine core's reply queues once its executor is built.
"""
from __future__ import annotations

import time

from . import settings


def poll_interval_s(vllm_config, on_cpu: bool) -> float | None:
    """The interval the engine core's reply readers sleep between checks, or None for vLLM's loop."""
    value = settings.get("VTENSOR_ENGINE_POLL_US")
    if not on_cpu:
        return None
    if value == "auto":
        load_format = getattr(getattr(vllm_config, "load_config", None), "load_format", None)
        value = settings.ENGINE_POLL_AUTO_US if load_format == "flexinfer" else 0
    return value / 1e6 if value else None


def sleep_between_checks(spin, interval_s: float) -> None:
    """Make the reader ``spin`` (a vLLM ``SpinCondition``) sleep ``interval_s`` between checks of its
    queue while busy, instead of ``sched_yield``; idle, it waits on its socket as before."""
    if not spin.is_reader:
        raise ValueError("only a queue's reader waits for messages")
    idle_wait = spin.wait  # the class's method, bound: its idle branch (poll the socket) is kept

    def wait(timeout_ms: int | None = None) -> None:
        if time.monotonic() <= spin.last_read + spin.busy_loop_s:
            time.sleep(interval_s)
        else:
            idle_wait(timeout_ms)

    spin.wait = wait


def apply_to_executor(executor, on_cpu: bool) -> float | None:
    """Apply the configured interval to every reply queue the engine core reads (``executor`` is
    vLLM's ``MultiprocExecutor``, its queues built). Returns the interval, or None where vLLM's loop stays."""
    interval = poll_interval_s(executor.vllm_config, on_cpu)
    if interval is None:
        return None
    for mq in getattr(executor, "response_mqs", ()):
        spin = getattr(mq, "_spin_condition", None)
        if spin is not None:  # a remote queue (multi-node) has no shared-memory reader
            sleep_between_checks(spin, interval)
    return interval
