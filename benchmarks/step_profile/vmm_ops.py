"""Where VTENSOR's block updates spend their time: each VMM backend call timed, by the thread it ran on.

Used by sitecustomize.py here (a profiling aid, not used by the plugin). Calls made while the worker
applies a step's block decisions are counted as the step's own; calls made meanwhile on other
threads (the chunk pool's pre-creation and reaper threads, the deferred-unmap thread) as beside it.
Only the outermost backend call is timed (a ``map`` inside ``map_many`` counts once, as
``map_many``), so the update time these calls do not explain is the bookkeeping and lock waits.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import threading
import time

OPS = ("create_chunk", "release_chunk", "map_many", "map", "unmap", "release_pages", "zero_chunk", "copy_chunk",
       "synchronize")


class OpTimes:
    def __init__(self):
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._own: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])  # op -> [calls, seconds]
        self._beside: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])

    @contextlib.contextmanager
    def updating(self):
        """Calls on this thread inside the block are the step's own."""
        self._tls.updating = True
        try:
            yield
        finally:
            self._tls.updating = False

    def wrap(self, cls) -> None:
        """Time the backend calls ``cls`` defines itself (inherited ones are timed where defined)."""
        for name in OPS:
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_vtensor_timed", False):
                setattr(cls, name, self._timed(name, fn))

    def _timed(self, name: str, fn):
        tls = self._tls

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if getattr(tls, "depth", 0):
                return fn(*args, **kwargs)
            tls.depth = 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                tls.depth = 0
                with self._lock:
                    entry = (self._own if getattr(tls, "updating", False) else self._beside)[name]
                    entry[0] += 1
                    entry[1] += dt

        timed._vtensor_timed = True
        return timed

    def take(self) -> tuple[dict, dict]:
        """The step's own calls and those beside it since the last ``take``: ``{op: (calls, seconds)}`` each."""
        with self._lock:
            own, beside = dict(self._own), dict(self._beside)
            self._own.clear()
            self._beside.clear()
        return ({k: tuple(v) for k, v in own.items()}, {k: tuple(v) for k, v in beside.items()})


def format_ops(ops: dict) -> str:
    """``op:calls:ms`` joined by commas (``-`` for none): one whitespace-free field of a step line."""
    return ",".join(f"{k}:{n}:{s * 1e3:.3f}" for k, (n, s) in sorted(ops.items())) or "-"


def parse_ops(field: str) -> dict[str, tuple[int, float]]:
    """:func:`format_ops`' field back as ``{op: (calls, seconds)}``."""
    if field in ("", "-"):
        return {}
    out = {}
    for part in field.split(","):
        name, n, ms = part.split(":")
        out[name] = (int(n), float(ms) / 1e3)
    return out


def add_ops(total: dict, ops: dict) -> None:
    """Add ``ops`` into ``total`` (both ``{op: [calls, seconds]}``-like; ``total`` is updated)."""
    for k, (n, s) in ops.items():
        have = total.setdefault(k, [0, 0.0])
        have[0] += n
        have[1] += s
