"""Allocator figures from the worker, readable by the API server's metrics.

The KV space lives in vLLM's worker process; ``/metrics`` is served by the API
server process.  The worker writes its figures as JSON to the file named by
``VTENSOR_STATS_FILE`` (set by the plugin in the first vLLM process, and
inherited by the engine and worker processes it spawns), at most every
``_MIN_INTERVAL_S`` unless forced; readers load the latest snapshot.  The
figures are gathered and written by a helper thread off the compute cores: a
step only hands the request over (gathering and writing took ~0.3 ms, on the
critical path of every step that added or finished requests).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

from . import settings
from .log import get_logger
from .threads import move_off_compute_cores

ENV = "VTENSOR_STATS_FILE"
_MIN_INTERVAL_S = 0.2
_last_write = 0.0
_attached = None


def ensure_stats_path() -> str:
    """Choose the snapshot file once, in the first process; children inherit it."""
    return settings.stats_file()


def attach(kv) -> None:
    global _attached
    _attached = kv
    publish(kv, force=True)


def attached():
    """The KV space of this process (the worker), or None."""
    return _attached


def publish(kv, force: bool = False) -> None:
    """Have ``kv``'s figures written soon (by the helper thread); at most every ``_MIN_INTERVAL_S``
    unless ``force``."""
    global _last_write
    path = settings.raw(ENV)  # checked at start-up (settings.check_all); read here on every step
    now = time.monotonic()
    if not path or (not force and now - _last_write < _MIN_INTERVAL_S):
        return
    _last_write = now
    _publisher.request(kv, path)


def _write_snapshot(kv, path: str) -> None:
    data = dataclasses.asdict(kv.stats())
    data["pid"] = os.getpid()
    data["time"] = time.time()
    write_json_atomic(path, data)


class _Publisher:
    """One helper thread per process that writes the latest requested snapshot."""

    def __init__(self):
        self._cond = threading.Condition()
        self._pending: tuple | None = None
        self._pid = None  # the process whose thread runs (a forked child starts its own)

    def request(self, kv, path: str) -> None:
        with self._cond:
            self._pending = (kv, path)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="vtensor-stats", daemon=True).start()
            self._cond.notify()

    def _run(self) -> None:
        move_off_compute_cores()
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                (kv, path), self._pending = self._pending, None
            try:
                _write_snapshot(kv, path)
            except Exception:  # figures are best effort; the engine goes on
                get_logger(__name__).exception("vTensor: writing the allocator figures to %s failed", path)


_publisher = _Publisher()


def write_json_atomic(path: str, data: dict) -> None:
    """Replace ``path`` with ``data`` as JSON; readers never see a half-written file."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # the pool's reaper thread publishes too
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read() -> dict | None:
    path = settings.get(ENV)
    try:
        with open(path) as f:
            return json.load(f)
    except (TypeError, OSError, ValueError):
        return None
