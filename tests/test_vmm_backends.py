"""VMM backends: reserved ranges read as zeros, mapped chunks are real shared memory,
physical memory follows the chunks, and bad input is refused with a clear error."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from vllm_vtensor.vmm import VMMError, make_backend
from vllm_vtensor.vmm.host import HostBackend

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    b = make_backend(request.param)
    yield b
    b.close()


def test_reserved_range_reads_as_zeros(backend):
    g = backend.granularity
    vr = backend.reserve(4 * g)
    view = backend.as_tensor(vr.addr, vr.size)
    assert view.data_ptr() == vr.addr
    assert int(view.count_nonzero()) == 0


def test_map_write_unmap_reads_zero_again(backend):
    g = backend.granularity
    vr = backend.reserve(4 * g)
    h = backend.create_chunk(g)
    backend.map(vr, g, h, g)
    view = backend.as_tensor(vr.addr, vr.size)
    view[g : 2 * g].fill_(5)
    assert int(view[g : 2 * g].sum()) == 5 * g
    assert int(view[:g].count_nonzero()) == 0 and int(view[2 * g :].count_nonzero()) == 0
    backend.synchronize()
    backend.unmap(vr, g, g)
    assert int(view.count_nonzero()) == 0
    backend.map(vr, 3 * g, h, g)  # the chunk kept its contents while unmapped
    assert int(view[3 * g :].sum()) == 5 * g
    backend.synchronize()
    backend.unmap(vr, 3 * g, g)
    backend.release_chunk(h)


def test_chunk_of_several_granules(backend):
    g = backend.granularity
    vr = backend.reserve(4 * g)
    h = backend.create_chunk(2 * g)
    backend.map(vr, g, h, 2 * g)  # replaces two granules of zeros
    view = backend.as_tensor(vr.addr, vr.size)
    view[g : 3 * g].fill_(7)
    assert int(view.count_nonzero()) == 2 * g
    backend.synchronize()
    backend.unmap(vr, g, 2 * g)
    assert int(view.count_nonzero()) == 0
    backend.release_chunk(h)
    assert backend.resident_bytes() == 0


@pytest.mark.parametrize("chunk_granules", [1, 2])
def test_chunks_mapped_side_by_side_in_one_call(backend, chunk_granules):
    """map_many (a request's consecutive blocks; on CUDA one unmap of the zero granules and one set-access for
    them all): each chunk at its place with its own contents; unmapped together, they read as zeros again."""
    g = backend.granularity
    size = chunk_granules * g
    vr = backend.reserve(6 * size)
    handles = [backend.create_chunk(size) for _ in range(3)]
    view = backend.as_tensor(vr.addr, vr.size)
    backend.map_many(vr, size, handles, size)
    for i in range(3):
        view[(i + 1) * size:(i + 2) * size].fill_(i + 1)
    assert int(view[:size].count_nonzero()) == 0 and int(view[4 * size:].count_nonzero()) == 0
    assert [int(view[(i + 1) * size:(i + 2) * size].sum()) for i in range(3)] == [(i + 1) * size for i in range(3)]
    backend.synchronize()
    backend.unmap(vr, size, 3 * size)
    assert int(view.count_nonzero()) == 0
    backend.map_many(vr, 3 * size, handles[::-1], size)  # the chunks kept their contents, now in reverse order
    assert [int(view[(3 + i) * size:(4 + i) * size].sum()) for i in range(3)] == [(3 - i) * size for i in range(3)]
    backend.synchronize()
    backend.unmap(vr, 3 * size, 3 * size)
    for h in handles:
        backend.release_chunk(h)
    assert backend.resident_bytes() == 0


def test_one_chunk_at_two_addresses_is_one_memory(backend):
    g = backend.granularity
    a, b = backend.reserve(2 * g), backend.reserve(2 * g)
    h = backend.create_chunk(g)
    backend.map(a, 0, h, g)
    backend.map(b, g, h, g)
    va, vb = backend.as_tensor(a.addr, a.size), backend.as_tensor(b.addr, b.size)
    va[:16] = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(vb[g : g + 16].cpu(), torch.arange(16, dtype=torch.uint8))
    vb[g + 100] = 42
    assert int(va[100]) == 42


def test_copy_chunk(backend):
    g = backend.granularity
    vr = backend.reserve(2 * g)
    src, dst = backend.create_chunk(g), backend.create_chunk(g)
    backend.map(vr, 0, src, g)
    backend.map(vr, g, dst, g)
    view = backend.as_tensor(vr.addr, vr.size)
    view[:g] = torch.randint(0, 255, (g,), dtype=torch.uint8, device=view.device)
    backend.synchronize()
    backend.copy_chunk(dst, src, g)
    assert torch.equal(view[:g], view[g:])


def test_bad_sizes_are_refused(backend):
    g = backend.granularity
    for size in (0, -g, g + 1):
        with pytest.raises(ValueError, match="multiple of"):
            backend.reserve(size)


def test_host_resident_memory_follows_chunks():
    b = HostBackend()
    g = 1 << 20
    assert b.resident_bytes() == 0
    chunks = [b.create_chunk(g) for _ in range(3)]
    assert b.resident_bytes() == 3 * g
    b.release_chunk(chunks[1])  # hole punched: memory really returned
    assert b.resident_bytes() == 2 * g
    again = b.create_chunk(g)  # slot reuse keeps the memfd compact
    assert again == chunks[1] and b.resident_bytes() == 3 * g
    for c in (chunks[0], again, chunks[2]):
        b.release_chunk(c)
    assert b.resident_bytes() == 0
    b.close()


def test_host_chunk_size_must_stay_fixed():
    b = HostBackend()
    b.create_chunk(1 << 20)
    with pytest.raises(ValueError, match="differs"):
        b.create_chunk(2 << 20)
    b.close()


def test_host_mappings_are_not_inherited_by_forked_children():
    """MADV_DONTFORK: a child touching the parent's chunk must not see (or share) it."""
    b = HostBackend()
    g = b.granularity
    vr = b.reserve(g)
    h = b.create_chunk(g)
    b.map(vr, 0, h, g)
    b.as_tensor(vr.addr, g)[0] = 7
    pid = os.fork()
    if pid == 0:  # child: the range is absent, so this read faults
        import ctypes
        import faulthandler

        faulthandler.disable()  # the fault is the expected outcome; keep pytest's output clean
        ctypes.string_at(vr.addr, 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="use 'cpu' or 'cuda"):
        make_backend("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_backend_without_gpu_names_the_fix():
    with pytest.raises(VMMError, match="needs"):
        make_backend("cuda")


def test_zero_chunk(backend):
    g = backend.granularity
    vr = backend.reserve(g)
    h = backend.create_chunk(g)
    backend.map(vr, 0, h, g)
    view = backend.as_tensor(vr.addr, g)
    view.fill_(3)
    backend.synchronize()
    backend.zero_chunk(h, g)
    assert int(view.count_nonzero()) == 0
    view[:4] = 1  # still mapped and writable afterwards
    assert int(view.sum()) == 4


def _memfd_mappings(b: HostBackend) -> int:
    """How many mappings of ``b``'s memory file the process has."""
    inode = str(os.fstat(b._fd).st_ino)
    with open("/proc/self/maps") as f:
        return sum(line.split()[4] == inode and "vllm-vtensor-kv" in line for line in f)


def test_host_maps_by_moving_each_chunks_populated_mapping_in_and_out():
    """A chunk's own populated mapping moves into a range (mremap) and back out on unmap; a second
    address gets a fresh mapping; contents and sharing are unchanged, and nothing is left behind."""
    b = HostBackend(stage=True)
    g = 16 * b.granularity
    vr = b.reserve(4 * g)
    view = b.as_tensor(vr.addr, vr.size)
    h1, h2 = b.create_chunk(g), b.create_chunk(g)
    assert b.moves == 0
    b.map(vr, 0, h1, g)
    assert b.moves == 1
    view[:g].fill_(3)
    b.map(vr, 2 * g, h1, g)  # the same chunk at a second address: mapped afresh, not moved
    assert b.moves == 1 and int(view[2 * g : 3 * g].sum()) == 3 * g
    b.unmap(vr, 0, g)  # moved back out, still holding the 3s
    assert b.moves == 2 and int(view[:g].count_nonzero()) == 0 and int(view[2 * g : 3 * g].sum()) == 3 * g
    b.map(vr, g, h1, g)
    assert b.moves == 3 and int(view[g : 2 * g].sum()) == 3 * g
    b.unmap(vr, 0, 4 * g)
    assert int(view.count_nonzero()) == 0
    b.map(vr, 3 * g, h2, g)
    assert int(view[3 * g :].count_nonzero()) == 0  # h2 was never written
    b.unmap(vr, 0, 4 * g)
    b.release_chunk(h1), b.release_chunk(h2)
    assert b.resident_bytes() == 0 and _memfd_mappings(b) == 0
    b.close()


def test_host_a_chunk_partly_overlaid_is_never_moved_from_its_old_place():
    b = HostBackend(stage=True)
    g = 16 * b.granularity
    vr = b.reserve(4 * g)
    view = b.as_tensor(vr.addr, vr.size)
    h1, h2 = b.create_chunk(g), b.create_chunk(g)
    b.map(vr, 0, h1, g)
    view[:g].fill_(1)
    b.map(vr, g, h2, g)
    view[g : 2 * g].fill_(2)
    b.unmap(vr, g, g)  # h2 back out
    b.map(vr, g // 2, h2, g)  # overlays the second half of h1's place
    b.unmap(vr, 0, 2 * g)  # h1's mapping is no longer whole there: it must not be moved out as h1's
    b.map(vr, 2 * g, h1, g)
    b.map(vr, 3 * g, h2, g)
    assert torch.equal(view[2 * g : 3 * g], torch.full((g,), 1, dtype=torch.uint8))
    assert torch.equal(view[3 * g :], torch.full((g,), 2, dtype=torch.uint8))
    b.unmap(vr, 0, 4 * g)
    b.release_chunk(h1), b.release_chunk(h2)
    assert _memfd_mappings(b) == 0
    b.close()


def test_host_unmapping_many_chunks_at_once_keeps_each_ones_contents():
    """Several chunks moved out of one range in one unmap (their new places must not fall into the
    holes the earlier moves leave in that range), then mapped back elsewhere in another order."""
    b = HostBackend(stage=True)
    g = 16 * b.granularity
    n = 8
    ranges = [b.reserve(n * g) for _ in range(3)]
    chunks = [b.create_chunk(g) for _ in range(n)]
    for rnd, (src, dst) in enumerate(zip(ranges, ranges[1:])):
        for i, h in enumerate(chunks):
            b.map(src, i * g, h, g)
            if rnd == 0:
                b.as_tensor(src.addr + i * g, g).fill_(i + 1)
        b.unmap(src, 0, n * g)
        assert int(b.as_tensor(src.addr, src.size).count_nonzero()) == 0
        chunks.reverse()
        for i, h in enumerate(chunks):
            b.map(dst, i * g, h, g)
        for i in range(n):
            assert torch.equal(b.as_tensor(dst.addr + i * g, g), torch.full((g,), n - i if rnd == 0 else i + 1,
                                                                              dtype=torch.uint8)), (rnd, i)
        b.unmap(dst, 0, n * g)
    assert b.moves >= 4 * n
    for h in chunks:
        b.release_chunk(h)
    assert _memfd_mappings(b) == 0
    b.close()


_RACE = r"""
import ctypes, threading
from vllm_vtensor.vmm.host import HostBackend, _load_libc
libc = _load_libc()
b = HostBackend(stage=True)
g = 16 * b.granularity
n = 8
vr = b.reserve(n * g)
chunks = [b.create_chunk(g) for _ in range(n)]
stop, bad = threading.Event(), []

def other_thread():  # any thread of the process may mmap at any time (malloc, torch, ZMQ...)
    held = []
    while not stop.is_set():
        addr = libc.mmap(None, g, 3, 0x02 | 0x20, -1, 0)
        ctypes.memset(addr + g - 1, 5, 1)
        held.append(addr)
        if len(held) == 256:  # held a while, so that new ones need new places
            for a in held:
                if ctypes.string_at(a + g - 1, 1) != b"\x05":
                    bad.append(a)
                libc.munmap(a, g)
            held.clear()

t = threading.Thread(target=other_thread)
t.start()
for _ in range(1500):
    for i, h in enumerate(chunks):
        b.map(vr, i * g, h, g)
    b.unmap(vr, 0, n * g)
stop.set()
t.join()
assert not bad and int(b.as_tensor(vr.addr, vr.size).count_nonzero()) == 0 and b.moves >= 1500 * n
print("OK")
"""


def test_host_unmapping_never_leaves_a_hole_another_threads_mmap_could_fall_into():
    """Chunks moving out of a range must not leave it unmapped even for an instant: another thread's
    mmap could be placed there and then be overlaid by the range's read-only reserve (it then
    crashes on its next write). Run in a child process, which such a crash would kill."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", (r.returncode, r.stderr[-2000:])


@pytest.mark.gpu
def test_cuda_zero_pieces_read_as_zeros_around_chunks(monkeypatch):
    """A CUDA range covered with zero pieces (as a range of more than 262144 granules is; thresholds lowered
    here): the whole range reads through one tensor view, zeros everywhere but the chunks mapped inside,
    across and at the edges of pieces, each holding what was written to it, before and after some are
    unmapped again."""
    from vllm_vtensor.vmm import cuda

    monkeypatch.setattr(cuda, "ZERO_PIECES_ABOVE", 16)
    monkeypatch.setattr(cuda, "COVER_MAPPINGS", 8)
    b = make_backend("cuda")
    try:
        g, n = b.granularity, 200  # pieces of up to 32 granules
        vr = b.reserve(n * g)
        assert vr.addr in b._covers
        view = b.as_tensor(vr.addr, vr.size)
        assert int(view.count_nonzero()) == 0
        placed: dict[int, int] = {}
        for at, count in ((100, 1), (101, 1), (40, 3), (63, 2), (0, 1), (199, 1), (150, 20)):
            b.map_many(vr, at * g, [b.create_chunk(g) for _ in range(count)], g)
            for i in range(at, at + count):
                placed[i] = i % 255 + 1
                view[i * g:(i + 1) * g].fill_(placed[i])

        def check():
            torch.cuda.synchronize()
            want = torch.zeros(n, dtype=torch.uint8, device=view.device)
            for i, v in placed.items():
                want[i] = v
            per = view.view(n, g)
            assert torch.equal(per.amin(1), want) and torch.equal(per.amax(1), want)

        check()
        for at in (100, 40, 41, 42, 0, 199):
            b.unmap(vr, at * g, g)
            del placed[at]
        b.unmap(vr, 150 * g, 20 * g)
        for i in range(150, 170):
            del placed[i]
        check()
    finally:
        b.close()


def test_vmm_benchmark_runs_and_times_reserving_ranges(tmp_path):
    """benchmarks/vmm.py end to end, small: its JSON holds the per-chunk latencies, the growth rows,
    the start-up cost of reserving each range size asked for, a burst of chunks created from 1, 2
    and 4 threads and each operation on chunks of each size asked for."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "vmm.json"
    script = Path(__file__).parents[1] / "benchmarks" / "vmm.py"
    subprocess.run([sys.executable, str(script), "--reps", "3", "--sizes-mib", "4", "--grow-chunks", "2",
                    "--reserve-gib", "0.25,1", "--create-chunks", "8", "--by-size", "1,3", "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    assert {"map", "unmap", "share"} <= set(result["latency"])
    assert [(r["threads"], r["chunks"]) for r in result["create_in_threads"]] == [(1, 8), (2, 8), (4, 8)]
    assert all(r["us_per_chunk"] > 0 for r in result["create_in_threads"])
    assert [r["current_mib"] for r in result["grow"]] == [4]
    assert [r["reserve_gib"] for r in result["reserve"]] == [0.25, 1.0]
    assert all(r["ms"] > 0 for r in result["reserve"])
    assert [(r["chunks"], r["mib"]) for r in result["by_size"]] == [(1, 2), (3, 6)]
    assert all(r[f"{op}_us"] > 0 for r in result["by_size"] for op in ("create", "map", "unmap", "release"))


def test_vmm_benchmark_times_bare_driver_calls_by_size_on_cuda(monkeypatch):
    """benchmarks/vmm.py's per-size timings on the CUDA backend (over the driver model: the calls and their
    order, not their time): bare cuMemMap/cuMemUnmap of 1 and 4 granules of one allocation beside the
    backend's own operations, and nothing left behind."""
    import sys
    from pathlib import Path

    from cuda_driver_model import DriverModel, assert_nothing_left, cuda_backend_on

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import vmm

    g = 2 << 20
    driver = DriverModel(g)
    monkeypatch.setattr(vmm, "_sync", lambda device: None)
    made = []

    def make():
        made.append(cuda_backend_on(monkeypatch, driver))
        return made[-1]

    rows = vmm.by_size(make, g, [1, 4], reps=2)
    assert [(r["chunks"], r["mib"]) for r in rows] == [(1, 2), (4, 8)]
    assert all(r["driver_map_us"] > 0 and r["driver_unmap_us"] > 0 for r in rows)
    assert len(made) == 2
    assert_nothing_left(driver)
