"""The CUDA VMM backend's calls, checked against a model of the driver's rules (tests/cuda_driver_model.py)
on a machine without a GPU: every byte of a live range stays readable (the zero granule where no chunk
is), calls that cover several mappings fall back to one call per mapping on a driver that refuses them,
zero granules fall back to read-write access where read-only is refused, copies and zeroing land on the
right allocation, nothing leaks, and a device out of memory is an error that names the fix. The same
backend runs against the real driver in the GPU tests (``-m gpu``)."""
from __future__ import annotations

import random
import time

import pytest

from cuda_driver_model import READ, READWRITE, DriverModel, backend_on
from vllm_vtensor.kv_space import KVSpace
from vllm_vtensor.vmm import VMMError

G = 2 << 20


@pytest.fixture
def driver_backend(monkeypatch, request):
    """``(driver model, CudaBackend over it)``; the model's options come from the test's parameters."""
    driver = DriverModel(G, **getattr(request, "param", {}))
    with backend_on(monkeypatch, driver) as backend:
        yield driver, backend


DRIVERS = [{}, {"one_mapping_per_call": True}, {"refuse_read_only": True},
           {"one_mapping_per_call": True, "refuse_read_only": True}]
IDS = ["shared-calls", "one-mapping-per-call", "no-read-only", "strict"]


@pytest.mark.parametrize("driver_backend", DRIVERS, ids=IDS, indirect=True)
def test_a_reserved_range_is_readable_everywhere_through_the_zero_granule(driver_backend):
    driver, backend = driver_backend
    vr = backend.reserve(8 * G)
    driver.check_readable(vr.addr, vr.size)
    zero = {m.handle for a, m in driver.mappings.items() if vr.addr <= a < vr.addr + vr.size}
    assert len(zero) == 1 and driver.contents[zero.pop()] == 0  # one chunk of zeros, every granule
    assert backend.zero_read_only is not driver.refuse_read_only
    assert {m.access for m in driver.mappings.values()} == {READWRITE if driver.refuse_read_only else READ}
    assert backend.resident_bytes() == 0


@pytest.mark.parametrize("driver_backend", DRIVERS, ids=IDS, indirect=True)
def test_runs_mapped_and_unmapped_in_one_call_or_one_per_mapping(driver_backend):
    driver, backend = driver_backend
    vr = backend.reserve(20 * G)
    chunk = 2 * G  # two granules per chunk: the zero granules under one chunk are unmapped together
    handles = [backend.create_chunk(chunk) for _ in range(6)]
    before = dict(driver.calls)
    backend.map_many(vr, 2 * G, handles[:4], chunk)  # a request's four consecutive blocks
    calls = {k: driver.calls[k] - before.get(k, 0) for k in driver.calls}
    driver.check_readable(vr.addr, vr.size)
    for i, h in enumerate(handles[:4]):
        m = driver.mappings[vr.addr + 2 * G + i * chunk]
        assert (m.handle, m.size, m.access) == (h, chunk, READWRITE)
    if driver.one_mapping_per_call:
        assert not backend.shared_calls  # found out on the first call over several mappings
    else:
        # one cuMemUnmap over the eight zero granules, one cuMemSetAccess over the four chunks
        assert calls["cuMemUnmap"] == 1 and calls["cuMemSetAccess"] == 1 and calls["cuMemMap"] == 4
    backend.map(vr, 12 * G, handles[4], chunk)
    backend.unmap(vr, 4 * G, 4 * G)  # the middle two chunks: a run unmapped together
    driver.check_readable(vr.addr, vr.size)
    assert driver.mapping_at(vr.addr + 4 * G).handle not in handles  # zeros again
    assert driver.mappings[vr.addr + 2 * G].handle == handles[0]
    assert driver.mappings[vr.addr + 8 * G].handle == handles[3]
    for off in (2 * G, 8 * G, 12 * G):
        backend.unmap(vr, off, chunk)
    assert {m.handle for m in driver.mappings.values()} == {backend._zero}
    for h in handles:
        backend.release_chunk(h)
    assert backend.resident_bytes() == 0
    backend.free_range(vr)


@pytest.mark.parametrize("driver_backend", DRIVERS, ids=IDS, indirect=True)
def test_closing_with_chunks_still_mapped_gives_everything_back(driver_backend):
    """An engine that stops with requests mapped: close() unmaps every chunk and zero granule, frees the
    ranges and releases every allocation, on drivers that refuse a call over several mappings too
    (the fixture checks that nothing is left)."""
    driver, backend = driver_backend
    vr = backend.reserve(16 * G)
    backend.map_many(vr, 0, [backend.create_chunk(2 * G) for _ in range(3)], 2 * G)
    backend.map(vr, 10 * G, backend.create_chunk(2 * G), 2 * G)
    backend.reserve(4 * G)  # another range, only zero granules


@pytest.mark.parametrize("driver_backend", DRIVERS[:2], ids=IDS[:2], indirect=True)
def test_copy_and_zero_land_on_the_right_allocation_through_scratch_mappings(driver_backend):
    driver, backend = driver_backend
    src, dst = backend.create_chunk(G), backend.create_chunk(G)
    driver.contents[src] = 7  # what a kernel wrote there
    syncs = driver.calls.get("cuCtxSynchronize", 0)
    backend.copy_chunk(dst, src, G)
    assert driver.contents[dst] == 7 and driver.contents[src] == 7
    backend.zero_chunk(src, G)
    assert driver.contents[src] == 0 and driver.contents[dst] == 7
    assert driver.calls["cuCtxSynchronize"] >= syncs + 2  # before each scratch range is unmapped
    assert not driver.mappings and len(driver.reserved) == 0  # the scratch ranges are gone
    backend.release_chunk(src)
    backend.release_chunk(dst)


@pytest.mark.parametrize("driver_backend", [{"memory_chunks": 3}], indirect=True)
def test_a_device_out_of_memory_names_the_fix(driver_backend):
    driver, backend = driver_backend  # the zero chunk takes one of the three
    a, b = backend.create_chunk(G), backend.create_chunk(G)
    with pytest.raises(VMMError, match="CUDA_ERROR_OUT_OF_MEMORY.*lower the vTensor budget"):
        backend.create_chunk(G)
    backend.release_chunk(a)
    backend.release_chunk(b)


def _zero_pieces_above(monkeypatch, granules: int, mappings: int) -> None:
    """Ranges of more than ``granules`` covered with zero pieces, about ``mappings`` of them (the real
    thresholds are hundreds of thousands of granules, too many for the driver model)."""
    from vllm_vtensor.vmm import cuda

    monkeypatch.setattr(cuda, "ZERO_PIECES_ABOVE", granules)
    monkeypatch.setattr(cuda, "COVER_MAPPINGS", mappings)


def _zero_mappings(driver, backend, vr) -> list:
    zero = set(backend._zero_pieces.values())
    return sorted((m.addr, m.size) for a, m in driver.mappings.items()
                  if vr.addr <= a < vr.addr + vr.size and m.handle in zero)


@pytest.mark.parametrize("driver_backend", DRIVERS, ids=IDS, indirect=True)
def test_a_large_range_is_covered_with_zero_pieces_that_chunks_split(driver_backend, monkeypatch):
    """A range too large to cover granule by granule at start-up is covered with a few zero pieces (whole
    allocations of 1, 2, 4, ... granules of zeros); a chunk mapped inside a piece, at its edge or across
    several, unmaps them and covers what it leaves again, smallest pieces next to the chunk; an unmapped
    chunk's place is covered again. Every granule stays readable through all of it, no zero mapping
    overlaps a chunk, and the zero pieces are not counted as KV memory."""
    driver, backend = driver_backend
    _zero_pieces_above(monkeypatch, 16, 8)
    n = 200  # granules: pieces of up to 32 (200 / 8 = 25, rounded up to a power of two)
    before = driver.calls.get("cuMemMap", 0)
    vr = backend.reserve(n * G)
    assert set(backend._zero_pieces) == {1, 2, 4, 8, 16, 32}  # each zeroed through one scratch mapping when made
    assert driver.calls["cuMemMap"] - before - 5 == len(_zero_mappings(driver, backend, vr)) <= n // 32 + 6
    driver.check_readable(vr.addr, vr.size)
    assert {driver.contents[h] for h in backend._zero_pieces.values()} == {0}
    assert backend.resident_bytes() == 0

    def check():
        driver.check_readable(vr.addr, vr.size)
        zero = _zero_mappings(driver, backend, vr)
        assert sum(size for _, size in zero) + sum(backend._mapped.values()) == n * G
        assert {m.access for m in driver.mappings.values() if m.handle in backend._zero_pieces.values()} == {
            READWRITE if driver.refuse_read_only else READ}

    chunks = {}
    for at, count in ((100, 1), (101, 1), (40, 3), (63, 2), (0, 1), (199, 1), (150, 20)):  # granules
        handles = [backend.create_chunk(G) for _ in range(count)]
        backend.map_many(vr, at * G, handles, G)
        chunks.update({at + i: h for i, h in enumerate(handles)})
        check()
        for g, h in chunks.items():
            m = driver.mappings[vr.addr + g * G]
            assert (m.handle, m.size, m.access) == (h, G, READWRITE)
    with pytest.raises(VMMError, match="already mapped"):
        backend.map(vr, 101 * G, backend.create_chunk(G), G)
    after_growth = len(_zero_mappings(driver, backend, vr))
    for g in (100, 101, 40, 41, 42, 63, 64, 0, 199):
        backend.unmap(vr, g * G, G)
        check()
    backend.unmap(vr, 150 * G, 20 * G)
    check()
    assert len(_zero_mappings(driver, backend, vr)) <= after_growth + 20
    assert not backend._mapped
    assert backend.resident_bytes() == (len(chunks) + 1) * G  # the chunks made (one refused a place), no zero piece


def _wait_for_ahead(kv, req: str, timeout: float = 2.0) -> None:
    """Steps that schedule ``req`` again until the helper has mapped its next chunk, if it wants one (the
    helper skips a request whose chunk is not made yet: the next step asks again)."""
    deadline = time.monotonic() + timeout
    while kv._reqs[req].ahead is None and kv._wants_ahead(kv._reqs[req]) and time.monotonic() < deadline:
        if not kv._ahead_wanted:
            kv.expect_growth({req: 1})
        time.sleep(0.001)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ahead", [False, True], ids=["map-in-step", "map-ahead"])
@pytest.mark.parametrize("pieces", [False, True], ids=["zero-granules", "zero-pieces"])
@pytest.mark.parametrize("defer", [False, True], ids=["unmap-in-step", "deferred-unmap"])
@pytest.mark.parametrize("driver_backend", DRIVERS, ids=IDS, indirect=True)
def test_a_kv_space_on_the_cuda_backend_keeps_every_range_readable_and_leaks_nothing(driver_backend, defer, pieces,
                                                                                     ahead, seed, monkeypatch):
    """Random requests arriving, growing, sharing prefixes and finishing on a KV space over the CUDA
    backend, finished ranges unmapped in the step or by the unmapping thread (VTENSOR_DEFERRED_UNMAP),
    growing requests' next chunks mapped in the step or ahead by the map-ahead thread (VTENSOR_MAP_AHEAD),
    the range covered with the zero granule or, as a large one is, with zero pieces: after every step
    each running request's blocks map its own chunks (or the shared prefix's), the rest of the range
    reads zeros, and at the end every chunk is gone."""
    driver, backend = driver_backend
    if pieces:
        _zero_pieces_above(monkeypatch, 8, 4)  # the 48 granules below: pieces of up to 16
    rng = random.Random(seed)
    block = 16
    kv = KVSpace(backend, num_blocks=40, num_slots=4, blocks_per_slot=12, block_bytes=G, block_size=block,
                 keep_full_blocks=True, defer_unmaps=defer, map_ahead=ahead, precreate_bytes=4 * G if ahead else 0)
    running: dict[str, list[int]] = {}
    free = list(range(1, 40))
    prefix: list[int] = []  # full blocks a finished request left in the prefix cache
    for step in range(120):
        if running and rng.random() < 0.3:
            req = rng.choice(sorted(running))
            kv.remove_request(req)
            blocks = running.pop(req)
            if len(blocks) >= 3:  # its first two blocks become the cached prefix; vLLM may evict the old one
                in_use = {b for bs in running.values() for b in bs}
                free.extend(b for b in prefix if b not in in_use and b not in blocks[:2])
                prefix = blocks[:2]
            free.extend(b for b in blocks if b not in prefix)
        elif len(running) < 4 and len(free) >= 3 and rng.random() < 0.5:
            hits = prefix if prefix and rng.random() < 0.5 and all(b not in free for b in prefix) else []
            own = [free.pop(rng.randrange(len(free))) for _ in range(rng.randint(1, 3))]
            req = f"r{step}"
            virtual = kv.add_request(req, hits + own, len(hits) * block)
            running[req] = hits + own
            kv.note_tokens(req, len(running[req]) * block - rng.randrange(block))
            assert len(virtual) == len(running[req])
        elif running:
            req = rng.choice(sorted(running))
            if len(running[req]) < 11 and free:
                new = [free.pop(0)]
                kv.append_blocks(req, new)
                running[req] += new
                kv.note_tokens(req, len(running[req]) * block - rng.randrange(block))
                kv.expect_growth({req: 1})  # decoding: its next chunk is mapped ahead, when that is on
                if ahead and rng.random() < 0.5:  # forward passes, beside which the helper maps it
                    _wait_for_ahead(kv, req)
        # between the backend's operations (its map lock held: the unmapping thread swaps a retired range's
        # chunks for zeros under it, which leaves the range unmapped for a moment; no kernel reads a retired
        # range, and the device has finished those that did before it is unmapped)
        with backend._map_lock:
            driver.check_readable(kv.range.addr, kv.range.size)
        for req, blocks in running.items():
            base = kv.range.addr + kv.slot_of(req) * kv.blocks_per_slot * kv.chunk_bytes
            for j, b in enumerate(blocks):
                m = driver.mapping_at(base + j * kv.chunk_bytes)
                assert m.handle == kv._phys[b] and m.access == READWRITE, (step, req, j)
    for req in list(running):
        kv.remove_request(req)
    kv.drain()
    kv.reset_cache()
    assert len(backend._covers) == int(pieces)
    kv.close()
    zero = set(backend._zero_pieces.values())
    assert {m.handle for m in driver.mappings.values()} <= zero
    assert set(driver.allocations) == zero and len(zero) == (5 if pieces else 1)
    assert ("vtensor-unmap" in driver.unmapping_threads) is defer
    assert (kv.stats().mapped_ahead > 0) is ahead
