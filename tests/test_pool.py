"""Chunk pool: the budget is never exceeded, refcounts decide when memory is returned,
pre-creation keeps chunks ready, and bad configurations are refused with the fix."""
from __future__ import annotations

import threading
import time

import pytest

from vllm_vtensor.pool import ChunkPool, VTensorOutOfMemory
from vllm_vtensor.vmm.host import HostBackend

MiB = 1 << 20


@pytest.fixture(params=["fill", "stage", "cuda-driver-model"])
def backend(request, monkeypatch):
    """Both ways the host backend maps (filling page tables, the default, and moving them), and the CUDA
    backend making its calls to a model of the driver (tests/cuda_driver_model.py: 1 MiB granules here)."""
    if request.param == "cuda-driver-model":
        from cuda_driver_model import DriverModel, backend_on

        with backend_on(monkeypatch, DriverModel(MiB)) as b:
            yield b
        return
    b = HostBackend(stage=request.param == "stage")
    yield b
    b.close()


def test_budget_is_enforced_with_a_clear_error(backend):
    pool = ChunkPool(backend, 4 * MiB, MiB)
    chunks = pool.acquire(3)
    with pytest.raises(VTensorOutOfMemory, match="2 chunk.*1 free.*raise the budget"):
        pool.acquire(2)  # all or none
    assert pool.stats().chunks_in_use == 3
    chunks += pool.acquire(1)
    assert not pool.can_acquire(1)
    for c in chunks:
        pool.release(c)
    assert pool.can_acquire(4)


def test_chunks_a_caller_had_to_create_are_counted(backend):
    pool = ChunkPool(backend, 8 * MiB, MiB)  # no reserve: every chunk is made by the acquire that wants it
    got = pool.acquire(3)
    s = pool.stats()
    assert s.chunks_created == s.chunks_created_on_demand == 3
    for c in got:
        pool.release(c)
    pool.close()


def test_peak_resident_bytes_is_the_most_held_at_once(backend):
    pool = ChunkPool(backend, 8 * MiB, MiB)
    chunks = pool.acquire(3)
    pool.release(chunks.pop())
    chunks += pool.acquire(2)  # 4 held: one more than before
    assert pool.stats().peak_resident_bytes == 4 * MiB
    for c in chunks:
        pool.release(c)
    s = pool.stats()
    assert s.resident_bytes == 0 and s.peak_resident_bytes == 4 * MiB  # given back; the peak stays


def test_refcount_keeps_shared_chunks_alive(backend):
    pool = ChunkPool(backend, 4 * MiB, MiB)
    (c,) = pool.acquire(1)
    pool.retain(c)
    assert pool.stats().shared_bytes == MiB and pool.stats().mapped_bytes == 2 * MiB
    pool.release(c)
    assert backend.resident_bytes() == MiB and pool.refcount(c) == 1
    pool.release(c)
    assert backend.resident_bytes() == 0 and pool.stats().resident_bytes == 0


def test_released_chunks_are_reused_up_to_the_high_watermark(backend):
    pool = ChunkPool(backend, 8 * MiB, MiB, low_watermark=0, high_watermark=2)
    chunks = pool.acquire(4)
    for c in chunks:
        pool.release(c)
    s = pool.stats()
    assert s.chunks_cached == 2 and s.chunks_released == 2 and backend.resident_bytes() == 2 * MiB
    again = pool.acquire(2)
    assert set(again) <= set(chunks) and pool.stats().chunks_created == 4
    for c in again:
        pool.release(c)
    pool.close()
    assert backend.resident_bytes() == 0


def test_released_chunks_linger_are_reused_then_given_back(backend):
    """With linger_s, a released chunk is handed out again without being created anew if it is wanted
    soon; otherwise the reaper gives it back to the system and reports it."""
    reported = []
    pool = ChunkPool(backend, 8 * MiB, MiB, linger_s=0.3, on_release=lambda: reported.append(pool.stats()))
    chunks = pool.acquire(3)
    for c in chunks:
        pool.release(c)
    s = pool.stats()
    assert s.chunks_lingering == 3 and s.resident_bytes == 3 * MiB == backend.resident_bytes()
    again = pool.acquire(4)  # three lingering ones first (no creation), then one new
    assert set(chunks) <= set(again) and pool.stats().chunks_created == 4
    with pytest.raises(VTensorOutOfMemory):
        pool.acquire(5)  # lingering chunks count against the budget like any other
    for c in again:
        pool.release(c)
    deadline = time.monotonic() + 10
    while backend.resident_bytes() and time.monotonic() < deadline:
        time.sleep(0.02)
    s = pool.stats()
    assert backend.resident_bytes() == 0 and s.resident_bytes == 0 and s.chunks_lingering == 0
    assert s.chunks_released == 4 and reported and reported[-1].resident_bytes == 0
    pool.close()


def test_lingering_chunks_never_push_creation_past_the_budget(backend):
    pool = ChunkPool(backend, 4 * MiB, MiB, linger_s=60)
    for c in pool.acquire(4):
        pool.release(c)
    got = pool.acquire(4)  # all four come back from the lingering set
    assert pool.stats().chunks_created == 4 and backend.resident_bytes() == 4 * MiB
    for c in got:
        pool.release(c)
    pool.close()  # gives lingering chunks back at once
    assert backend.resident_bytes() == 0


def test_background_precreation_fills_to_high_watermark(backend):
    pool = ChunkPool(backend, 16 * MiB, MiB, low_watermark=2, high_watermark=4)
    deadline = time.monotonic() + 10
    while pool.stats().chunks_cached < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.stats().chunks_cached == 4
    got = pool.acquire(3)  # served from the cache, then the thread refills
    while pool.stats().chunks_cached < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    s = pool.stats()
    assert s.chunks_cached == 4 and s.chunks_in_use == 3 and s.resident_bytes <= s.budget_bytes
    assert s.peak_resident_bytes == s.resident_bytes  # chunks made ahead count towards the peak too
    for c in got:
        pool.release(c)
    pool.close()
    assert backend.resident_bytes() == 0


def test_expected_demand_is_created_ahead_then_forgotten(backend):
    pool = ChunkPool(backend, 16 * MiB, MiB, low_watermark=1, high_watermark=2)
    deadline = time.monotonic() + 10

    def settle(n):
        while pool.stats().chunks_cached != n and time.monotonic() < deadline:
            time.sleep(0.01)
        return pool.stats().chunks_cached

    creators = []
    create = backend.create_chunk
    backend.create_chunk = lambda size: (creators.append(threading.current_thread().name), create(size))[1]
    assert settle(2) == 2
    pool.expect(6)  # requests about to grow by 6 chunks
    assert settle(6) == 6
    got = pool.acquire(6)  # all from the cache: nothing created on the caller's path
    assert creators and threading.current_thread().name not in creators
    assert pool.stats().chunks_created_on_demand == 0
    pool.expect(0)
    for c in got:
        pool.release(c)  # back to caching only up to the high watermark
    s = pool.stats()
    assert s.chunks_cached == 2 and s.resident_bytes == 2 * MiB
    pool.expect(100)  # capped by the budget
    assert settle(16) == 16 and pool.stats().resident_bytes == 16 * MiB == backend.resident_bytes()
    assert pool.stats().peak_resident_bytes == 16 * MiB
    pool.close()


@pytest.mark.parametrize("linger_s", [0.0, 0.2])
def test_settle_gives_back_what_was_made_for_growth_that_never_came(backend, linger_s):
    """Chunks made ready for an expected burst stay cached while requests run; once callers settle
    (every request gone), all but the standing reserve are released like other unused chunks."""
    pool = ChunkPool(backend, 16 * MiB, MiB, low_watermark=1, high_watermark=2, linger_s=linger_s)
    deadline = time.monotonic() + 10
    pool.expect(6)
    while pool.stats().chunks_cached < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.expect(0)  # a lower expectation alone keeps them ready (the next burst may still come)
    assert pool.stats().chunks_cached == 6
    ready = set(pool._cache)
    pool.settle()
    s = pool.stats()
    assert s.chunks_cached == 2 and s.chunks_lingering == (4 if linger_s else 0)
    assert s.chunks_released == (0 if linger_s else 4)
    got = pool.acquire(5)
    if linger_s:  # lingering chunks are still handed out while they linger
        assert set(got) <= ready
    pool.settle()
    # the reaper (with linger) and the refill thread settle; then the pool's count and the backend's agree
    while time.monotonic() < deadline:
        _refill_thread_looked(pool)
        s = pool.stats()
        if s.chunks_lingering == 0 and s.resident_bytes == backend.resident_bytes():
            break
        time.sleep(0.02)
    s = pool.stats()
    # in use 5; the refill thread restored the reserve of 2; nothing else resident
    assert s.chunks_in_use == 5 and s.chunks_lingering == 0 and s.resident_bytes <= 7 * MiB
    assert s.chunks_cached <= 2 and s.resident_bytes == backend.resident_bytes()
    pool.close()


def _refill_thread_looked(pool) -> None:
    """Wake the refill thread and wait until it has looked at the pool's state as it is now and gone
    idle: a check made after this sees what the thread decided, not a thread that never ran."""
    with pool._lock:
        seen = pool.refill_idle_waits
        pool._lock.notify_all()
        assert pool._lock.wait_for(lambda: pool.refill_idle_waits > seen, timeout=10), "the refill thread never ran"


def test_create_ahead_without_a_standing_reserve(backend):
    pool = ChunkPool(backend, 8 * MiB, MiB, create_ahead=True)
    _refill_thread_looked(pool)
    assert pool.stats().resident_bytes == 0  # nothing kept while nothing is expected
    pool.expect(3)
    deadline = time.monotonic() + 10
    while pool.stats().chunks_cached < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.stats().chunks_cached == 3
    pool.close()
    assert backend.resident_bytes() == 0


def _failing_off_the_main_thread(backend):
    """Creating chunks fails on any thread but the caller's (memory taken by others meanwhile)."""
    creators = []
    create = backend.create_chunk

    def create_here_only(size):
        name = threading.current_thread().name
        if name != "MainThread":
            raise MemoryError("no memory for the background thread")
        creators.append(name)
        return create(size)

    backend.create_chunk = create_here_only
    return creators


def test_failing_precreation_stops_and_chunks_are_made_on_demand(backend):
    pool = ChunkPool(backend, 32 * MiB, MiB, create_ahead=True)
    creators = _failing_off_the_main_thread(backend)
    pool.expect(3)  # the background thread fails, logs and stops; nothing crashes, nothing hangs
    pool._thread.join(timeout=10)
    assert not pool._thread.is_alive() and pool.stats().chunks_cached == 0
    got = pool.acquire(4)
    assert len(set(got)) == 4 and creators == ["MainThread"] * 4
    s = pool.stats()
    assert s.chunks_in_use == 4 and s.resident_bytes == 4 * MiB == backend.resident_bytes()
    pool.close()


def test_a_refill_woken_during_an_acquire_never_exceeds_the_budget(backend):
    pool = ChunkPool(backend, 8 * MiB, MiB, low_watermark=2, high_watermark=3)
    deadline = time.monotonic() + 10
    while pool.stats().chunks_cached < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    create = backend.create_chunk

    def create_and_expect_more(size):
        pool.expect(4)  # e.g. another thread expects growth while this acquire creates chunks
        time.sleep(0.005)
        return create(size)

    backend.create_chunk = create_and_expect_more
    got = pool.acquire(8)  # the 3 ready chunks + 5 made here: exactly the budget
    _refill_thread_looked(pool)  # a refill that ignored the 3 in hand would have created past the budget
    assert len(set(got)) == 8 and pool.stats().resident_bytes == 8 * MiB == backend.resident_bytes()
    with pytest.raises(VTensorOutOfMemory):
        pool.acquire(1)
    for c in got:
        pool.release(c)
    pool.close()
    assert backend.resident_bytes() == 0


def test_precreation_never_exceeds_the_budget(backend):
    pool = ChunkPool(backend, 4 * MiB, MiB, low_watermark=3, high_watermark=4)
    got = []
    for _ in range(4):
        got += pool.acquire(1)
    _refill_thread_looked(pool)
    assert pool.stats().resident_bytes == 4 * MiB == backend.resident_bytes()
    with pytest.raises(VTensorOutOfMemory):
        pool.acquire(1)
    for c in got:
        pool.release(c)
    pool.close()


@pytest.mark.parametrize(
    "budget, chunk, message",
    [
        (MiB // 2, MiB, "below one chunk"),
        (4 * MiB, 1000, "multiple of the (cpu|cuda:0) granularity"),
        (4 * MiB, 0, "positive multiple"),
    ],
)
def test_bad_configuration(backend, budget, chunk, message):
    with pytest.raises(ValueError, match=message):
        ChunkPool(backend, budget, chunk)


def test_bad_watermarks(backend):
    with pytest.raises(ValueError, match="watermarks"):
        ChunkPool(backend, 4 * MiB, MiB, low_watermark=3, high_watermark=1)
    with pytest.raises(ValueError, match="linger_s"):
        ChunkPool(backend, 4 * MiB, MiB, linger_s=-1)


def test_trim_gives_back_every_unused_chunk_and_counts_it(backend):
    pool = ChunkPool(backend, 8 * MiB, MiB, linger_s=60)
    got = pool.acquire(4)
    pool.release(got[0])
    pool.release(got[1])
    assert pool.stats().chunks_lingering == 2
    pool.trim()
    s = pool.stats()  # checks created - released == in use + cached + lingering
    assert s.chunks_lingering == s.chunks_cached == 0 and s.chunks_released == 2
    assert s.resident_bytes == 2 * MiB == backend.resident_bytes()
    for c in got[2:]:
        pool.release(c)
    pool.close()
    assert backend.resident_bytes() == 0



def test_take_ready_hands_out_only_chunks_already_made_and_within_the_budget(backend):
    pool = ChunkPool(backend, 3 * MiB, MiB, linger_s=30.0)
    assert pool.take_ready() is None  # nothing made yet: it never creates one
    a, b = pool.acquire(2)
    pool.release(a)  # lingering, ready to be taken
    c = pool.take_ready()
    assert c == a and pool.refcount(c) == 1 and pool.take_ready() is None
    s = pool.stats()
    assert s.chunks_created == 2 and s.chunks_created_on_demand == 2 and s.chunks_in_use == 2
    (d,) = pool.acquire(1)  # the last of the budget
    pool.release(b)
    pool.release(d)
    assert pool.take_ready() is not None and pool.take_ready() is not None  # two ready, one budget slot each
    assert pool.take_ready() is None and not pool.can_acquire(1)  # the budget is used up: nothing more
    pool.close()
