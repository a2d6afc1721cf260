"""KVSpace: every request's KV cache as one contiguous virtual range.

vLLM's scheduler keeps deciding *physical* blocks (its unmodified block pool:
admission, prefix caching, preemption, all its accounting).  A physical block
here is one chunk holding that block's pages of *all* layers.  The worker
never shows physical ids to the model: each running request owns a *slot* of
``blocks_per_slot`` virtual blocks, and its j-th physical block is mapped at
virtual block ``slot * blocks_per_slot + j``.  So a request's whole KV cache,
all layers, is one contiguous virtual range, and a prefix shared with another
request is the same physical chunk mapped into both ranges.

Virtual layout (bytes)::

    [slot 0: block 0 [layer 0 page][layer 1 page]...][block 1 ...]...][slot 1 ...]

Layer ``l``'s KV tensor is a strided view: virtual block ``v`` of layer ``l``
starts at ``v * chunk_bytes + l * page_bytes``.

Refcounts (in the :class:`ChunkPool`): a physical block's chunk holds one
reference while the block has content worth keeping (it is live, or a full
block that vLLM's prefix cache may hand out again), plus one per virtual
mapping.  A chunk nobody holds lingers for ``linger_s`` before its memory is
given back, so a block freed and wanted again soon (requests coming and going)
skips zeroing, releasing and re-creating memory.

A finished request's slot is *parked* with its leading full blocks still
mapped (those the prefix cache keeps anyway, so parking holds no extra
memory).  A later request whose prefix hits the same blocks - the next turn of
a chat, or the same prompt again - gets that slot back and maps only what
differs; a slot is taken from the parked ones (least recently parked first)
only when no slot is free.  Pure bookkeeping: no torch or
vLLM imports here beyond the backend.  Thread-safe: the pool's reaper thread
reads the figures while the worker updates them.
"""
from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from .log import get_logger
from .pool import ChunkPool, VTensorOutOfMemory
from .threads import move_to_helper_cores
from .vmm.base import VMMBackend


def default_decode_lookahead(block_size: int) -> int:
    """Tokens before a decoding request's block boundary at which its next chunk is made (half a block)."""
    return max(1, block_size // 2)


def chunk_bytes_for(block_bytes: int, granularity: int) -> int:
    """A chunk holds one block of all layers, padded to the backend's mapping granularity."""
    return math.ceil(block_bytes / granularity) * granularity


class KVSpaceError(RuntimeError):
    """The worker's view of blocks disagrees with the scheduler's (a bug), or a limit was hit."""


@dataclass
class _RequestKV:
    slot: int
    # physical block ids, in order, and the chunk mapped at each virtual block; None at positions that
    # hold nothing (vLLM's null block: blocks a sliding window left behind)
    blocks: list[int | None] = field(default_factory=list)
    chunks: list[int | None] = field(default_factory=list)
    num_tokens: int = 0  # tokens with KV written (computed + scheduled)
    # map-ahead: a chunk mapped at the next position (``len(chunks)``) before vLLM hands out the block for it,
    # holding one reference (this mapping); the step that gets the block takes it (see KVSpace._use_ahead)
    ahead: int | None = None


@dataclass(frozen=True)
class KVSpaceStats:
    block_size: int  # tokens per block (one chunk holds a block of every layer)
    chunk_bytes: int
    budget_bytes: int
    resident_bytes: int  # physical memory held (live + kept for the prefix cache + reserve + lingering)
    mapped_bytes: int  # virtual bytes backed by a chunk, summed over requests
    shared_bytes: int  # physical bytes mapped into more than one request
    cached_bytes: int  # physical bytes held only for vLLM's prefix cache
    lingering_bytes: int  # freed physical bytes not yet given back (reused if wanted within linger_s)
    reserve_bytes: int  # ready chunks kept for new blocks (pre-created beside the compute, or just freed)
    prefix_hit_bytes: int  # bytes of cached prefix mapped into new requests (total, never copied)
    copied_bytes: int  # bytes copied by copy-on-write of partial prefix hits (total)
    maps: int
    unmaps: int
    running_requests: int
    live_tokens: int  # tokens with KV written, over running requests
    preemptions: int
    parked_bytes: int  # mappings kept in the slots of finished requests for reuse (no memory of their own)
    slot_reuse_bytes: int  # prefix bytes a new request found already mapped in a parked slot (total)
    chunks_created: int  # physical chunks created (first use of memory), total
    chunks_created_on_demand: int  # of those, created while a step waited (none was ready), total
    step_seconds: float  # time the worker spent applying block decisions before steps, total
    deferred_ops: int  # memory operations run by a helper thread beside the compute (deferred backend), total
    wait_seconds: float  # time KV access waited for memory work running beside the compute (deferred backend), total
    peak_resident_bytes: int  # the most physical memory held at once (exact, not sampled)
    peak_live_tokens: int  # the most tokens with KV written at once, over running requests (as of each step)
    mapped_ahead: int  # decoding requests' next chunks mapped beside the compute and taken by a step (total)


class KVSpace:
    def __init__(
        self,
        backend: VMMBackend,
        *,
        num_blocks: int,
        num_slots: int,
        blocks_per_slot: int,
        block_bytes: int,
        block_size: int,
        keep_full_blocks: bool,
        linger_s: float = 0.0,
        on_release: Callable[["KVSpace"], None] | None = None,
        precreate_bytes: int = 0,
        defer_unmaps: bool = False,
        sliding_window: int | None = None,
        retained_tokens: int = 0,
        null_block: int | None = None,
        shares_memory_with: "KVSpace | None" = None,
        decode_lookahead: int | None = None,
        map_ahead: bool = False,
    ):
        if min(num_blocks, num_slots, blocks_per_slot, block_bytes, block_size) <= 0:
            raise ValueError("KVSpace sizes must be positive")
        if map_ahead and hasattr(backend, "deferring"):
            raise ValueError("map-ahead maps from its own thread: it does not combine with a deferred backend, "
                             "whose queued operations would run after it")
        gran = backend.granularity
        self.backend = backend
        self.chunk_bytes = chunk_bytes_for(block_bytes, gran)
        self.block_size = block_size
        self.num_slots = num_slots
        self.blocks_per_slot = blocks_per_slot
        self.keep_full_blocks = keep_full_blocks
        # tokens ahead of a decoding request's next block boundary at which its chunk is made (expect_growth)
        self.decode_lookahead = default_decode_lookahead(block_size) if decode_lookahead is None else decode_lookahead
        if self.decode_lookahead < 1:
            raise ValueError(f"decode_lookahead={decode_lookahead} must be at least one token")
        # Sliding-window attention (every layer): blocks wholly before a request's window are unmapped as
        # it moves on (vLLM frees them too, and hands out its null block in their place)
        self.sliding_window = sliding_window
        self.retained_tokens = retained_tokens
        self.null_block = null_block
        first = shares_memory_with
        if first is not None and (first.chunk_bytes != self.chunk_bytes or first.block_size != block_size):
            raise ValueError("KV spaces that share memory need the same chunk and block sizes")
        # Several KV cache groups (a hybrid model: sliding-window and full-attention layers) each get a space
        # of their own - their own slots and virtual range - over one physical memory: one chunk pool and one
        # block -> chunk map (vLLM hands a block to one group at a time), one lock. ``family`` lists them.
        self.family: list[KVSpace] = first.family if first is not None else []
        self.family.append(self)
        self._lock = first._lock if first is not None else threading.RLock()
        self.on_release = on_release  # called (from the reaper thread) after lingering memory is given back
        # the virtual range first: it is what fails when max_num_seqs x max_model_len is too large
        self.range = backend.reserve(num_slots * blocks_per_slot * self.chunk_bytes)
        # A small reserve of ready chunks, refilled by a background thread, keeps making memory
        # (allocating and clearing pages) off the step's critical path while requests grow.
        high = min(precreate_bytes // self.chunk_bytes, num_blocks)
        if first is not None:
            self.pool = first.pool
        else:
            self.pool = ChunkPool(backend, num_blocks * self.chunk_bytes, self.chunk_bytes, linger_s=linger_s,
                                  on_release=self._released, low_watermark=max(1, high // 2) if high else 0,
                                  high_watermark=high, create_ahead=precreate_bytes > 0)
        # physical block -> chunk, for blocks with content worth keeping
        self._phys: dict[int, int] = first._phys if first is not None else {}
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._reqs: dict[str, _RequestKV] = {}
        self._parked: OrderedDict[int, _RequestKV] = OrderedDict()  # slot -> kept mappings, oldest first
        # chunk -> the one (slot, position) where a parked slot keeps it with its pages in the page tables;
        # every other parked mapping of a chunk mapped elsewhere has its pages released (see _vacate)
        self._parked_at: dict[int, tuple["KVSpace", int, int]] = first._parked_at if first is not None else {}
        # blocks whose memory goes back once nothing maps them
        self._unwanted: set[int] = first._unwanted if first is not None else set()
        self._prefix_hit_bytes = self._copied_bytes = self._preemptions = self._slot_reuse_bytes = 0
        self.step_seconds = 0.0  # accumulated by the worker around each step's block updates
        self._peak_live_tokens = 0
        # Deferred unmaps (see _retire): finished and preempted requests' ranges waiting for the device
        # to pass the work that may still read them, and a thread that unmaps them once it has
        self._cond = first._cond if first is not None else threading.Condition(self._lock)
        self._retiring: list[tuple[_RequestKV, int]] = []
        self._unmapping = 0  # retired slots the drainer is unmapping right now (outside the lock)
        self._closed = False
        self._drainer = None
        if defer_unmaps:
            self._drainer = threading.Thread(target=self._drain_loop, name="vtensor-unmap", daemon=True)
            self._drainer.start()
        # Map-ahead (a full-attention space): a helper thread maps each decoding request's next chunk while the
        # step before computes, so the step that gets the block maps nothing (see expect_growth, _use_ahead)
        self._fresh: set[int] = first._fresh if first is not None else set()  # blocks given content this step
        self._ahead_wanted: dict[str, None] = {}  # requests whose next chunk the helper should map, in order
        self._mapped_ahead = 0
        self._mapper = None
        if map_ahead and sliding_window is None:
            self._mapper = threading.Thread(target=self._map_ahead_loop, name="vtensor-map-ahead", daemon=True)
            self._mapper.start()

    def _released(self) -> None:
        if self.on_release is not None:
            self.on_release(self)

    # -- the virtual address space -------------------------------------
    def as_tensor(self):
        """The whole reservation as ``uint8`` (unmapped parts read as zeros)."""
        return self.backend.as_tensor(self.range.addr, self.range.size)

    def virtual_block(self, slot: int, j: int) -> int:
        return slot * self.blocks_per_slot + j

    @property
    def num_virtual_blocks(self) -> int:
        return self.num_slots * self.blocks_per_slot

    def _next_offset(self, r: _RequestKV) -> int:
        """Byte offset in the range of ``r``'s next position (where its next block, or its ahead chunk, goes)."""
        return self.virtual_block(r.slot, len(r.chunks)) * self.chunk_bytes

    def slot_of(self, req_id: str) -> int:
        return self._reqs[req_id].slot

    def request_range(self, req_id: str) -> tuple[int, int]:
        """``(address, mapped bytes)`` of a request's contiguous KV range."""
        r = self._reqs[req_id]
        return self.range.addr + r.slot * self.blocks_per_slot * self.chunk_bytes, len(r.chunks) * self.chunk_bytes

    # -- physical blocks -----------------------------------------------
    def _chunk(self, block: int) -> int:
        chunk = self._phys.get(block)
        if chunk is None:
            try:
                (chunk,) = self.pool.acquire(1)  # the "content" reference
            except VTensorOutOfMemory:  # chunks mapped ahead hold the rest of the budget: take one back
                if not self._take_back_ahead():
                    raise
                (chunk,) = self.pool.acquire(1)
            self._phys[block] = chunk
        return chunk

    def _drop(self, block: int) -> None:
        chunk = self._phys.pop(block, None)
        if chunk is not None:
            self.pool.release(chunk)

    def zero_blocks(self, blocks: list[int]) -> None:
        with self._lock:
            for b in blocks:
                self.backend.zero_chunk(self._chunk(b), self.chunk_bytes)
            self._fresh.update(blocks)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """``(src, dst)`` physical block copies (vLLM's copy-on-write of a partial prefix hit)."""
        with self._lock:
            if pairs:
                self.backend.synchronize()
            for src, dst in pairs:
                if src not in self._phys:
                    raise KVSpaceError(f"copy from physical block {src}, which holds no content here")
                self.backend.copy_chunk(self._chunk(dst), self._phys[src], self.chunk_bytes)
                self._fresh.add(dst)
                self._copied_bytes += self.chunk_bytes

    # -- requests ------------------------------------------------------
    def _map(self, r: _RequestKV, blocks: list[int]) -> list[int]:
        start, wanted = len(r.chunks), len(blocks)
        if start + len(blocks) > self.blocks_per_slot:
            raise KVSpaceError(
                f"a request needs {start + len(blocks)} blocks but a slot holds {self.blocks_per_slot}; "
                "raise max_model_len so the vTensor slots are sized for it"
            )
        if r.ahead is not None and blocks and self._use_ahead(r, blocks[0]):
            blocks = blocks[1:]
        run: list[tuple[int, int]] = []  # (block, chunk) at consecutive positions, retained, mapped in one call

        def map_run() -> None:
            if run:
                self.backend.map_many(self.range, self._next_offset(r), [c for _, c in run], self.chunk_bytes)
                r.blocks.extend(b for b, _ in run)
                r.chunks.extend(c for _, c in run)
                self.pool.note_maps(maps=len(run))
                run.clear()

        try:
            for b in blocks:
                if b == self.null_block:  # a position the window has left: nothing to map
                    map_run()
                    r.blocks.append(None)
                    r.chunks.append(None)
                    continue
                self._unwanted.discard(b)  # live again
                chunk = self._chunk(b)
                parked = self._parked_at.pop(chunk, None)
                if parked is not None:  # the running mapping is the one that counts from now on
                    space, slot, pos = parked
                    self.backend.release_pages(space.range, space.virtual_block(slot, pos) * self.chunk_bytes,
                                               self.chunk_bytes)
                self.pool.retain(chunk)
                run.append((b, chunk))
        finally:
            map_run()  # what was retained is mapped and recorded, even if a later block's chunk could not be had
        return [self.virtual_block(r.slot, j) for j in range(start, start + wanted)]

    # -- map-ahead ---------------------------------------------------------
    def _wants_ahead(self, r: _RequestKV) -> bool:
        """Whether ``r``'s next block boundary is within ``decode_lookahead`` tokens (and its slot has room)."""
        return (r.ahead is None and len(r.chunks) < self.blocks_per_slot
                and r.num_tokens + self.decode_lookahead > len(r.chunks) * self.block_size)

    def _map_ahead_loop(self) -> None:
        """Map the wanted requests' next chunks, one at a time, under the lock (a step that comes meanwhile
        waits for at most one mapping). Only chunks already made are used (the pool's reserve, which
        :meth:`expect_growth` asks for): a request whose chunk is not ready is asked for again next step.
        Never beyond what the pool can spare: a chunk is mapped ahead only while more chunks are free
        than requests run, and is taken back if a step needs it for a block after all."""
        move_to_helper_cores()
        warned = False
        while True:
            with self._lock:
                self._cond.wait_for(lambda: self._ahead_wanted or self._closed)
                if self._closed:
                    return
                req_id = next(iter(self._ahead_wanted))
                del self._ahead_wanted[req_id]
                r = self._reqs.get(req_id)
                if (r is None or not self._wants_ahead(r) or self.pool.share is not None
                        or self.pool.num_free_chunks() <= len(self._reqs)):
                    continue
                chunk = self.pool.take_ready()
                if chunk is None:
                    continue
                try:
                    self.backend.map_many(self.range, self._next_offset(r), [chunk], self.chunk_bytes)
                except Exception:  # the step maps it itself, as without map-ahead
                    self.pool.release(chunk)
                    if not warned:
                        warned = True
                        get_logger(__name__).warning("vTensor: mapping a chunk ahead failed; steps map "
                                                     "their own", exc_info=True)
                    continue
                r.ahead = chunk
                self.pool.note_maps(maps=1)

    def _use_ahead(self, r: _RequestKV, block: int) -> bool:
        """The step hands ``r`` ``block`` for the position its ahead chunk is mapped at: the block takes
        that chunk (True) when it has no content here, or only content vLLM has just evicted from its
        prefix cache (its chunk mapped nowhere: it goes back to the pool), and was not zeroed or copied
        into in this step. Otherwise the ahead chunk is unmapped and released (False) and the block is
        mapped as usual."""
        chunk, old = r.ahead, self._phys.get(block)
        if (block != self.null_block and block not in self._fresh
                and (old is None or self.pool.refcount(old) == 1)):
            r.ahead = None
            if old is not None:
                self._drop(block)
            self._phys[block] = chunk
            self.pool.retain(chunk)  # the content reference, beside the mapping's
            self._unwanted.discard(block)
            r.blocks.append(block)
            r.chunks.append(chunk)
            self._mapped_ahead += 1
            return True
        self._drop_ahead(r)
        return False

    def _drop_ahead(self, r: _RequestKV) -> None:
        """Unmap ``r``'s ahead chunk and release it. No device synchronize: nothing has read that
        position (it lies past the request's blocks, and no block table names it)."""
        chunk, r.ahead = r.ahead, None
        self.backend.unmap(self.range, self._next_offset(r), self.chunk_bytes)
        self.pool.note_maps(unmaps=1)
        self.pool.release(chunk)

    def _take_back_ahead(self) -> bool:
        """Free one chunk mapped ahead, of any space of the family (the pool has no other); True if any."""
        for space in self.family:
            for r in space._reqs.values():
                if r.ahead is not None:
                    space._drop_ahead(r)
                    return True
        return False

    def add_request(self, req_id: str, blocks: list[int], num_cached_tokens: int = 0,
                    written_this_step: Collection[int] = ()) -> list[int]:
        """Give a new (or resumed) request a slot and map its blocks; return their virtual ids.

        The first ``num_cached_tokens // block_size`` blocks are prefix-cache hits:
        their content must already be here, and is mapped, not copied - or found
        already mapped in a parked slot with the same leading chunks.  A hit may
        also be on a block another request fills in this very step (vLLM caches a
        block when it schedules the tokens that fill it): those are passed in
        ``written_this_step`` and mapped like any other (the forward pass writes
        each layer's new KV before any request's attention reads it).
        """
        with self._lock:
            if req_id in self._reqs:
                self.remove_request(req_id, preempted=True)
            hits = min(num_cached_tokens // self.block_size, len(blocks))
            for b in blocks[:hits]:
                if b == self.null_block:
                    continue
                if b not in self._phys:
                    if b not in written_this_step:
                        raise KVSpaceError(f"prefix-cache hit on physical block {b}, whose content was not kept")
                    self._chunk(b)  # the request filling it maps the same chunk when its turn comes
            r = self._reuse_parked(blocks[:hits])
            if r is None:
                if not self._free_slots and self._parked:
                    self._evict_parked(next(iter(self._parked)))
                if not self._free_slots and (self._retiring or self._unmapping):
                    self._cond.wait_for(lambda: self._free_slots or self._parked
                                        or not (self._retiring or self._unmapping))
                    if not self._free_slots and self._parked:
                        self._evict_parked(next(iter(self._parked)))
                if not self._free_slots:
                    raise KVSpaceError(f"all {self.num_slots} vTensor slots are in use: raise max_num_seqs")
                r = _RequestKV(slot=self._free_slots.pop())
            r.num_tokens = num_cached_tokens
            self._reqs[req_id] = r
            self._prefix_hit_bytes += hits * self.chunk_bytes
            kept = len(r.chunks)
            self._slot_reuse_bytes += kept * self.chunk_bytes
            self._map(r, blocks[kept:])
            return [self.virtual_block(r.slot, j) for j in range(len(blocks))]

    def _reuse_parked(self, hit_blocks: list[int]) -> _RequestKV | None:
        """The parked slot whose leading chunks match the most of ``hit_blocks`` (trimmed to them)."""
        if not hit_blocks or not self._parked or self.null_block in hit_blocks:
            return None
        want = [self._phys[b] for b in hit_blocks]
        best, best_n = None, 0
        for slot, p in self._parked.items():
            n = 0
            for have, need in zip(p.chunks, want):
                if have != need:
                    break
                n += 1
            if n > best_n:
                best, best_n = slot, n
        if best is None:
            return None
        p = self._parked.pop(best)
        self._unpark(p)
        self._unmap_tail(p, best_n, in_flight=False)
        return p

    def _unpark(self, p: _RequestKV, start: int = 0) -> None:
        """``p`` leaves the parked slots (from position ``start`` on): it no longer holds any chunk's
        populated parked mapping there."""
        for j in range(start, len(p.chunks)):
            c = p.chunks[j]
            if c is not None and self._parked_at.get(c) == (self, p.slot, j):
                del self._parked_at[c]

    def _unmap_tail(self, r: _RequestKV, keep: int, *, in_flight: bool = True) -> None:
        """Unmap ``r``'s blocks from position ``keep`` on and drop the references they held.

        ``in_flight``: work already submitted to the device may still read the range (a request that
        ran until now), so the device is synchronized first; a parked slot's range is read by nobody."""
        if keep >= len(r.chunks):
            return
        if in_flight:
            self.backend.synchronize()  # the last forward pass may still read this range
        self._unmap_positions(r, keep, len(r.chunks))
        self._mark_unwanted(r, keep)
        self._let_go_tail(r, keep)

    def _unmap_positions(self, r: _RequestKV, start: int, end: int) -> None:
        """Unmap ``r``'s mapped positions in ``[start, end)``, one call per contiguous run."""
        j = start
        while j < end:
            if r.chunks[j] is None:
                j += 1
                continue
            k = j
            while k < end and r.chunks[k] is not None:
                k += 1
            self.backend.unmap(self.range, self.virtual_block(r.slot, j) * self.chunk_bytes, (k - j) * self.chunk_bytes)
            j = k

    def _mark_unwanted(self, r: _RequestKV, keep: int) -> None:
        """The blocks from ``keep`` on that no cache wants (past the full ones): their memory goes back
        once nothing maps them (unless vLLM hands one out again first, which un-marks it)."""
        full = r.num_tokens // self.block_size if self.keep_full_blocks else 0
        for j in range(max(keep, full), len(r.chunks)):
            if r.blocks[j] is not None:
                self._unwanted.add(r.blocks[j])

    def _let_go_tail(self, r: _RequestKV, keep: int) -> None:
        """After the range from ``keep`` on is unmapped: drop its references and forget it."""
        gone = [c for c in r.chunks[keep:] if c is not None]
        blocks = [b for b in r.blocks[keep:] if b is not None]
        del r.blocks[keep:], r.chunks[keep:]  # first: collecting may cut parked slots, this one among them
        self.pool.note_maps(unmaps=len(gone))
        for c in gone:
            self.pool.release(c)
        self._collect(blocks)

    def _collect(self, blocks: list[int]) -> None:
        """Give back the memory of unwanted blocks among ``blocks`` that no request maps any more.

        A parked slot may still map one (vLLM evicted it from the cache, handed it out again and freed
        it): the slot keeps only what comes before it, so the memory goes back now, as the scheduler
        counts it (engines on a shared pool claim memory by that count)."""
        for b in blocks:
            if b not in self._unwanted:
                continue
            chunk = self._phys.get(b)
            if chunk is not None and self.pool.refcount(chunk) > 1:
                self._cut_parked(chunk)
                chunk = self._phys.get(b)
            if chunk is None or self.pool.refcount(chunk) == 1:
                self._unwanted.discard(b)
                self._drop(b)

    def _cut_parked(self, chunk: int) -> None:
        """Parked slots that map ``chunk`` let go of it and of what follows it (freeing a slot left empty)."""
        for space in self.family:
            for slot, p in list(space._parked.items()):
                if space._parked.get(slot) is not p or chunk not in p.chunks:
                    continue
                keep = p.chunks.index(chunk)
                if not keep:
                    space._evict_parked(slot)
                    continue
                space._unpark(p, keep)
                space._unmap_tail(p, keep, in_flight=False)  # the blocks after it stay cached: not unwanted
                p.num_tokens = keep * self.block_size

    def _evict_parked(self, slot: int) -> None:
        p = self._parked.pop(slot)
        self._unpark(p)
        self._unmap_tail(p, 0, in_flight=False)
        self._free_slots.append(slot)

    def append_blocks(self, req_id: str, blocks: list[int]) -> list[int]:
        with self._lock:
            return self._map(self._reqs[req_id], blocks)

    def expect_growth(self, scheduled: dict[str, int]) -> None:
        """Have the chunks ready that the running requests will need if the next step schedules them
        as many tokens as ``scheduled`` (this step's), created beside the compute meanwhile; for a
        decoding request (one token a step), the chunk it needs within ``decode_lookahead`` tokens (default:
        half a block).

        Decoding requests that started together cross their block boundaries in the same step: made
        one step ahead, that step's chunks would have one forward pass to be created in (a 2 MiB CUDA
        chunk takes ~0.2 ms; a hundred requests crossing at once, ~20 ms), and the rest would be made
        in the step.  Half a block ahead spreads their making over as many steps as that; it holds at
        most one chunk per decoding request ahead of its need.

        After a prefill this over-predicts on purpose: the chunks it makes stay ready (cached, within
        the budget) for the next burst of new requests, such as the next turn of a chat.  A precise
        guess from each request's prompt length and token limit was measured: fewer
        chunks made, but more of them made on the critical path (docs/benchmarks/serve-compare-cpu.md)."""
        size, decode_ahead = self.block_size, self.decode_lookahead
        with self._lock:
            need = 0
            for space in self.family:  # every KV cache group's requests grow from the one pool
                reqs = space._reqs
                ahead = space._mapper is not None
                wanted = []  # (tokens left before its boundary, request) for the map-ahead helper
                for req_id, n in scheduled.items():
                    r = reqs.get(req_id)
                    if r is not None and n:
                        more = (-(-(r.num_tokens + (n if n > 1 else decode_ahead)) // size) - len(r.chunks)
                                - (r.ahead is not None))
                        if more > 0:
                            need += more
                            if ahead and n == 1 and space._wants_ahead(r):
                                wanted.append((len(r.chunks) * size - r.num_tokens, req_id))
                if wanted:  # the nearest boundaries first: this step's list replaces the last one's
                    space._ahead_wanted = dict.fromkeys(req_id for _, req_id in sorted(wanted))
            self.pool.expect(need)
            if any(space._ahead_wanted for space in self.family):
                self._cond.notify_all()

    def slide(self, req_id: str, num_computed_tokens: int) -> None:
        """With a sliding window: unmap ``req_id``'s blocks wholly before the window of its next token
        (as vLLM frees them, from the tokens computed before this step), and give their memory back
        unless the prefix cache keeps their content."""
        if self.sliding_window is None:
            return
        skipped = max(0, num_computed_tokens - self.sliding_window + 1 - self.retained_tokens) // self.block_size
        with self._lock:
            r = self._reqs.get(req_id)
            if r is None:
                return
            end = min(skipped, len(r.chunks))
            if not any(c is not None for c in r.chunks[:end]):
                return
            self.backend.synchronize()  # the last forward pass may still read these blocks
            self._unmap_positions(r, 0, end)
            gone = [(j, r.chunks[j], r.blocks[j]) for j in range(end) if r.chunks[j] is not None]
            self.pool.note_maps(unmaps=len(gone))
            for j, c, b in gone:
                if not self.keep_full_blocks:
                    self._unwanted.add(b)  # no cache wants it (they are full: the cache would, if on)
                self.pool.release(c)
                r.chunks[j] = r.blocks[j] = None
            self._collect([b for _, _, b in gone])

    def note_step(self) -> None:
        """After a step's block updates: remember the most tokens running requests have had KV for."""
        with self._lock:
            self._fresh.clear()
            self._peak_live_tokens = max(self._peak_live_tokens, sum(r.num_tokens for r in self._reqs.values()))

    def reset_peaks(self) -> None:
        """Start the peak figures (resident bytes, live tokens) over from the current ones."""
        with self._lock:
            lead = self.family[0]
            lead._peak_live_tokens = sum(r.num_tokens for r in lead._reqs.values())
        self.pool.reset_peak()

    def note_tokens(self, req_id: str, num_tokens: int) -> None:
        """After this step, ``req_id`` has KV for ``num_tokens`` tokens (computed plus scheduled).

        The count may fall: speculative decoding's rejected draft tokens leave the computed count
        lower in the next step, and only what vLLM counts decides which blocks are full."""
        self.note_tokens_of({req_id: num_tokens})

    def note_tokens_of(self, counts: dict[str, int]) -> None:
        """:meth:`note_tokens` for many requests at once (``req_id -> num_tokens``), under one lock."""
        with self._lock:
            reqs = self._reqs
            for req_id, n in counts.items():
                r = reqs.get(req_id)
                if r is not None:
                    r.num_tokens = n

    def remove_request(self, req_id: str, *, preempted: bool = False) -> None:
        """Unmap a finished or preempted request and free its slot.

        Full blocks stay resident when vLLM's prefix cache may hand them out
        again; every other block's physical memory is given back.  With prefix
        caching, a finished request's leading full blocks stay mapped in its
        parked slot for a later request with the same prefix.
        """
        with self._lock:
            r = self._reqs.pop(req_id, None)
            if r is None:
                return
            self._ahead_wanted.pop(req_id, None)
            if r.ahead is not None:
                self._drop_ahead(r)
            if preempted:
                self._preemptions += 1
            keep = 0
            if self.keep_full_blocks and not preempted and self.sliding_window is None:
                full = min(r.num_tokens // self.block_size, len(r.chunks))
                while (keep < full and self._phys.get(r.blocks[keep]) == r.chunks[keep]
                       and r.blocks[keep] not in self._unwanted):  # not evicted by the scheduler meanwhile
                    keep += 1
            if self._drainer is not None and keep < len(r.chunks):
                self._retire(r, keep)
            else:
                self._unmap_tail(r, keep)
                self._vacate(r, keep)

    def _vacate(self, r: _RequestKV, keep: int) -> None:
        """``r``'s range is unmapped from ``keep`` on: park its slot with the rest, or free it."""
        if keep:
            r.num_tokens = keep * self.block_size
            self._parked[r.slot] = r
            self._bound_parked_pages(r)
        else:
            self._free_slots.append(r.slot)
        if not any(space._reqs for space in self.family):  # idle: chunks made ready for growth go back too
            self.pool.settle()
        self._cond.notify_all()

    def _bound_parked_pages(self, r: _RequestKV) -> None:
        """Parked mappings cost no memory of their own, but on a CPU each mapping's pages count in the
        process's RSS: a chunk kept in many parked slots (a shared system prompt) would count many times.
        So at most one mapping per chunk keeps its pages - a running request's, else one parked slot's -
        and the others release theirs (a later read faults them back in)."""
        for j, c in enumerate(r.chunks):
            mappings = self.pool.refcount(c) - 1  # minus the content reference the cache holds
            if mappings > 1 or c in self._parked_at:
                self.backend.release_pages(self.range, self.virtual_block(r.slot, j) * self.chunk_bytes,
                                           self.chunk_bytes)
            else:
                self._parked_at[c] = (self, r.slot, j)

    # -- deferred unmaps -------------------------------------------------
    def _retire(self, r: _RequestKV, keep: int) -> None:
        """Queue ``r``'s range from ``keep`` on for the drainer instead of synchronizing the device now.

        What vLLM's decision means for the blocks is recorded at once (which contents no cache wants),
        so a block vLLM hands out again meanwhile is wanted again; the slot, the mappings and the
        references stay until the device has finished the work submitted so far, which may still
        read the range: then the drainer unmaps it, gives the references back and parks or frees the
        slot. No step waits for the device."""
        self._mark_unwanted(r, keep)
        self._retiring.append((r, keep))
        self._cond.notify_all()

    def _drain_loop(self) -> None:
        while True:
            with self._lock:
                self._cond.wait_for(lambda: self._retiring or self._closed)
                if not self._retiring and self._closed:
                    return
                batch, self._retiring = self._retiring, []
                self._unmapping += len(batch)
            try:
                # every kernel submitted so far - the last steps that read these ranges included - has
                # finished once this returns (it blocks this thread only); nobody maps into these slots
                # until they are vacated, so their unmaps need no lock
                self.backend.synchronize()
                for r, keep in batch:
                    self._unmap_positions(r, keep, len(r.chunks))
            finally:
                with self._lock:
                    for r, keep in batch:
                        self._let_go_tail(r, keep)
                        self._vacate(r, keep)
                    self._unmapping -= len(batch)
                    self._cond.notify_all()
            if self.on_release is not None:
                self.on_release(self)

    def drain(self) -> None:
        """Wait until every retired range is unmapped (before a reset, a close, or a test's check)."""
        with self._lock:
            self._cond.wait_for(lambda: not (self._retiring or self._unmapping))

    def wait_for_unmaps(self) -> bool:
        """Wait until every retired range of the family is unmapped; True if there were any (their chunks
        are back in the pool: an acquire the shared pool has no room for takes them)."""
        with self._lock:
            if not any(space._retiring or space._unmapping for space in self.family):
                return False
            for space in self.family:
                space.drain()
            return True

    def reset_cache(self) -> None:
        """Give back every block that only the prefix cache was holding (parked slots let go first)."""
        with self._lock:
            self.wait_for_unmaps()
            for space in self.family:
                for slot in list(space._parked):
                    space._evict_parked(slot)
            mapped = {c for space in self.family for r in space._reqs.values() for c in r.chunks}
            for b, chunk in list(self._phys.items()):
                if chunk not in mapped:
                    self._drop(b)

    def drop_blocks(self, blocks: Collection[int]) -> None:
        """The scheduler evicted ``blocks`` from its prefix cache (to give their memory to another engine):
        give back their memory, parked slots that map them keeping what comes before; a block a request
        still maps (one that finished in the step before, which the worker has not yet been told of) goes
        once unmapped."""
        with self._lock:
            self.wait_for_unmaps()
            held = [b for b in blocks if b in self._phys]
            self._unwanted.update(held)
            self._collect(held)

    def stats(self) -> KVSpaceStats:
        """The figures of this space and the others sharing its memory (every KV cache group of the model):
        memory counted once, mappings and totals summed; requests and tokens as the first group sees them
        (a request has blocks in every group)."""
        with self._lock:
            p = self.pool.stats()
            fam, lead = self.family, self.family[0]
            per_chunk = Counter(c for space in fam for r in space._reqs.values() for c in r.chunks if c is not None)
            cached = sum(1 for c in self._phys.values() if c not in per_chunk)
            return KVSpaceStats(
                block_size=self.block_size,
                chunk_bytes=self.chunk_bytes,
                budget_bytes=p.budget_bytes,
                resident_bytes=p.resident_bytes,
                mapped_bytes=sum(per_chunk.values()) * self.chunk_bytes,
                shared_bytes=sum(1 for n in per_chunk.values() if n > 1) * self.chunk_bytes,
                cached_bytes=cached * self.chunk_bytes,
                lingering_bytes=p.chunks_lingering * self.chunk_bytes,
                reserve_bytes=p.chunks_cached * self.chunk_bytes,
                prefix_hit_bytes=sum(space._prefix_hit_bytes for space in fam),
                copied_bytes=sum(space._copied_bytes for space in fam),
                maps=p.maps,
                unmaps=p.unmaps,
                running_requests=len(lead._reqs),
                live_tokens=sum(r.num_tokens for r in lead._reqs.values()),
                preemptions=lead._preemptions,
                parked_bytes=sum(sum(c is not None for c in r.chunks) for space in fam
                                 for r in space._parked.values()) * self.chunk_bytes,
                slot_reuse_bytes=sum(space._slot_reuse_bytes for space in fam),
                chunks_created=p.chunks_created,
                chunks_created_on_demand=p.chunks_created_on_demand,
                step_seconds=sum(space.step_seconds for space in fam),
                deferred_ops=getattr(self.backend, "deferred_ops", 0),
                wait_seconds=getattr(self.backend, "waited_seconds", 0.0),
                peak_resident_bytes=p.peak_resident_bytes,
                peak_live_tokens=lead._peak_live_tokens,
                mapped_ahead=sum(space._mapped_ahead for space in fam),
            )

    def close(self) -> None:
        """Close this space and every other sharing its memory."""
        if all(space._closed for space in self.family):
            return
        for space in self.family:
            for req_id in list(space._reqs):
                space.remove_request(req_id)
        self.reset_cache()
        with self._lock:
            for space in self.family:
                space._closed = True
            self._cond.notify_all()
        for space in self.family:
            for thread in (space._drainer, space._mapper):
                if thread is not None:
                    thread.join(timeout=30)
        self.pool.close()
