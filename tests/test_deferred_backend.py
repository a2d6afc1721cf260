"""The deferred host backend: a step's memory operations are queued in order, run by a helper thread,
and visible once waited for; bookkeeping answers (handles) come at once; failures reach the worker."""
from __future__ import annotations

import threading

import pytest
import torch

from vllm_vtensor.kv_space import KVSpace
from vllm_vtensor.vmm import VMMError
from vllm_vtensor.vmm.deferred import DeferredBackend, wait_all
from vllm_vtensor.vmm.host import HostBackend


@pytest.fixture(params=[False, True], ids=["fill", "stage"])
def backend(request):
    b = DeferredBackend(HostBackend(stage=request.param))
    yield b
    b.close()


def test_queued_operations_take_effect_in_order_once_waited_for(backend):
    g = 16 * backend.granularity
    vr = backend.reserve(2 * g)
    view = backend.as_tensor(vr.addr, vr.size)
    src = backend.create_chunk(g)  # outside deferring(): made at once
    backend.map(vr, 0, src, g)
    view[:g].fill_(7)
    gate = threading.Event()
    with backend.deferring():
        backend._collected.append((gate.wait, ()))  # hold the helper thread so nothing runs early
        dst = backend.create_chunk(g)  # a handle now, its memory in the queue...
        backend.copy_chunk(dst, src, g)  # ...before this copy, which the fill must not clobber
        backend.unmap(vr, 0, g)
        backend.map(vr, g, dst, g)
    assert int(view[:g].min()) == 7 and int(view[g:].count_nonzero()) == 0  # queued, not run yet
    gate.set()
    wait_all()
    assert int(view[:g].count_nonzero()) == 0  # unmapped: zeros again
    assert torch.equal(view[g:], torch.full((g,), 7, dtype=torch.uint8))  # the copy survived the fill
    backend.unmap(vr, 0, 2 * g)
    backend.release_chunk(src), backend.release_chunk(dst)
    assert backend.resident_bytes() == 0


def test_a_failed_operation_is_raised_by_the_next_wait(backend):
    g = backend.granularity
    vr = backend.reserve(g)
    with backend.deferring():
        h = backend.create_chunk(g)
        backend.map(vr, 1, h, g)  # not page-aligned: mmap refuses it
    with pytest.raises(VMMError):
        backend.wait()
    backend.wait()  # raised once; the backend keeps working
    backend.map(vr, 0, h, g)
    backend.as_tensor(vr.addr, g).fill_(1)
    backend.unmap(vr, 0, g)


def test_calls_outside_deferring_wait_for_the_queue_on_the_owner_thread_only(backend):
    g = 16 * backend.granularity
    vr = backend.reserve(g)
    gate, seen = threading.Event(), []
    with backend.deferring():
        h = backend.create_chunk(g)
        backend._collected.append((gate.wait, ()))
        backend.map(vr, 0, h, g)
    other = threading.Thread(target=lambda: seen.append(backend.create_chunk(g)))  # e.g. the pre-creation thread
    other.start()
    other.join(timeout=10)
    assert seen and not other.is_alive()  # not held up by the worker's queue
    threading.Timer(0.2, gate.set).start()
    backend.zero_chunk(h, g)  # the owner: waits for its map first, then zeroes
    assert backend._pending == 0
    view = backend.as_tensor(vr.addr, g)
    view.fill_(3)
    backend.unmap(vr, 0, g)
    backend.release_chunk(h), backend.release_chunk(seen[0])


def test_kv_space_over_a_deferred_backend_reads_its_own_kv_after_each_step(backend):
    """Requests grow, share a prefix and finish across steps whose memory work is deferred."""
    B, page = 16, 4096
    kv = KVSpace(backend, num_blocks=8, num_slots=3, blocks_per_slot=4, block_bytes=page, block_size=B,
                 keep_full_blocks=True)
    raw = kv.as_tensor()
    with backend.deferring():
        va = kv.add_request("a", [1, 2])
        kv.note_tokens("a", 2 * B)
    wait_all()
    for i, v in enumerate(va):
        raw[v * kv.chunk_bytes : (v + 1) * kv.chunk_bytes].fill_(i + 1)  # the step writes its KV
    with backend.deferring():
        kv.remove_request("a")
        vb = kv.add_request("b", [1, 3], num_cached_tokens=B)  # block 1 is a prefix hit
        kv.note_tokens("b", 2 * B)
    wait_all()
    assert int(raw[vb[0] * kv.chunk_bytes : (vb[0] + 1) * kv.chunk_bytes].min()) == 1  # mapped, not copied
    raw[vb[1] * kv.chunk_bytes : (vb[1] + 1) * kv.chunk_bytes].fill_(9)
    with backend.deferring():
        kv.remove_request("b")
    kv.close()
    assert backend.resident_bytes() == 0


def test_only_a_host_backend_can_be_deferred():
    class NoFill:
        pass

    with pytest.raises(TypeError, match="only the host backend"):
        DeferredBackend(NoFill())
