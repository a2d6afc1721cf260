"""Physical chunk pool: a byte budget, refcounts, reuse and pre-creation.

Knows nothing of torch or vLLM.  A chunk id is the backend's handle.  A
chunk's refcount is the number of virtual places it is mapped at (plus one
while it is being handed out), so a prefix shared by three requests is one
chunk with refcount 3.

Invariants (asserted):
* ``created == in_use + cached + lingering``, and ``created <= budget_chunks``;
* a chunk is cached or lingering only with refcount 0, and in use only with refcount >= 1.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Protocol
from dataclasses import asdict, dataclass

from .log import get_logger
from .settings import parse_bytes
from .threads import move_to_helper_cores
from .vmm.base import VMMBackend

DEFAULT_CHUNK_BYTES = 2 << 20  # the CUDA VMM granularity on stock drivers


class PoolShare(Protocol):
    """A budget several pools draw on (:mod:`vllm_vtensor.shared_pool`): told how many chunks this pool
    holds, it may refuse more."""

    def grow(self, chunks: int, *, force: bool = False, reserve: bool = False) -> bool:
        """This pool would hold ``chunks`` chunks: allowed? (``force``: it will, count them; ``reserve``: for
        chunks made ahead of need, which others waiting for memory come before.)"""

    def held(self, chunks: int) -> None:
        """This pool holds ``chunks`` chunks now (after giving some back)."""


class VTensorOutOfMemory(MemoryError):
    """The pool's physical budget is used up.  Callers preempt or refuse; never crash."""


@dataclass(frozen=True)
class PoolStats:
    chunk_bytes: int
    budget_bytes: int
    chunks_in_use: int
    chunks_cached: int  # created, unmapped, kept for reuse
    chunks_lingering: int  # released, given back to the system after ``linger_s`` unless reused first
    resident_bytes: int  # physical bytes created (in use + cached + lingering)
    mapped_bytes: int  # virtual bytes backed by a chunk (a shared chunk counts per mapping)
    shared_bytes: int  # physical bytes mapped at more than one place
    maps: int
    unmaps: int
    chunks_created: int
    chunks_created_on_demand: int  # created by an acquire that found none ready (on its caller's critical path)
    chunks_released: int
    peak_resident_bytes: int  # the most physical bytes held at once since the pool was made

    def as_dict(self) -> dict:
        return asdict(self)


class ChunkPool:
    """Hands out physical chunks of ``chunk_bytes`` up to ``budget_bytes``.

    ``low_watermark``/``high_watermark`` (in chunks): when fewer than ``low``
    unmapped chunks are cached, a background thread creates chunks until
    ``high`` are cached, so creating physical memory (~0.2 ms per 2 MiB on a
    GPU, ~0.5 ms on a CPU) stays off the critical path; :meth:`expect` raises
    that target for a while (requests about to grow); ``create_ahead`` starts
    the background thread for :meth:`expect` even without a standing reserve.  Released chunks are cached up to
    ``high_watermark`` and given back to the system beyond it: at once, or,
    with ``linger_s > 0``, by a background thread once they have been unused
    that long (a chunk released and wanted again soon, as requests come and
    go, is then handed out again without being zeroed, released and created;
    ``on_release`` is called after the thread gives chunks back).
    """

    def __init__(
        self,
        backend: VMMBackend,
        budget_bytes: int | str,
        chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
        *,
        low_watermark: int = 0,
        high_watermark: int = 0,
        linger_s: float = 0.0,
        on_release: Callable[[], None] | None = None,
        create_ahead: bool = False,
    ):
        budget_bytes, chunk_bytes = parse_bytes(budget_bytes), parse_bytes(chunk_bytes)
        gran = backend.granularity
        if chunk_bytes <= 0 or chunk_bytes % gran:
            raise ValueError(f"chunk size {chunk_bytes} must be a positive multiple of the {backend.device} granularity {gran}")
        if budget_bytes < chunk_bytes:
            raise ValueError(f"budget {budget_bytes} bytes is below one chunk ({chunk_bytes} bytes): raise the budget")
        if not 0 <= low_watermark <= high_watermark:
            raise ValueError(f"watermarks must satisfy 0 <= low ({low_watermark}) <= high ({high_watermark})")
        if linger_s < 0:
            raise ValueError(f"linger_s={linger_s} must be >= 0 seconds")
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.budget_chunks = budget_bytes // chunk_bytes
        self.low, self.high = low_watermark, min(high_watermark, self.budget_chunks)
        self._ref: dict[int, int] = {}  # chunk -> refcount (in use)
        self._cache: list[int] = []  # refcount-0 chunks kept for reuse
        self.linger_s, self.on_release = linger_s, on_release
        self._lingering: collections.OrderedDict[int, float] = collections.OrderedDict()  # chunk -> released at
        self._pending = 0  # chunks being created right now (by acquire or the background thread)
        self._held = 0  # chunks an acquire in progress has in hand (not yet in _ref)
        self._expected = 0  # chunks callers expect to acquire soon (see expect())
        self._maps = self._unmaps = self._created = self._released = 0
        self._created_on_demand = 0  # by acquire itself: the reserve had none ready
        self._peak = 0  # the most chunks created and not yet given back at once
        self._lock = threading.Condition()
        self._closed = False
        self._thread = None
        self.refill_idle_waits = 0  # times the refill thread went idle (tests wait on it, not on sleeps)
        self.share: PoolShare | None = None  # a pool shared with other engines, when set (attach_share)
        self._make_room: Callable[[], bool] | None = None
        self._over_share = False
        if self.high > 0 or create_ahead:
            self._thread = threading.Thread(target=self._refill_loop, name="vtensor-chunk-precreate", daemon=True)
            self._thread.start()
        self._reaper = None
        if linger_s > 0:
            self._reaper = threading.Thread(target=self._reap_loop, name="vtensor-chunk-reaper", daemon=True)
            self._reaper.start()

    # -- a budget shared with other engines ------------------------------
    def attach_share(self, share: PoolShare, make_room: Callable[[], bool] | None = None) -> None:
        """From now on chunks are created within ``share`` too (the pool's own budget still applies).
        ``make_room``: called when the share has no room for a chunk an acquire needs; it lets chunks
        on their way back come back (returning True if it waited for any), which the acquire then takes."""
        with self._lock:
            self.share, self._make_room = share, make_room
            share.grow(self._physical(), force=True)
            self._lock.notify_all()

    def _physical(self) -> int:
        """Chunks created and not given back, those being created included (under the lock)."""
        return self._created - self._released + self._pending

    def _report(self) -> None:
        """Tell the shared budget what this pool holds, after giving chunks back. Every figure the share
        is told is read and told under the lock, so a later figure never arrives before an earlier one."""
        with self._lock:
            if self.share is not None:
                self.share.held(self._physical())

    # -- accounting ----------------------------------------------------
    @property
    def device(self) -> str:
        return self.backend.device

    def _created_now(self) -> int:
        return len(self._ref) + len(self._cache) + len(self._lingering) + self._held + self._pending

    def _note_peak(self) -> None:
        """After a chunk is created (under the lock): the peak counts chunks an acquire holds too."""
        self._peak = max(self._peak, self._created_now() - self._pending)

    def reset_peak(self) -> None:
        """Start the peak figure over from what is held now (to measure one stretch of load)."""
        with self._lock:
            self._peak = self._created_now() - self._pending

    def _take_unused(self) -> int:
        """A created, unused chunk: from the cache, else the most recently released lingering one."""
        if self._cache:
            return self._cache.pop()
        return self._lingering.popitem(last=True)[0]

    def num_free_chunks(self) -> int:
        """Chunks that :meth:`acquire` can still hand out (cached or creatable)."""
        with self._lock:
            return self.budget_chunks - len(self._ref)

    def can_acquire(self, n: int) -> bool:
        return n <= self.num_free_chunks()

    def acquire(self, n: int = 1) -> list[int]:
        """``n`` chunks with refcount 1 each, all or none."""
        with self._lock:
            free = self.budget_chunks - len(self._ref)
            if n > free:
                raise VTensorOutOfMemory(
                    f"vTensor pool exhausted: {n} chunk(s) of {self.chunk_bytes} bytes wanted, {free} free of a "
                    f"{self.budget_chunks * self.chunk_bytes}-byte budget; free requests or raise the budget"
                )
            while (len(self._cache) + len(self._lingering) < n
                   and len(self._ref) + self._held + self._pending + n > self.budget_chunks):
                self._lock.wait()  # the refill thread is creating the last chunks of the budget
            while self.share is not None and self._pending and len(self._cache) + len(self._lingering) < n:
                self._lock.wait()  # a reserve chunk being made may be the shared pool's last room: use it
            take = min(n, len(self._cache) + len(self._lingering))
            chunks = [self._take_unused() for _ in range(take)]
            self._held += take
            need = n - take
            self._pending += need
            room = not need or self.share is None or self.share.grow(self._physical())
        if not room:
            need = self._beyond_share(chunks, need)
        try:
            for _ in range(need):
                c = self.backend.create_chunk(self.chunk_bytes)
                with self._lock:
                    chunks.append(c)
                    self._pending -= 1
                    self._held += 1
                    self._created += 1
                    self._created_on_demand += 1
                    self._note_peak()
        except BaseException:
            with self._lock:
                self._pending -= n - len(chunks)  # the creations that never happened
                self._held -= len(chunks)
                self._cache.extend(chunks)
                self._lock.notify_all()
            raise
        with self._lock:
            self._held -= n
            for c in chunks:
                assert c not in self._ref
                self._ref[c] = 1
            self._lock.notify_all()  # wakes the refill thread if the cache fell below low
        return chunks

    def take_ready(self) -> int | None:
        """A chunk already created and unused (refcount 1 from now on), or None: never creates one, never
        waits; the chunk is counted already, within the budget and a shared pool's count."""
        with self._lock:
            if not (self._cache or self._lingering):
                return None
            chunk = self._take_unused()
            self._ref[chunk] = 1
            self._lock.notify_all()  # the refill thread, if the cache fell below its target
            return chunk

    def _beyond_share(self, chunks: list[int], need: int) -> int:
        """An acquire holding ``chunks`` needs ``need`` more than the shared pool has room for: take what
        ``make_room`` brings back (unmaps still in flight), and count the rest anyway - a step never fails
        for it. The scheduler claims its blocks' memory before the worker maps them, so that rest is a
        miscount, said once. Returns the chunks still to create."""
        if self._make_room is not None and self._make_room():
            with self._lock:
                take = min(need, len(self._cache) + len(self._lingering))
                chunks.extend(self._take_unused() for _ in range(take))
                self._held += take
                self._pending -= take
                need -= take
                if not need or self.share.grow(self._physical()):
                    return need
        with self._lock:
            self.share.grow(self._physical(), force=True)
        if not self._over_share:
            self._over_share = True
            get_logger(__name__).warning("vTensor pool: %d chunk(s) created beyond the shared pool's room "
                                         "(the scheduler's claim and the worker's count disagree)", need)
        return need

    def expect(self, n: int) -> None:
        """Callers expect to acquire about ``n`` chunks soon: with pre-creation on, the background
        thread keeps that many ready (beyond ``high_watermark``) until the next call says otherwise."""
        with self._lock:
            if self._thread is None:
                return
            self._expected = max(0, min(n, self.budget_chunks))
            if len(self._cache) < max(self.low, self._expected):
                self._lock.notify_all()

    def settle(self) -> None:
        """Callers expect nothing more for now (say, every request finished): chunks made ready beyond
        the standing reserve (``high_watermark``) for an expected burst are released like any other
        unused chunk, so an idle pool holds no more than its reserve (after ``linger_s``, when set)."""
        with self._lock:
            self._expected = 0
            excess = max(0, len(self._cache) - self.high)
            gone = self._let_go(self._cache[:excess])
            del self._cache[:excess]
        for c in gone:
            self.backend.release_chunk(c)
        if gone:
            self._report()

    def _let_go(self, chunks: list[int]) -> list[int]:
        """Under the lock: unused chunks the cache does not keep linger (with ``linger_s``), or are
        returned, counted as released, for the caller to give back outside the lock."""
        if self.linger_s > 0 and not self._closed:
            now = time.monotonic()
            for c in chunks:
                self._lingering[c] = now
            if chunks:
                self._lock.notify_all()  # the reaper
            return []
        self._released += len(chunks)
        return chunks

    def _target(self) -> int:
        return max(self.high, self._expected)

    def retain(self, chunk: int) -> None:
        with self._lock:
            assert self._ref[chunk] >= 1, "retain of a chunk that is not in use"
            self._ref[chunk] += 1

    def release(self, chunk: int) -> None:
        with self._lock:
            left = self._ref[chunk] - 1
            if left:
                self._ref[chunk] = left
                return
            del self._ref[chunk]
            if len(self._cache) < self._target() and not self._closed:
                self._cache.append(chunk)
                return
            gone = self._let_go([chunk])
        for c in gone:
            self.backend.release_chunk(c)
        if gone:
            self._report()

    def refcount(self, chunk: int) -> int:
        with self._lock:
            return self._ref.get(chunk, 0)

    def note_maps(self, maps: int = 0, unmaps: int = 0) -> None:
        with self._lock:
            self._maps += maps
            self._unmaps += unmaps

    def _check_accounting(self) -> None:
        """Every chunk created and not yet given back is in use, cached, lingering or in an acquire's
        hands (under the lock). A broken count would misreport memory and let the budget drift."""
        held = len(self._ref) + len(self._cache) + len(self._lingering) + self._held
        if self._created - self._released != held:
            raise AssertionError(f"vTensor pool accounting broke: created {self._created} - released "
                                 f"{self._released} != in use {len(self._ref)} + cached {len(self._cache)} + "
                                 f"lingering {len(self._lingering)} + held {self._held}")

    def stats(self) -> PoolStats:
        with self._lock:
            self._check_accounting()
            refs = self._ref.values()
            created = len(self._ref) + len(self._cache) + len(self._lingering)
            return PoolStats(
                chunk_bytes=self.chunk_bytes,
                budget_bytes=self.budget_chunks * self.chunk_bytes,
                chunks_in_use=len(self._ref),
                chunks_cached=len(self._cache),
                chunks_lingering=len(self._lingering),
                resident_bytes=created * self.chunk_bytes,
                mapped_bytes=sum(refs) * self.chunk_bytes,
                shared_bytes=sum(1 for r in refs if r > 1) * self.chunk_bytes,
                maps=self._maps,
                unmaps=self._unmaps,
                chunks_created=self._created,
                chunks_created_on_demand=self._created_on_demand,
                chunks_released=self._released,
                peak_resident_bytes=self._peak * self.chunk_bytes,
            )

    # -- cache management ----------------------------------------------
    def trim(self) -> None:
        """Give every cached or lingering (unmapped) chunk back to the system."""
        with self._lock:
            chunks, self._cache = self._cache + list(self._lingering), []
            self._lingering.clear()
            self._released += len(chunks)
        for c in chunks:
            self.backend.release_chunk(c)
        if chunks:
            self._report()

    def _refill_loop(self) -> None:
        """Keep the reserve: refill from below ``max(low, expected)`` up to the target, one chunk at a
        time so each is usable as soon as it exists."""
        move_to_helper_cores()  # creating chunks beside the compute (threads.helper_cores)
        filling = False
        while True:
            with self._lock:
                while True:
                    if self._closed:
                        return
                    if self._created_now() < self.budget_chunks:
                        if len(self._cache) < max(self.low, self._expected):
                            filling = True
                        if filling and len(self._cache) < self._target():
                            break
                    filling = False
                    self.refill_idle_waits += 1  # it looked at the state and found nothing to make
                    self._lock.notify_all()
                    self._lock.wait()
                if self.share is not None and not self.share.grow(self._physical() + 1, reserve=True):
                    self._lock.wait(0.1)  # the shared pool has no room for a reserve now: look again later
                    continue
                self._pending += 1
            try:
                chunk = self.backend.create_chunk(self.chunk_bytes)
            except Exception:  # device or host memory taken by others: stop pre-creating, never crash
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()
                get_logger(__name__).warning("vTensor pool: creating chunks ahead failed; they are made on demand "
                                             "from now on", exc_info=True)
                return
            with self._lock:
                self._pending -= 1
                self._created += 1
                self._cache.append(chunk)
                self._note_peak()
                self._lock.notify_all()
                # settle() may have lowered the target while this one was made: then it goes like the rest
                beyond = len(self._cache) > self._target() and not self._closed
                gone = self._let_go([self._cache.pop()]) if beyond else []
            for c in gone:
                self.backend.release_chunk(c)
            if gone:
                self._report()

    def _reap_loop(self) -> None:
        """Give lingering chunks back once they have been unused for ``linger_s``."""
        move_to_helper_cores()
        while True:
            with self._lock:
                while not self._closed and not self._lingering:
                    self._lock.wait()
                if self._closed:
                    return
                now = time.monotonic()
                expired = [c for c, t in self._lingering.items() if now - t >= self.linger_s]
                if not expired:
                    oldest = next(iter(self._lingering.values()))
                    self._lock.wait(self.linger_s - (now - oldest))
                    continue
                for c in expired:
                    del self._lingering[c]
                self._released += len(expired)
            try:
                for c in expired:
                    self.backend.release_chunk(c)
                self._report()
                if self.on_release is not None:
                    self.on_release()
            except Exception:  # keep reaping; the failure is logged, never lost in a dead thread
                get_logger(__name__).exception("vTensor pool: giving lingering chunks back failed")

    def close(self) -> None:
        """Stop the background threads and give unused chunks back (chunks in use stay valid)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for thread in (self._thread, self._reaper):
            if thread is not None:
                thread.join()
        self.trim()
