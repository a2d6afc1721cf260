"""VTensor: the view's address never moves; contents follow a plain model through any
sequence of grow/shrink/share/write/free; no view ever reads unmapped memory; sharing
maps the same memory (never copies) until a copy-on-write; memory returns to zero."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vllm_vtensor.pool import ChunkPool, VTensorOutOfMemory
from vllm_vtensor.vmm import make_backend
from vllm_vtensor.vtensor import VTensor, VTensorFreedError

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def pool(request):
    backend = make_backend(request.param)
    g = backend.granularity
    p = ChunkPool(backend, 8 * g, g)
    yield p
    p.close()
    backend.close()


def test_grow_keeps_address_and_contents(pool):
    g = pool.chunk_bytes
    vt = VTensor(pool, 6 * g)
    ptr = vt.view().data_ptr()
    assert vt.grow(g) == 1
    x = vt.view(torch.float32)
    x[: g // 4] = 3.0
    assert vt.grow(5 * g) == 4 and vt.num_chunks == 5
    assert vt.view(torch.float32).data_ptr() == ptr == vt.data_ptr
    assert float(x[: g // 4].sum()) == 3.0 * (g // 4)
    assert int(vt.view()[5 * g :].count_nonzero()) == 0  # past the mapped prefix: zeros
    vt.free()


def test_shared_prefix_is_mapped_not_copied(pool):
    g = pool.chunk_bytes
    a, b = VTensor(pool, 4 * g), VTensor(pool, 4 * g)
    a.grow(2 * g)
    a.view()[: 2 * g] = 9
    resident = pool.stats().resident_bytes
    assert b.share_prefix(a, g + 10) == 2  # a partial second chunk shares that chunk too
    s = pool.stats()
    assert s.resident_bytes == resident and s.shared_bytes == 2 * g and s.mapped_bytes == 4 * g
    assert b.chunk_ids == a.chunk_ids
    a.view()[5] = 1  # same physical memory: visible through b without any copy
    assert int(b.view()[5]) == 1
    # copy-on-write of the shared partial chunk before b writes its own tokens there
    assert b.prepare_write(g + 10, g + 20) == 1
    b.view()[g + 10 : g + 20] = 4
    assert int(a.view()[g + 10]) == 9 and int(b.view()[g + 10]) == 4 and int(b.view()[g]) == 9
    assert pool.stats().shared_bytes == g and pool.stats().resident_bytes == 3 * g
    assert b.prepare_write(g, g + 1) == 0  # already private
    a.free()
    assert int(b.view()[5]) == 1  # the shared chunk lives on in b
    b.free()
    assert pool.stats().resident_bytes == 0 and pool.stats().mapped_bytes == 0


def test_out_of_memory_maps_nothing_and_is_recoverable(pool):
    g = pool.chunk_bytes
    a, b = VTensor(pool, 8 * g), VTensor(pool, 8 * g)
    a.grow(6 * g)
    with pytest.raises(VTensorOutOfMemory):
        b.grow(3 * g)
    assert b.num_chunks == 0
    a.shrink(4 * g)  # e.g. the scheduler preempted part of a request
    assert b.grow(3 * g) == 3
    a.free()
    b.free()


def test_bad_input(pool):
    g = pool.chunk_bytes
    with pytest.raises(ValueError, match="positive"):
        VTensor(pool, 0)
    vt = VTensor(pool, 2 * g)
    with pytest.raises(ValueError, match="exceed this VTensor's reserved capacity"):
        vt.grow(3 * g)
    with pytest.raises(ValueError, match="not be negative"):
        vt.shrink(-1)
    with pytest.raises(ValueError, match="not inside the mapped"):
        vt.prepare_write(0, 10)
    with pytest.raises(ValueError, match="needs 10000000 elements"):
        vt.view(torch.uint8, (10_000_000,))
    other = ChunkPool(pool.backend, 2 * g, g)
    foreign = VTensor(other, 2 * g)
    foreign.grow(g)
    with pytest.raises(ValueError, match="same ChunkPool"):
        vt.share_prefix(foreign, g)
    foreign.free()
    vt.free()
    vt.free()  # idempotent
    with pytest.raises(VTensorFreedError):
        vt.grow(g)
    with pytest.raises(VTensorFreedError):
        vt.view()


def test_freed_range_is_reused_and_stale_views_read_zeros(pool):
    g = pool.chunk_bytes
    vt = VTensor(pool, 2 * g)
    vt.grow(2 * g)
    stale = vt.view()
    stale.fill_(1)
    vt.free()
    assert int(stale.count_nonzero()) == 0  # reads zeros, never faults


# ---- property-based: random operation sequences against a plain model (host and CUDA backends) ----
CAP = 6  # chunks per VTensor


class VTensorMachine(RuleBasedStateMachine):
    """Model: per VTensor, a byte array of contents and a mask of bytes with known values."""

    DEVICE = "cpu"

    def __init__(self):
        super().__init__()
        self.backend = make_backend(self.DEVICE)
        self.g = self.backend.granularity
        self.pool = ChunkPool(self.backend, 10 * self.g, self.g)
        self.vts = [VTensor(self.pool, CAP * self.g) for _ in range(3)]
        self.ptrs = [v.data_ptr for v in self.vts]
        self.data = [np.zeros(CAP * self.g, np.uint8) for _ in self.vts]
        self.known = [np.zeros(CAP * self.g, bool) for _ in self.vts]
        self.mapped = [0, 0, 0]  # chunks

    idx = st.integers(0, 2)

    @rule(i=idx, chunks=st.integers(0, CAP))
    def grow(self, i, chunks):
        try:
            self.vts[i].grow(chunks * self.g)
        except VTensorOutOfMemory:
            assert self.pool.stats().chunks_in_use + (chunks - self.mapped[i]) > 10
            return
        self.mapped[i] = max(self.mapped[i], chunks)  # new bytes: unknown contents

    @rule(i=idx, nbytes=st.integers(0, CAP * 4096))
    def shrink(self, i, nbytes):
        nbytes = min(nbytes, CAP * self.g)
        self.vts[i].shrink(nbytes)
        keep = -(-nbytes // self.g)
        if keep < self.mapped[i]:
            self.known[i][keep * self.g :] = False
            self.mapped[i] = keep

    @rule(dst=idx, src=idx, nbytes=st.integers(1, CAP * 4096))
    def share(self, dst, src, nbytes):
        nbytes = min(nbytes, self.mapped[src] * self.g)
        if dst == src or nbytes == 0:
            return
        n = self.vts[dst].share_prefix(self.vts[src], nbytes)
        end = n * self.g
        self.data[dst][:end] = self.data[src][:end]
        self.known[dst][:end] = self.known[src][:end]
        self.mapped[dst] = max(self.mapped[dst], n)

    @rule(i=idx, start=st.integers(0, CAP * 4096), length=st.integers(1, 3 * 4096), value=st.integers(1, 255))
    def write(self, i, start, length, value):
        size = self.mapped[i] * self.g
        if size == 0:
            return
        start %= size  # land inside the mapped part, where writes are allowed
        end = min(start + length, size)
        try:
            self.vts[i].prepare_write(start, end)
        except VTensorOutOfMemory:
            return
        self.vts[i].view()[start:end] = value
        self.data[i][start:end] = value
        self.known[i][start:end] = True

    @rule(i=idx)
    def free_and_renew(self, i):
        self.vts[i].free()
        self.vts[i] = VTensor(self.pool, CAP * self.g)
        self.ptrs[i] = self.vts[i].data_ptr
        self.data[i][:] = 0
        self.known[i][:] = False
        self.mapped[i] = 0

    @invariant()
    def contents_match_the_model(self):
        for i, vt in enumerate(self.vts):
            view = vt.view().cpu().numpy()  # the whole reservation: unmapped parts must read as zeros
            assert vt.view().data_ptr() == self.ptrs[i]
            assert vt.num_chunks == self.mapped[i]
            k = self.known[i]
            assert np.array_equal(view[k], self.data[i][k])
            assert not view[self.mapped[i] * self.g :].any()

    @invariant()
    def accounting_is_consistent(self):
        s = self.pool.stats()
        assert s.mapped_bytes == sum(v.mapped_bytes for v in self.vts)
        assert s.resident_bytes == self.backend.resident_bytes() <= s.budget_bytes
        distinct = len({c for v in self.vts for c in v.chunk_ids})
        assert s.chunks_in_use == distinct

    def teardown(self):
        for vt in self.vts:
            vt.free()
        assert self.pool.stats().resident_bytes == 0 and self.backend.resident_bytes() == 0
        self.pool.close()
        self.backend.close()


VTensorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestVTensorProperties = VTensorMachine.TestCase


class CudaVTensorMachine(VTensorMachine):
    """The same sequences on the CUDA VMM backend (2 MiB granules: fewer, shorter runs)."""

    DEVICE = "cuda"


CudaVTensorMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=25, deadline=None)
TestVTensorPropertiesCuda = pytest.mark.gpu(CudaVTensorMachine.TestCase)
