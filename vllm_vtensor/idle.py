"""An idle engine gives its prefix cache's KV memory back (``VTENSOR_IDLE_RELEASE_S``).

VTENSOR gives a finished request's memory back at once (after ``VTENSOR_CHUNK_LINGER_S``), except the
blocks vLLM's prefix cache may hand out again: those stay until vLLM evicts them or the cache is reset.
An engine that shares its device with other work (another engine, a training job, a notebook) may
rather hold nothing while nobody asks it anything.  With ``VTENSOR_IDLE_RELEASE_S`` set, once the
engine core has had no request for that long, it resets vLLM's prefix cache in its own thread
(``EngineCore.reset_prefix_cache``, which the ``engine-reset-prefix-cache`` patch carries to the
workers: they give the cached blocks' memory back).  A helper thread watches the scheduler and wakes
the engine's idle loop through its input queue, as vLLM's own wake-ups do; the reset itself runs where
every scheduler change runs, so a request that arrives meanwhile is never raced.
"""
from __future__ import annotations

import threading
import time

from .log import get_logger
from .threads import move_to_helper_cores

logger = get_logger(__name__)


class IdleRelease:
    """Resets ``core``'s prefix cache once it has been idle ``after_s`` seconds; again only after it has
    had work since."""

    def __init__(self, core, after_s: float):
        from vllm.v1.engine import EngineCoreRequestType

        add, self._wakeup = EngineCoreRequestType.ADD, (EngineCoreRequestType.WAKEUP, None)
        self.core, self.after_s = core, after_s
        self.releases = 0  # resets made (tests, logs)
        self._due: int | None = None  # the watcher asked the engine's thread to reset, having seen this many requests
        self._done = False  # reset since the engine last had work: nothing more to give back
        self._requests = 0  # requests added (one shorter than the watcher's interval counts; utility calls do not)
        original = core._handle_client_request

        def handle_client_request(request_type, *args, **kwargs):
            if request_type == add:
                self._requests += 1  # work came: a reset asked for before it is dropped (_release)
            if self._due is not None:
                self._release()
            return original(request_type, *args, **kwargs)

        core._handle_client_request = handle_client_request
        self._thread = threading.Thread(target=self._watch, name="vtensor-idle-release", daemon=True)
        self._thread.start()

    def _busy(self) -> bool:
        return self.core.scheduler.has_requests()

    def _watch(self) -> None:
        move_to_helper_cores()
        interval = min(0.25, self.after_s / 4)
        idle_since, seen = None, self._requests
        while True:
            time.sleep(interval)
            try:
                if self._busy() or seen != self._requests:
                    idle_since, seen, self._done = None, self._requests, False
                    continue
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                elif not self._done and self._due is None and now - idle_since >= self.after_s:
                    self._due = seen
                    self.core.input_queue.put_nowait(self._wakeup)
            except Exception:
                logger.exception("vTensor: watching the engine for idle time failed")
                return

    def _release(self) -> None:
        """In the engine's thread, as it handles the wake-up (or a request that came first)."""
        seen, self._due = self._due, None
        if seen != self._requests or self._busy():
            return  # work came in the meantime: the watcher starts counting again once it is done
        self._done = True
        if self.core.reset_prefix_cache():
            self.releases += 1
            logger.info("vTensor: engine idle for %.1f s (VTENSOR_IDLE_RELEASE_S): prefix cache reset, its KV "
                        "memory given back", self.after_s)


def attach(core) -> IdleRelease | None:
    """In the engine core, once its scheduler exists: watch it for idle time when ``VTENSOR_IDLE_RELEASE_S``
    is set."""
    from . import settings

    after_s = settings.get("VTENSOR_IDLE_RELEASE_S")
    if after_s is None:
        return None
    if not hasattr(core, "input_queue"):  # an engine core in the caller's process has no idle loop to wake
        logger.warning("vTensor: VTENSOR_IDLE_RELEASE_S applies to an engine core in its own process (vLLM's "
                       "default); with VLLM_ENABLE_V1_MULTIPROCESSING=0 the prefix cache is kept")
        return None
    return IdleRelease(core, after_s)
