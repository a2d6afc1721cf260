"""Memory operations of a step run beside the compute (host backend).

Applying a step's block decisions costs the worker time before the forward
pass: mapping a chunk fills its page tables (~0.2 ms per 1.5 MB, ~0.7 ms per
6 MB), and a chunk made after an idle spell is written with zeros first
(~2 ms per 6 MB).  None of it is needed until the first attention layer
writes KV, after the input preparation, the embedding and the first layer's
projections.  :class:`DeferredBackend` wraps a :class:`~.host.HostBackend` so
that, inside :meth:`DeferredBackend.deferring`, the calls the owning (worker)
thread makes are only *queued*, in program order, and a helper thread on
another core runs them while the forward pass starts; the attention layers
call :func:`wait_all` before they touch KV.

What stays synchronous is pure bookkeeping: slots, virtual block ids,
refcounts, the budget.  A chunk created while deferring gets its handle at
once (its place in the memory file) and its memory in the queue, before
anything that maps, copies or zeroes it.  Calls from other threads (the
pool's pre-creation and reaper threads) run directly: they only touch chunks
no queued operation refers to (chunks nobody holds).  A call the owning
thread makes outside :meth:`deferring` first waits for the queue, so order is
kept everywhere.  An operation that fails in the helper thread is raised by
the next :meth:`wait` in the worker, where the step fails as it would have
synchronously.

Safety: until the queue has run, a newly mapped block still reads as zeros
(the read-only reserve) and a write there would fault; hence every KV access
waits first (``VTensorCPUImpl``).  Unmaps in the queue only concern requests
that are not in the step (finished, preempted, or a parked slot's tail).
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time

from ..threads import move_to_helper_cores
from .base import VirtualRange, VMMBackend

_live: "list[DeferredBackend]" = []  # open deferred backends of this process (normally none, or the worker's one)


def wait_all() -> None:
    """Wait until every queued memory operation of this process has run (raises what failed).

    Called by every attention layer in every step: with no deferred backend it is one empty loop."""
    for backend in _live:
        backend.wait()


class DeferredBackend(VMMBackend):
    """A host backend whose calls inside :meth:`deferring` run in a helper thread (module doc)."""

    def __init__(self, inner):
        super().__init__()
        if not hasattr(inner, "fill_chunk"):
            raise TypeError(f"{type(inner).__name__} cannot create chunks ahead of their memory; "
                            "only the host backend can be deferred")
        self.inner = inner
        self.device = inner.device
        self._local = threading.local()
        self._owner: int | None = None  # the thread whose calls are deferred (the worker's)
        self._collected: list[tuple] = []
        self._cond = threading.Condition()
        self._batches: collections.deque[list[tuple]] = collections.deque()
        self._pending = 0  # batches submitted and not yet run
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.deferred_ops = 0  # operations run by the helper thread (total)
        self.waited_seconds = 0.0  # time callers of wait() were held up by the queue (total)
        _live.append(self)

    # -- queueing -------------------------------------------------------
    @contextlib.contextmanager
    def deferring(self):
        """Queue this thread's calls for the helper thread; submitted when the block exits."""
        self.wait()  # the previous step's operations (a step without a forward pass never waited)
        self._owner = threading.get_ident()
        self._local.on = True
        try:
            yield self
        finally:
            self._local.on = False
            ops, self._collected = self._collected, []
            if ops:
                self._submit(ops)

    def _submit(self, ops: list[tuple]) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vtensor-map", daemon=True)
                self._thread.start()
            self._batches.append(ops)
            self._pending += 1
            self._cond.notify_all()

    def _run(self) -> None:
        move_to_helper_cores()
        while True:
            with self._cond:
                while not self._batches and not self._closed:
                    self._cond.wait()
                if not self._batches:
                    return
                ops = self._batches[0]
            error = None
            try:
                for fn, args in ops:
                    fn(*args)
            except BaseException as e:  # handed to the worker by wait()
                error = e
            with self._cond:
                self._batches.popleft()
                self._pending -= 1
                self.deferred_ops += len(ops)
                if error is not None and self._error is None:
                    self._error = error
                self._cond.notify_all()

    def wait(self) -> None:
        """Block until every submitted operation has run; raise the first that failed."""
        if self._pending:
            t0 = time.perf_counter()
            with self._cond:
                while self._pending:
                    self._cond.wait()
            self.waited_seconds += time.perf_counter() - t0
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _call(self, fn, *args) -> None:
        if getattr(self._local, "on", False):
            self._collected.append((fn, args))
            return
        if threading.get_ident() == self._owner:
            self.wait()  # keep the owner's order with what it queued before
        fn(*args)

    # -- the backend interface --------------------------------------------
    @property
    def granularity(self) -> int:
        return self.inner.granularity

    def _reserve_new(self, size: int) -> int:  # pragma: no cover - reserve() is delegated whole
        raise NotImplementedError

    def reserve(self, size: int) -> VirtualRange:
        return self.inner.reserve(size)

    def free_range(self, vr: VirtualRange) -> None:
        self.inner.free_range(vr)

    def create_chunk(self, size: int) -> int:
        if getattr(self._local, "on", False):
            handle = self.inner.create_chunk(size, fill=False)
            self._collected.append((self.inner.fill_chunk, (handle,)))
            return handle
        return self.inner.create_chunk(size)

    def release_chunk(self, handle: int) -> None:
        self._call(self.inner.release_chunk, handle)

    def copy_chunk(self, dst: int, src: int, size: int) -> None:
        self._call(self.inner.copy_chunk, dst, src, size)

    def zero_chunk(self, handle: int, size: int) -> None:
        self._call(self.inner.zero_chunk, handle, size)

    def map(self, vr: VirtualRange, offset: int, handle: int, size: int) -> None:
        self._call(self.inner.map, vr, offset, handle, size)

    def unmap(self, vr: VirtualRange, offset: int, size: int) -> None:
        self._call(self.inner.unmap, vr, offset, size)

    def release_pages(self, vr: VirtualRange, offset: int, size: int) -> None:
        self._call(self.inner.release_pages, vr, offset, size)

    def synchronize(self) -> None:
        self.inner.synchronize()

    def as_tensor(self, addr: int, nbytes: int):
        return self.inner.as_tensor(addr, nbytes)

    def resident_bytes(self) -> int:
        if threading.get_ident() == self._owner:
            self.wait()
        return self.inner.resident_bytes()

    def close(self) -> None:
        self.wait()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self in _live:
            _live.remove(self)
        self.inner.close()
