"""KVSpace: a request's blocks land consecutively in its own slot; a prefix-cache hit maps the
same physical chunk (no copy); finished requests give memory back unless the prefix cache
may reuse a full block; limits fail with errors that name the fix."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest

from vllm_vtensor.kv_space import KVSpace, KVSpaceError
from vllm_vtensor.vmm.deferred import DeferredBackend, wait_all
from vllm_vtensor.vmm.host import HostBackend

PAGE = 4096  # one block of all layers (tiny, for speed)
B = 16  # tokens per block


@pytest.fixture(params=["fill", "stage", "deferred"])
def backend(request):
    """The ways the host backend maps: filling page tables, moving them (staged), and filling them in a
    helper thread (deferred: the random test below queues each step's work, as the worker does)."""
    b = HostBackend(stage=request.param == "stage")
    if request.param == "deferred":
        b = DeferredBackend(b)
    yield b
    b.close()


def make(backend, keep=True, blocks=8, slots=3, per_slot=4, linger=0.0, defer=False):
    return KVSpace(backend, num_blocks=blocks, num_slots=slots, blocks_per_slot=per_slot, block_bytes=PAGE,
                   block_size=B, keep_full_blocks=keep, linger_s=linger, defer_unmaps=defer)


class _LaggingDevice(HostBackend):
    """A host backend whose synchronize() waits like a device still running earlier work: for a
    random few milliseconds, or until the test opens ``gate``."""

    def __init__(self, rng=None):
        super().__init__()
        self.rng = rng
        self.gate = threading.Event()
        self.gate.set()
        self.syncs = 0

    def synchronize(self):
        self.gate.wait()
        if self.rng is not None:
            time.sleep(self.rng.random() * 0.003)
        self.syncs += 1


def block_bytes(kv, virtual_block):
    return kv.as_tensor()[virtual_block * kv.chunk_bytes : (virtual_block + 1) * kv.chunk_bytes]


def test_blocks_are_consecutive_in_the_requests_slot(backend):
    kv = make(backend)
    v = kv.add_request("a", [5, 2])
    slot = kv.slot_of("a")
    assert v == [slot * 4, slot * 4 + 1]
    assert kv.append_blocks("a", [7]) == [slot * 4 + 2]
    addr, size = kv.request_range("a")
    assert size == 3 * kv.chunk_bytes and addr == kv.range.addr + slot * 4 * kv.chunk_bytes
    block_bytes(kv, v[1]).fill_(9)  # write through the virtual view
    assert kv.stats().mapped_bytes == 3 * kv.chunk_bytes == kv.stats().resident_bytes


def test_prefix_hit_maps_the_same_chunk(backend):
    kv = make(backend)
    va = kv.add_request("a", [1, 2])
    block_bytes(kv, va[0]).fill_(7)
    vb = kv.add_request("b", [1, 3], num_cached_tokens=B)  # block 1 is a cache hit
    assert kv.slot_of("b") != kv.slot_of("a")
    assert int(block_bytes(kv, vb[0]).min()) == 7  # same memory, nothing copied
    block_bytes(kv, va[0])[0] = 1
    assert int(block_bytes(kv, vb[0])[0]) == 1
    s = kv.stats()
    assert s.shared_bytes == kv.chunk_bytes and s.prefix_hit_bytes == kv.chunk_bytes and s.copied_bytes == 0
    assert s.resident_bytes == 3 * kv.chunk_bytes and s.mapped_bytes == 4 * kv.chunk_bytes


def test_finished_requests_keep_only_full_blocks_for_the_cache(backend):
    kv = make(backend, keep=True)
    v = kv.add_request("a", [1, 2])
    kv.note_tokens("a", B + 3)  # block 1 full, block 2 partial
    block_bytes(kv, v[0]).fill_(5)
    kv.remove_request("a")
    s = kv.stats()
    assert s.mapped_bytes == 0 and s.resident_bytes == s.cached_bytes == kv.chunk_bytes
    vb = kv.add_request("b", [1], num_cached_tokens=B)  # a later hit finds the content
    assert int(block_bytes(kv, vb[0]).min()) == 5
    kv.remove_request("b")
    kv.reset_cache()
    assert kv.stats().resident_bytes == 0 and backend.resident_bytes() == 0


def test_rejected_draft_tokens_do_not_count_as_filling_a_block(backend):
    """Speculative decoding writes KV for draft tokens; rejected ones are taken back by the next
    step's count, so a block they alone filled is not kept as a full block for the prefix cache."""
    kv = make(backend, keep=True)
    kv.add_request("a", [1, 2])
    kv.note_tokens("a", B + 2)  # B - 2 computed, 1 token + 3 drafts scheduled: into block 2
    kv.note_tokens("a", B - 1)  # all drafts rejected: B - 2 computed, 1 token scheduled
    assert kv.stats().live_tokens == B - 1
    kv.remove_request("a")
    s = kv.stats()
    assert s.cached_bytes == s.resident_bytes == 0 == backend.resident_bytes() and s.parked_bytes == 0
    kv.close()


def test_hit_on_a_block_another_request_fills_in_the_same_step(backend):
    """vLLM caches a block as soon as the tokens that fill it are scheduled, so a request scheduled
    later in the same step may hit it before its filler's new blocks are applied: mapped, same chunk."""
    kv = make(backend, keep=True)
    va = kv.add_request("a", [1])
    kv.note_tokens("a", B)
    with pytest.raises(KVSpaceError, match="whose content was not kept"):  # not handed out this step
        kv.add_request("b", [1, 2, 3], num_cached_tokens=2 * B)
    vb = kv.add_request("b", [1, 2, 3], num_cached_tokens=2 * B, written_this_step={2})
    (va2,) = kv.append_blocks("a", [2])  # "a" fills block 2 in this step
    block_bytes(kv, va2).fill_(4)  # the forward pass writes a's new KV...
    assert int(block_bytes(kv, vb[1]).min()) == 4  # ...which b reads through its own range
    s = kv.stats()
    assert s.shared_bytes == 2 * kv.chunk_bytes and s.copied_bytes == 0 and s.prefix_hit_bytes == 2 * kv.chunk_bytes
    assert va == [kv.virtual_block(kv.slot_of("a"), 0)]
    kv.close()


def test_without_prefix_caching_everything_is_given_back(backend):
    kv = make(backend, keep=False)
    kv.add_request("a", [1, 2, 3])
    kv.note_tokens("a", 3 * B)
    kv.remove_request("a", preempted=True)
    s = kv.stats()
    assert s.resident_bytes == 0 == backend.resident_bytes() and s.preemptions == 1
    assert s.maps == s.unmaps == 3


def test_shared_block_outlives_the_first_owner(backend):
    kv = make(backend, keep=False)
    va = kv.add_request("a", [4])
    block_bytes(kv, va[0]).fill_(3)
    vb = kv.add_request("b", [4], num_cached_tokens=0)  # same physical block (e.g. a hit vLLM resolved)
    kv.remove_request("a")
    assert int(block_bytes(kv, vb[0]).min()) == 3
    kv.remove_request("b")
    assert kv.stats().resident_bytes == 0


def test_copy_and_zero_blocks(backend):
    kv = make(backend)
    v = kv.add_request("a", [1, 2])
    block_bytes(kv, v[0]).fill_(8)
    kv.copy_blocks([(1, 2)])
    assert int(block_bytes(kv, v[1]).min()) == 8 and kv.stats().copied_bytes == kv.chunk_bytes
    kv.zero_blocks([2])
    assert int(block_bytes(kv, v[1]).count_nonzero()) == 0
    with pytest.raises(KVSpaceError, match="holds no content"):
        kv.copy_blocks([(6, 1)])


def test_resumed_request_is_remapped_from_scratch(backend):
    kv = make(backend)
    kv.add_request("a", [1, 2])
    v = kv.add_request("a", [3])  # resumed after preemption with new blocks
    assert v == [kv.slot_of("a") * 4] and kv.stats().mapped_bytes == kv.chunk_bytes
    assert kv.stats().preemptions == 1


def test_limits_name_the_fix(backend):
    kv = make(backend, slots=1, per_slot=2)
    kv.add_request("a", [1, 2])
    with pytest.raises(KVSpaceError, match="raise max_model_len"):
        kv.append_blocks("a", [3])
    with pytest.raises(KVSpaceError, match="raise max_num_seqs"):
        kv.add_request("b", [4])
    kv.remove_request("a")
    with pytest.raises(KVSpaceError, match="content was not kept"):
        kv.add_request("c", [5], num_cached_tokens=B)


def test_chunk_is_padded_to_the_granularity(backend):
    kv = KVSpace(backend, num_blocks=2, num_slots=1, blocks_per_slot=2, block_bytes=PAGE + 100, block_size=B,
                 keep_full_blocks=False)
    assert kv.chunk_bytes == 2 * PAGE


def test_freed_blocks_linger_for_reuse_then_memory_goes_back(backend):
    """A block freed by a finished request and wanted again within linger_s reuses its chunk (no new
    memory created); otherwise the reaper gives it back and the figures are republished."""
    import time

    published = []
    kv = KVSpace(backend, num_blocks=8, num_slots=3, blocks_per_slot=4, block_bytes=PAGE, block_size=B,
                 keep_full_blocks=False, linger_s=0.3, on_release=lambda k: published.append(k.stats()))
    kv.add_request("a", [1, 2])
    kv.remove_request("a")
    s = kv.stats()
    assert s.mapped_bytes == 0 and s.lingering_bytes == s.resident_bytes == 2 * kv.chunk_bytes
    kv.add_request("b", [3, 4, 5])  # two chunks come back from the lingering set, one is new
    assert kv.stats().chunks_created == 3 and kv.stats().lingering_bytes == 0
    kv.remove_request("b")
    deadline = time.monotonic() + 10
    while backend.resident_bytes() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.resident_bytes() == 0 and kv.stats().resident_bytes == 0
    assert published and published[-1].resident_bytes == 0 == published[-1].lingering_bytes
    kv.close()


# ---- parked slots: a finished request's full blocks stay mapped for the next request with that prefix ----
def test_next_turn_reuses_the_parked_slot_and_maps_only_new_blocks(backend):
    kv = make(backend)
    va = kv.add_request("turn1", [1, 2])
    kv.note_tokens("turn1", 2 * B)  # both blocks full: the prefix cache keeps them
    block_bytes(kv, va[1]).fill_(6)
    kv.remove_request("turn1")
    s = kv.stats()
    assert s.mapped_bytes == 0 and s.parked_bytes == 2 * kv.chunk_bytes and s.maps - s.unmaps == 2
    assert s.resident_bytes == s.cached_bytes == 2 * kv.chunk_bytes  # parking holds no memory of its own
    vb = kv.add_request("turn2", [1, 2, 3], num_cached_tokens=2 * B)
    assert vb == va + [va[1] + 1]  # the same slot: the hits are already in place
    assert int(block_bytes(kv, vb[1]).min()) == 6
    s = kv.stats()
    assert s.maps == 3 and s.slot_reuse_bytes == 2 * kv.chunk_bytes == s.prefix_hit_bytes
    assert s.parked_bytes == 0 and s.mapped_bytes == 3 * kv.chunk_bytes


def test_partial_match_keeps_only_the_common_prefix(backend):
    kv = make(backend)
    kv.add_request("a", [1, 2, 3])
    kv.note_tokens("a", 3 * B)
    kv.remove_request("a")
    v = kv.add_request("b", [1, 4], num_cached_tokens=B)  # shares block 1 only
    assert v[0] == kv.slot_of("b") * 4 and kv.stats().slot_reuse_bytes == kv.chunk_bytes
    s = kv.stats()
    assert s.parked_bytes == 0 and s.mapped_bytes == 2 * kv.chunk_bytes
    assert s.resident_bytes == 4 * kv.chunk_bytes  # blocks 2 and 3 stay cached for vLLM's prefix cache
    kv.remove_request("b")
    kv.reset_cache()
    assert kv.stats().resident_bytes == 0 == backend.resident_bytes() and kv.stats().parked_bytes == 0


def test_parked_slots_give_way_when_no_slot_is_free(backend):
    kv = make(backend, slots=2)
    for name, block in (("a", 1), ("b", 2)):
        kv.add_request(name, [block])
        kv.note_tokens(name, B)
        kv.remove_request(name)
    assert kv.stats().parked_bytes == 2 * kv.chunk_bytes
    kv.add_request("c", [3])  # no hit: takes the least recently parked slot ("a"'s)
    kv.add_request("d", [2], num_cached_tokens=B)  # "b"'s slot, found by its block
    s = kv.stats()
    assert s.parked_bytes == 0 and s.slot_reuse_bytes == kv.chunk_bytes and s.running_requests == 2
    with pytest.raises(KVSpaceError, match="raise max_num_seqs"):
        kv.add_request("e", [4])


def test_preempted_requests_are_not_parked(backend):
    kv = make(backend)
    kv.add_request("a", [1])
    kv.note_tokens("a", B)
    kv.remove_request("a", preempted=True)
    assert kv.stats().parked_bytes == 0 and kv.stats().maps == kv.stats().unmaps


def test_block_reused_while_parked_is_given_back_when_its_new_owner_goes(backend):
    """vLLM may evict a cached block and hand it out as a partial block; once its new owner finishes, its
    memory goes back at once (as vLLM counts it), the parked slot that still mapped it keeping only the
    blocks before it."""
    kv = make(backend, slots=3)
    virtual = kv.add_request("a", [1, 2, 3])
    kv.note_tokens("a", 3 * B)
    wait_all()
    for marker, v in enumerate(virtual, start=1):
        block_bytes(kv, v).fill_(marker)
    kv.remove_request("a")  # parked, maps blocks 1, 2, 3
    kv.add_request("q", [5, 2])  # block 2 handed out again, as q's partial second block
    kv.note_tokens("q", B + 2)
    kv.remove_request("q")  # block 2 unwanted now: the parked slot lets go of it (and of block 3's mapping)
    s = kv.stats()
    assert s.resident_bytes == 3 * kv.chunk_bytes  # blocks 1 and 3 (cached by vLLM), 5 (q's full block)
    assert s.parked_bytes == 2 * kv.chunk_bytes  # a's block 1 and q's block 5
    (v,) = kv.add_request("n", [3], num_cached_tokens=B)  # block 3 kept its content
    wait_all()
    assert int(block_bytes(kv, v).min()) == 3 == int(block_bytes(kv, v).max())


def test_blocks_the_scheduler_drops_give_their_memory_back(backend):
    """The scheduler evicted blocks from its prefix cache (another engine on the shared pool wants memory):
    their memory goes back at once, a parked slot keeping the blocks before them; a block a request still
    maps goes when the request does, and is not parked."""
    kv = make(backend, slots=3)
    kv.add_request("a", [1, 2, 3])
    kv.note_tokens("a", 3 * B)
    kv.remove_request("a")  # parked; vLLM caches blocks 1, 2, 3
    kv.add_request("q", [5, 6])
    kv.note_tokens("q", 2 * B)  # running, both blocks full
    kv.drop_blocks([2, 6])
    s = kv.stats()
    assert s.resident_bytes == 4 * kv.chunk_bytes  # blocks 1, 3 (cached), 5, 6 (q maps them)
    assert s.parked_bytes == kv.chunk_bytes  # a keeps block 1
    kv.remove_request("q")  # full blocks stay for the cache, but not 6: it was dropped
    s = kv.stats()
    assert s.resident_bytes == 3 * kv.chunk_bytes and s.parked_bytes == 2 * kv.chunk_bytes  # 1, 3, 5; a: 1, q: 5


def _reserve_settles_at(kv, n):
    """The reserve of ready chunks, once it reaches ``n`` (or after 10 s)."""
    deadline = time.monotonic() + 10
    while kv.stats().reserve_bytes != n * kv.chunk_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    return kv.stats().reserve_bytes // kv.chunk_bytes


def test_growth_expected_from_this_step_is_made_ready_beside_the_compute(backend):
    kv = KVSpace(backend, num_blocks=16, num_slots=2, blocks_per_slot=8, block_bytes=PAGE, block_size=B,
                 keep_full_blocks=True, precreate_bytes=2 * PAGE)
    assert _reserve_settles_at(kv, 2) == 2  # the base reserve
    kv.add_request("a", [1])
    kv.note_tokens("a", B - 1 + 3 * B)  # this step scheduled 3 blocks' worth of tokens...
    kv.expect_growth({"a": 3 * B})  # ...so the next one like it needs ceil((4B - 1 + 3B) / B) - 1 = 6 more
    assert _reserve_settles_at(kv, 6) == 6
    kv.expect_growth({})  # a step with nothing scheduled keeps them ready for the next burst
    assert kv.stats().reserve_bytes == 6 * kv.chunk_bytes
    kv.remove_request("a")  # the last request went: what was made for its growth goes back too
    wait_all()
    s = kv.stats()
    assert s.reserve_bytes == 2 * kv.chunk_bytes and s.resident_bytes == s.reserve_bytes + s.cached_bytes
    kv.close()


def test_a_decoding_request_has_its_next_chunk_made_half_a_block_ahead(backend):
    """Requests that started together cross their block boundaries in the same step: each decoding request's
    next chunk is made once it is within half a block of needing it, not in the step before (where the
    pre-creation thread would have one forward pass to make them all, and the step would make the rest)."""
    kv = KVSpace(backend, num_blocks=16, num_slots=4, blocks_per_slot=8, block_bytes=PAGE, block_size=B,
                 keep_full_blocks=True, precreate_bytes=PAGE)
    assert _reserve_settles_at(kv, 1) == 1  # the base reserve
    for i, r in enumerate(("near1", "near2", "near3", "far")):
        kv.add_request(r, [i + 1])
    # tokens after this step: three requests just past half their first block, one at its start
    kv.note_tokens_of({"near1": B // 2 + 1, "near2": B // 2 + 1, "near3": B // 2 + 1, "far": 1})
    kv.expect_growth({"near1": 1, "near2": 1, "near3": 1, "far": 1})  # decoding: one token a step
    assert _reserve_settles_at(kv, 3) == 3  # the three near ones' next chunks (the step after needs none)
    before = kv.stats().chunks_created_on_demand
    for i, r in enumerate(("near1", "near2", "near3")):
        kv.append_blocks(r, [5 + i])  # their crossing step, B // 2 - 1 steps later
    assert kv.stats().chunks_created_on_demand == before  # all three were ready
    kv.close()


# ---- vLLM-like scheduling, randomized ----
class _VLLMBlocks:
    """vLLM's block pool in miniature: prefix-cache hits by the hash of every full block's tokens,
    free blocks in LRU order (cached ones stay hittable until handed out again), a request's blocks
    freed last-first so its tail goes first."""

    def __init__(self, n):
        self.free = list(range(n))
        self.ref = [0] * n
        self.hash = [None] * n
        self.cache = {}  # hash -> the blocks holding that content (vLLM caches duplicates too)

    def allocate(self, tokens):
        full = [tuple(tokens[: (i + 1) * B]) for i in range(len(tokens) // B)]
        hits = []
        for h in full:
            if not self.cache.get(h):
                break
            hits.append(min(self.cache[h]))
        need = -(-len(tokens) // B) - len(hits)
        if need > len([b for b in self.free if b not in hits]):
            return None
        for b in hits:
            if self.ref[b] == 0:
                self.free.remove(b)
            self.ref[b] += 1
        return hits + [self.take_free() for _ in range(need)], len(hits)

    def take_free(self):
        """The least recently freed block, its cached content evicted."""
        b = self.free.pop(0)
        if self.hash[b] is not None:  # evicted from the cache
            self.cache[self.hash[b]].discard(b)
            self.hash[b] = None
        self.ref[b] = 1
        return b

    def with_memory(self):
        """Blocks whose memory vLLM counts as held: in use, or kept by the prefix cache."""
        return {b for b in range(len(self.ref)) if self.ref[b] or self.hash[b] is not None}

    def finish(self, tokens, blocks):
        for i, b in enumerate(blocks):
            if i < len(tokens) // B and self.hash[b] is None:
                self.hash[b] = tuple(tokens[: (i + 1) * B])
                self.cache.setdefault(self.hash[b], set()).add(b)
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)


def _marker(tokens, i):
    return hash(tuple(tokens[: (i + 1) * B])) % 250 + 1


@pytest.mark.parametrize("defer", [False, True], ids=["unmap-at-once", "deferred-unmaps"])
@pytest.mark.parametrize("linger", [0.0, 30.0])
@pytest.mark.parametrize("seed", range(12))
def test_random_chats_under_vllms_block_pool_stay_in_budget_and_read_their_own_kv(backend, seed, linger, defer):
    """Conversations that grow turn by turn, scheduled by a miniature vLLM block pool that fills and
    evicts its prefix cache: every step stays within the budget (no VTensorOutOfMemory), and every
    request reads, through its own range, the KV its tokens had when written (prefix hits, parked
    slots, evicted blocks handed out again)."""
    import random

    rng = random.Random(seed)
    n_blocks, n_slots = 10, 4
    if defer:  # unmaps deferred until a lagging "device" catches up (CUDA's way), on a fresh host backend
        if isinstance(backend, DeferredBackend) or backend._stage:
            pytest.skip("deferred unmaps run with the plain backend (CUDA's), not the host's experimental ones")
        backend = _LaggingDevice(random.Random(seed + 100))
    kv = make(backend, blocks=n_blocks, slots=n_slots, per_slot=6, linger=linger, defer=defer)
    pool = _VLLMBlocks(n_blocks)
    convs = [[rng.randrange(50) for _ in range(rng.randrange(3, 2 * B))] for _ in range(6)]
    running = {}
    peak_live = peak_seen = 0
    deferring = getattr(backend, "deferring", contextlib.nullcontext)
    for step in range(80):
        added = []
        with deferring():  # the step's decisions; with a deferred backend their memory work is queued
            for req in [r for r in running if rng.random() < 0.5]:
                tokens, blocks = running.pop(req)
                kv.remove_request(req)
                pool.finish(tokens, blocks)
            for _ in range(rng.randrange(3)):
                c = rng.randrange(len(convs))
                if len(running) == n_slots or any(req.startswith(f"c{c}-") for req in running):
                    continue
                tokens = convs[c] = convs[c] + [rng.randrange(50) for _ in range(rng.randrange(1, B + 5))]
                if len(tokens) > 5 * B:
                    tokens = convs[c] = tokens[-rng.randrange(3, B):]  # a new conversation in its place
                got = pool.allocate(tokens)
                if got is None:
                    continue
                blocks, hits = got
                req = f"c{c}-{step}"
                added.append((tokens, kv.add_request(req, blocks, num_cached_tokens=hits * B), hits))
                kv.note_tokens(req, len(tokens))
                running[req] = (tokens, blocks)
        kv.note_step()  # what the worker does after each step's block updates
        peak_live = max(peak_live, sum(len(tokens) for tokens, _ in running.values()))
        wait_all()  # what the attention layers do before touching KV
        for tokens, virtual, hits in added:  # the step's forward pass: read the hits, write the rest
            for i, v in enumerate(virtual):
                if i < hits:
                    assert int(block_bytes(kv, v).min()) == _marker(tokens, i) == int(block_bytes(kv, v).max())
                else:
                    block_bytes(kv, v).fill_(_marker(tokens, i))
        s = kv.stats()
        assert s.resident_bytes <= s.budget_bytes and s.running_requests == len(running)
        if not defer:  # memory held for blocks = what vLLM counts (engines on a shared pool claim by that count)
            assert (s.resident_bytes - s.lingering_bytes - s.reserve_bytes) // kv.chunk_bytes == len(pool.with_memory())
        peak_seen = max(peak_seen, s.resident_bytes)
        # exact peaks: every step's live tokens; resident memory at every creation, so at least what was seen
        assert s.peak_live_tokens == peak_live
        assert peak_seen <= s.peak_resident_bytes <= s.budget_bytes
    for req in running:
        kv.remove_request(req)
    kv.close()
    if defer:
        assert backend.syncs > 0 and backend.resident_bytes() == 0
        backend.close()


# ---- deferred unmaps (CUDA's way: no step waits for the device) ----
def test_deferred_unmap_waits_for_the_device_then_parks_and_gives_memory_back():
    backend = _LaggingDevice()
    kv = make(backend, defer=True, blocks=8, slots=2, per_slot=4)
    kv.add_request("a", [0, 1, 2], 0)
    kv.note_tokens("a", 2 * B + 5)  # two full blocks, one partial
    backend.gate.clear()  # the device is still running the step that read "a"
    kv.remove_request("a")  # returns at once: nothing waits for the device
    s = kv.stats()
    assert s.running_requests == 0 and s.resident_bytes == 3 * PAGE  # still mapped: the device may read it
    assert kv.add_request("b", [5], 0) == [4]  # another slot meanwhile
    backend.gate.set()  # the device catches up; nobody calls in: the drainer unmaps on its own
    deadline = time.monotonic() + 10
    while kv.stats().parked_bytes != 2 * PAGE and time.monotonic() < deadline:
        time.sleep(0.01)
    s = kv.stats()
    assert s.parked_bytes == 2 * PAGE and s.resident_bytes == 3 * PAGE  # "a"'s two full blocks + "b"'s
    kv.remove_request("b")
    kv.drain()
    assert kv.add_request("c", [0, 1, 6], 2 * B) == [0, 1, 2]  # the next turn gets "a"'s parked slot back
    kv.close()
    assert backend.resident_bytes() == 0
    backend.close()


def test_a_new_request_waits_for_a_retired_slot_when_none_is_free():
    backend = _LaggingDevice()
    kv = make(backend, keep=False, defer=True, blocks=8, slots=1, per_slot=4)
    kv.add_request("a", [0, 1], 0)
    backend.gate.clear()
    kv.remove_request("a")
    threading.Timer(0.1, backend.gate.set).start()  # the device finishes a little later
    t0 = time.monotonic()
    assert kv.add_request("b", [2], 0) == [0]  # the only slot, once "a"'s range is unmapped
    assert time.monotonic() - t0 >= 0.05
    kv.close()
    backend.close()


def test_a_full_engine_deferring_unmaps_starts_requests_beside_retiring_ones_without_waiting():
    """The worker's KV space with deferred unmaps has spare slots (a quarter more, at least 4): an engine
    running max_num_seqs requests starts one in each step another finished in, while the device still
    runs the step that read the finished ones, without waiting for it; only once every spare slot holds
    a retiring range does a new request wait."""
    from vllm_vtensor.worker import kv_space_for, retiring_slots

    assert [retiring_slots(n) for n in (1, 8, 16, 128, 256)] == [4, 4, 4, 32, 64]
    backend = _LaggingDevice()
    n = 8
    kv = kv_space_for(backend, max_num_seqs=n, max_model_len=3 * B, block_size=B, block_bytes=PAGE, num_blocks=32,
                      keep_full_blocks=False, defer_unmaps=True)
    assert kv.num_slots == n + 4
    plain_backend = HostBackend()
    plain = kv_space_for(plain_backend, max_num_seqs=n, max_model_len=3 * B, block_size=B, block_bytes=PAGE,
                         num_blocks=32, keep_full_blocks=False)
    assert plain.num_slots == n  # unmapping in the step: none spare
    plain.close()
    plain_backend.close()
    for i in range(n):
        kv.add_request(f"r{i}", [i], 0)
    backend.gate.clear()  # the device is still running the step that read them
    started = threading.Event()

    def four_steps():
        for i in range(4):  # each: one request finishes, another starts
            kv.remove_request(f"r{i}")
            kv.add_request(f"n{i}", [n + i], 0)
        started.set()

    threading.Thread(target=four_steps, daemon=True).start()
    assert started.wait(5)  # no step waited for the device (it never caught up)
    kv.remove_request("r4")
    threading.Timer(0.1, backend.gate.set).start()
    t0 = time.monotonic()
    kv.add_request("n4", [n + 4], 0)  # every spare slot holds a retiring range: this one waits
    assert time.monotonic() - t0 >= 0.05
    kv.close()
    backend.close()


def test_a_block_handed_out_again_before_its_unmap_keeps_its_new_content():
    """vLLM frees a partial block and hands it to another request before the device has caught up:
    the retired range must not mark the block's (new) content unwanted when its unmap finally runs."""
    backend = _LaggingDevice()
    kv = make(backend, defer=True, blocks=8, slots=3, per_slot=4)
    kv.add_request("a", [0, 1], 0)
    kv.note_tokens("a", B + 3)  # block 1 partial: no cache wants it
    backend.gate.clear()
    kv.remove_request("a")
    kv.add_request("b", [1], 0)  # block 1 again, new content
    kv.note_tokens("b", B)  # now full: the prefix cache keeps it when "b" finishes
    block_bytes(kv, kv.add_request("c", [2], 0)[0])  # another request meanwhile
    backend.gate.set()
    kv.drain()
    kv.remove_request("b")
    kv.drain()
    virtual = kv.add_request("d", [1], B)  # a prefix-cache hit on block 1: its content is still here
    assert len(virtual) == 1
    kv.close()
    backend.close()



# ---- the process's RSS (a CPU's mappings) ----
def _range_rss(kv) -> int:
    """Bytes of ``kv``'s virtual range in this process's page tables (what RSS counts), from smaps."""
    import re

    lo, hi = kv.range.addr, kv.range.addr + kv.range.size
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                a, b = (int(x, 16) for x in line.split()[0].split("-"))
                inside = lo <= a and b <= hi
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return rss


def test_a_prefix_kept_in_many_parked_slots_counts_once_in_rss():
    """Six finished chats that share a two-block system prompt keep their slots parked: each chunk's
    pages stay in the page tables at one place only, so the range's RSS stays within the memory held;
    a parked slot taken back reads the shared prefix (its pages fault back in)."""
    backend = HostBackend()
    kv = KVSpace(backend, num_blocks=16, num_slots=8, blocks_per_slot=4, block_bytes=PAGE, block_size=B,
                 keep_full_blocks=True)
    for i in range(6):
        virtual = kv.add_request(f"c{i}", [0, 1, 2 + i], num_cached_tokens=2 * B if i else 0)
        if not i:
            block_bytes(kv, virtual[0]).fill_(7)
            block_bytes(kv, virtual[1]).fill_(8)
        block_bytes(kv, virtual[2]).fill_(10 + i)
        kv.note_tokens(f"c{i}", 3 * B)
    assert _range_rss(kv) > kv.stats().resident_bytes  # six running requests really share the prefix
    for i in range(6):
        kv.remove_request(f"c{i}")
    s = kv.stats()
    assert s.parked_bytes == 6 * 3 * PAGE and s.resident_bytes == 8 * PAGE
    assert _range_rss(kv) <= s.resident_bytes  # each chunk counted once (was 18 pages for 8)
    virtual = kv.add_request("c3-next", [0, 1, 5, 9], num_cached_tokens=3 * B)  # c3's next turn
    assert virtual[:3] == [kv.virtual_block(kv.slot_of("c3-next"), j) for j in range(3)]
    assert [int(block_bytes(kv, v).max()) for v in virtual[:3]] == [7, 8, 13]  # faulted back in
    kv.close()
    backend.close()


# ---- sliding windows ----
def _sliding(backend, keep):
    return KVSpace(backend, num_blocks=12, num_slots=3, blocks_per_slot=8, block_bytes=PAGE, block_size=B,
                   keep_full_blocks=keep, sliding_window=2 * B, null_block=0)


@pytest.mark.parametrize("keep", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_blocks_a_sliding_window_leaves_behind_are_unmapped(backend, keep):
    """A request generating past its window: the blocks wholly before the window of its next token
    are unmapped as it moves on; their memory goes back, unless the prefix cache keeps their content."""
    kv = _sliding(backend, keep)
    virtual = kv.add_request("a", [1, 2, 3], 0)
    for j, v in enumerate(virtual):
        block_bytes(kv, v).fill_(j + 1)
    kv.note_tokens("a", 3 * B)
    kv.slide("a", 2 * B)  # the next token's window starts at 2B - 2B + 1: nothing wholly before it
    assert kv.stats().mapped_bytes == 3 * PAGE
    kv.append_blocks("a", [4])
    kv.note_tokens("a", 3 * B + 1)
    kv.slide("a", 3 * B + 1)  # the window of token 3B+1 starts at B+2: block 0 is behind it
    wait_all()
    s = kv.stats()
    assert s.mapped_bytes == 3 * PAGE and int(block_bytes(kv, virtual[0]).count_nonzero()) == 0  # reads zeros
    assert int(block_bytes(kv, virtual[1]).min()) == 2  # the window's blocks are still there
    assert s.resident_bytes == (4 if keep else 3) * PAGE  # block 1's content kept only for the prefix cache
    kv.remove_request("a")
    kv.close()


def test_a_prefix_hit_through_vllms_null_blocks_maps_only_the_window(backend):
    """vLLM's sliding-window prefix hit lists its null block (id 0) for blocks before the window: those
    positions stay unmapped, the rest are mapped from the cache, and virtual ids stay positional."""
    kv = _sliding(backend, keep=True)
    first = kv.add_request("a", [1, 2, 3], 0)
    for j, v in enumerate(first):
        block_bytes(kv, v).fill_(j + 1)
    kv.note_tokens("a", 3 * B)
    kv.remove_request("a")  # not parked: with a window, positions before it hold nothing
    virtual = kv.add_request("b", [0, 2, 3, 5], num_cached_tokens=3 * B)
    assert virtual == [kv.virtual_block(kv.slot_of("b"), j) for j in range(4)]
    wait_all()
    assert int(block_bytes(kv, virtual[0]).count_nonzero()) == 0
    assert [int(block_bytes(kv, v).max()) for v in virtual[1:3]] == [2, 3]
    assert kv.stats().mapped_bytes == 3 * PAGE
    kv.remove_request("b")
    kv.close()



# ---- several KV cache groups over one memory (hybrid models) ----
def test_groups_share_one_memory_and_block_to_chunk_map(backend):
    """A hybrid model's groups (sliding-window and full layers) each map their own blocks into their own
    ranges, over one pool: a block freed by one group and handed to the other keeps its chunk, the
    figures count memory once, and a prefix-cache reset covers every group."""
    full = KVSpace(backend, num_blocks=8, num_slots=2, blocks_per_slot=4, block_bytes=PAGE, block_size=B,
                   keep_full_blocks=True, null_block=0)
    window = KVSpace(backend, num_blocks=8, num_slots=2, blocks_per_slot=4, block_bytes=PAGE, block_size=B,
                     keep_full_blocks=True, null_block=0, sliding_window=B, shares_memory_with=full)
    assert full.family == window.family == [full, window] and window.pool is full.pool
    a_full = full.add_request("a", [1, 2], 0)
    a_win = window.add_request("a", [3, 4], 0)
    for space, virtual, mark in ((full, a_full, 5), (window, a_win, 9)):
        for v in virtual:
            block_bytes(space, v).fill_(mark)
        space.note_tokens("a", 2 * B - 3)  # block 1 of each partial
    wait_all()
    s = full.stats()
    assert s.resident_bytes == 4 * PAGE and s.mapped_bytes == 4 * PAGE and s.running_requests == 1
    window.slide("a", 2 * B - 1)  # the window's first block is behind the next token's window
    wait_all()
    assert full.stats().mapped_bytes == 3 * PAGE
    for space in full.family:
        space.remove_request("a")
    s = full.stats()
    assert s.mapped_bytes == 0 and s.cached_bytes == 2 * PAGE  # blocks 1 and 3: full, kept for the cache
    b_win = window.add_request("b", [1], num_cached_tokens=0)  # vLLM reuses block 1 for the other group
    wait_all()
    assert int(block_bytes(window, b_win[0]).max()) == 5  # the same chunk (content until written)
    window.remove_request("b")
    window.reset_cache()  # either space resets the family's cached blocks
    assert full.stats().cached_bytes == 0
    full.close()
    assert window._closed


# ---- map-ahead: a decoding request's next chunk mapped beside the compute ----
class _CountingBackend(HostBackend):
    """A host backend that counts the maps each thread makes."""

    def __init__(self):
        super().__init__()
        self.maps_by: dict[str, int] = {}

    def map_many(self, vr, offset, handles, size):
        name = threading.current_thread().name
        self.maps_by[name] = self.maps_by.get(name, 0) + len(handles)
        super().map_many(vr, offset, handles, size)


def _ahead(kv, *, blocks=16, slots=4, per_slot=8, precreate=4):
    return KVSpace(kv, num_blocks=blocks, num_slots=slots, blocks_per_slot=per_slot, block_bytes=PAGE, block_size=B,
                   keep_full_blocks=True, precreate_bytes=precreate * PAGE, map_ahead=True)


def _mapped_ahead(kv, req, timeout=10.0) -> bool:
    """Whether ``req``'s next chunk gets mapped ahead (waits for the helper thread up to ``timeout``). The
    helper maps only chunks the pool has made already; one not made yet when it looked (its creating
    thread slowed by a busy machine) is asked for again by the next decode step, as here every 50 ms."""
    deadline = asked = time.monotonic()
    deadline += timeout
    while kv._reqs[req].ahead is None and time.monotonic() < deadline:
        time.sleep(0.002)
        if time.monotonic() - asked > 0.05:
            kv.expect_growth({req: 1})
            asked = time.monotonic()
    return kv._reqs[req].ahead is not None


def test_map_ahead_is_refused_with_a_deferred_backend():
    backend = DeferredBackend(HostBackend())
    with pytest.raises(ValueError, match="deferred backend"):
        _ahead(backend)
    backend.close()


def test_a_decoding_requests_next_chunk_is_mapped_ahead_and_its_step_maps_nothing():
    backend = _CountingBackend()
    kv = _ahead(backend)
    kv.add_request("a", [1])
    kv.note_tokens("a", B // 2 - 1)
    kv.expect_growth({"a": 1})  # more than half a block before the boundary: not yet
    time.sleep(0.05)
    assert kv._reqs["a"].ahead is None
    kv.note_tokens("a", B // 2 + 1)
    kv.expect_growth({"a": 1})
    assert _mapped_ahead(kv, "a")
    assert backend.maps_by.get("vtensor-map-ahead") == 1
    step_maps = backend.maps_by.get("MainThread", 0)
    (v,) = kv.append_blocks("a", [2])  # the step that crosses the boundary
    assert backend.maps_by.get("MainThread", 0) == step_maps  # nothing mapped in the step
    assert v == kv.slot_of("a") * 8 + 1
    block_bytes(kv, v).fill_(5)  # the block is writable where vLLM's id says, and is block 2's memory:
    kv.note_tokens("a", 2 * B)
    kv.remove_request("a")
    (w,) = kv.add_request("b", [2], num_cached_tokens=B)[:1]  # a prefix hit on block 2 reads what "a" wrote
    assert int(block_bytes(kv, w).min()) == 5 == int(block_bytes(kv, w).max())
    s = kv.stats()
    assert s.mapped_ahead == 1 and s.resident_bytes <= s.budget_bytes
    kv.close()
    backend.close()


def test_a_finishing_request_gives_its_ahead_chunk_back_and_the_place_reads_zeros():
    backend = HostBackend()
    kv = _ahead(backend)
    kv.add_request("a", [3])
    kv.note_tokens("a", B - 1)
    kv.expect_growth({"a": 1})
    assert _mapped_ahead(kv, "a")
    slot = kv.slot_of("a")
    block_bytes(kv, slot * 8 + 1).fill_(3)  # a stray write past the request's blocks lands in the ahead chunk
    kv.remove_request("a")
    s = kv.stats()
    assert s.mapped_ahead == 0 and s.mapped_bytes == 0 and s.resident_bytes == s.reserve_bytes + s.cached_bytes
    assert int(block_bytes(kv, slot * 8 + 1).max()) == 0  # unmapped: the place reads as zeros again
    kv.close()
    backend.close()


def test_a_block_with_content_elsewhere_or_zeroed_does_not_take_the_ahead_chunk():
    """The block vLLM hands out for the ahead position takes the ahead chunk only if its own content is
    gone (mapped nowhere): a block a parked slot still maps, or one zeroed in this step, is mapped as is
    and the ahead chunk goes back."""
    backend = HostBackend()
    kv = _ahead(backend, slots=4)
    kv.add_request("p", [1])
    block_bytes(kv, kv.slot_of("p") * 8).fill_(7)
    kv.note_tokens("p", B)
    kv.remove_request("p")  # parked: block 1 stays mapped in its slot, for a later prefix hit
    kv.add_request("a", [2])
    kv.note_tokens("a", B - 1)
    kv.expect_growth({"a": 1})
    assert _mapped_ahead(kv, "a")
    (v,) = kv.append_blocks("a", [1])  # vLLM evicted block 1 from its cache and handed it out again
    assert kv.stats().mapped_ahead == 0 and kv._phys[1] == kv._reqs["a"].chunks[1]
    assert int(block_bytes(kv, v).max()) == 7  # block 1's own chunk (its old content, to be overwritten)
    kv.add_request("b", [3])
    kv.note_tokens("b", B - 1)
    kv.expect_growth({"b": 1})
    assert _mapped_ahead(kv, "b")
    kv.zero_blocks([4])  # vLLM asks for block 4 zeroed, then hands it to "b"
    (w,) = kv.append_blocks("b", [4])
    assert kv.stats().mapped_ahead == 0 and int(block_bytes(kv, w).max()) == 0
    kv.note_step()
    s = kv.stats()
    assert s.resident_bytes <= s.budget_bytes and s.mapped_bytes == 4 * kv.chunk_bytes  # a: 2, b: 2
    kv.close()
    backend.close()


def test_a_step_short_of_memory_takes_an_ahead_chunk_back():
    """Ahead chunks are memory vLLM does not count: when the step's blocks need all of the budget, the
    step takes them back (no VTensorOutOfMemory), as vLLM's block count says it may."""
    backend = HostBackend()
    kv = _ahead(backend, blocks=6, slots=2, precreate=2)
    kv.add_request("a", [1])
    kv.note_tokens("a", B - 1)
    kv.expect_growth({"a": 1})
    assert _mapped_ahead(kv, "a")  # 4 free chunks > 1 running request
    kv.add_request("b", [2, 3, 4, 5, 6])  # the rest of vLLM's 6 blocks: the ahead chunk must go
    assert kv._reqs["a"].ahead is None
    s = kv.stats()
    assert s.resident_bytes <= s.budget_bytes and s.mapped_bytes == 6 * kv.chunk_bytes
    kv.close()
    backend.close()


def _kv_value(tokens, i):
    """The KV a token's position holds: a function of the tokens up to it, as real KV is."""
    return hash(tuple(tokens[: i + 1])) % 250 + 1


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_random_decoding_with_map_ahead_stays_in_budget_and_reads_its_own_kv(device, seed):
    """Requests decode token by token under the miniature vLLM block pool (cached blocks evicted and handed
    out again, requests finishing, memory running short) with map-ahead on: every step stays in the budget,
    no step fails for memory, memory held for blocks is what vLLM counts plus at most one ahead chunk per
    running request, and every request reads back the KV of all its tokens, prefix hits included (on CUDA:
    written and read on the device while the helper maps through the driver)."""
    import random

    from vllm_vtensor.vmm import make_backend

    rng = random.Random(seed)
    backend = make_backend(device)
    n_blocks, n_slots = 14, 4
    kv = KVSpace(backend, num_blocks=n_blocks, num_slots=n_slots, blocks_per_slot=6, block_bytes=PAGE, block_size=B,
                 keep_full_blocks=True, precreate_bytes=2 * PAGE, map_ahead=True)
    pool = _VLLMBlocks(n_blocks)
    running = {}  # req -> (tokens, blocks, virtual ids)
    for step in range(150):
        for req in [r for r in running if rng.random() < 0.04 or len(running[r][0]) >= 6 * B - 1]:
            tokens, blocks, _ = running.pop(req)
            kv.remove_request(req)
            pool.finish(tokens, blocks)
        if len(running) < n_slots and rng.random() < 0.3:
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 2 * B))]  # shared prefixes are likely
            got = pool.allocate(tokens)
            if got is not None:
                blocks, hits = got
                req = f"r{step}"
                virtual = kv.add_request(req, blocks, num_cached_tokens=hits * B)
                running[req] = (tokens, blocks, virtual)
                for i in range(hits * B, len(tokens)):
                    block_bytes(kv, virtual[i // B])[i % B] = _kv_value(tokens, i)
        scheduled = {}
        for req, (tokens, blocks, virtual) in running.items():
            if len(tokens) % B == 0:  # its next token needs a block
                if not pool.free:
                    continue  # vLLM would preempt or wait: this request sits the step out
                b = pool.take_free()
                blocks.append(b)
                virtual += kv.append_blocks(req, [b])
            i = len(tokens)
            tokens.append(rng.randrange(3))
            block_bytes(kv, virtual[i // B])[i % B] = _kv_value(tokens, i)
            scheduled[req] = 1
        kv.note_tokens_of({req: len(t) for req, (t, _, _) in running.items()})
        kv.expect_growth(scheduled)
        kv.note_step()
        time.sleep(rng.random() * 0.004)  # the forward pass, beside which the helper maps ahead
        with kv._lock:  # the figures and the ahead chunks at one moment
            s = kv.stats()
            ahead = sum(r.ahead is not None for r in kv._reqs.values())
        assert s.resident_bytes <= s.budget_bytes
        held = (s.resident_bytes - s.lingering_bytes - s.reserve_bytes) // kv.chunk_bytes
        assert held - ahead == len(pool.with_memory()) and ahead <= len(running)
        for req, (tokens, _, virtual) in running.items():
            got = [int(block_bytes(kv, virtual[i // B])[i % B]) for i in range(len(tokens))]
            assert got == [_kv_value(tokens, i) for i in range(len(tokens))], (step, req)
    assert kv.stats().mapped_ahead > 0
    for req in running:
        kv.remove_request(req)
    kv.close()
    backend.close()
