"""One physical KV pool shared by several engines (``VTENSOR_POOL``): the worker's and the scheduler's part.

The worker (:class:`WorkerShare`) tells the ledger how much physical memory its chunk pool holds, creates
reserve chunks only where the pool has room, and gives its idle chunks (reserve, lingering) back at once
when another engine wants memory the pool has not got.

The scheduler (:class:`EngineShare`, installed on vLLM's engine core) keeps vLLM's block pool and its
policies, and bounds them by real memory:

* a block *has memory* when it is in use, or free but kept by the prefix cache (its hash is set): the
  worker holds a chunk for exactly those;
* the free blocks the scheduler sees are its own free blocks that have memory plus as many others as the
  pool can still give (``get_num_free_blocks``), so a request the pool cannot hold waits, or vLLM preempts,
  exactly as when its own blocks run out;
* when vLLM asks how many free blocks there are for an allocation, the memory of the blocks it is about to
  take is claimed first, under the ledger's lock (``get_num_free_blocks`` after
  ``get_num_blocks_to_allocate``): the answer and the claim are one step, so no two engines count on the
  same room; when the pool is short it hands out free blocks that have memory (evicting their cached
  content, as vLLM does) before blocks that would need more;
* what it could not get in a step is published as the engine's *want*; an engine that sees others want
  more than the pool has free evicts its least recently used cached blocks (in the engine's own thread,
  woken through its input queue) and has its worker give their memory back.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
import time

from . import settings
from .ledger import Ledger, PoolError, open_pool
from .log import get_logger
from .threads import move_to_helper_cores

logger = get_logger(__name__)
POLL_S = 0.05  # how often each engine looks at the others' wants
WAIT_S = 0.005  # an engine whose every request waits for memory looks again after this long
SPARE = 1 / 16  # engines keep this share of the pool free by giving back cached blocks, when they have some


def open_from_settings(device: str | None) -> Ledger | None:
    name = settings.get("VTENSOR_POOL")
    if name is None:
        if settings.get("VTENSOR_POOL_BYTES") is not None:
            logger.warning("VTENSOR_POOL_BYTES is set without VTENSOR_POOL: no pool is shared")
        return None
    return open_pool(name, settings.get("VTENSOR_POOL_BYTES"), device)


# -- the worker's part ------------------------------------------------------------------------------
class WorkerShare:
    """The chunk pool's view of the ledger (see :class:`vllm_vtensor.pool.PoolShare`). No thread of its own:
    the engine core asks the worker to give idle chunks back (:func:`drop_blocks_memory`) when others want
    memory (a thread polling beside the compute slowed two engines sharing a core by 1.8x)."""

    def __init__(self, ledger: Ledger, slot: int, kv):
        self.ledger, self.slot, self.chunk_bytes = ledger, slot, kv.chunk_bytes
        kv.pool.attach_share(self, make_room=kv.wait_for_unmaps)

    def grow(self, chunks: int, *, force: bool = False, reserve: bool = False) -> bool:
        if reserve and any(e.want for e in self.ledger.peek().engines if e.slot != self.slot):
            return False  # another engine waits for memory: it gets the room before this engine's reserve
        return self.ledger.commit(self.slot, physical=chunks * self.chunk_bytes, force=force)

    def held(self, chunks: int) -> None:
        self.ledger.commit(self.slot, physical=chunks * self.chunk_bytes, force=True)


def _check_holds_one_request(name: str, pool_bytes: int, one_request: int, max_model_len: int) -> None:
    if one_request > pool_bytes:
        raise PoolError(f"pool {name!r} ({pool_bytes / 2**20:.0f} MiB) cannot hold one request of "
                        f"--max-model-len {max_model_len} ({one_request / 2**20:.0f} MiB of KV for this model): raise "
                        "VTENSOR_POOL_BYTES or lower --max-model-len")


def kv_bytes_per_token(vllm_config) -> int | None:
    """Bytes of KV one token takes in every layer, where the configuration alone decides it: a decoder whose
    layers all keep full attention, of one shape. None for anything else (sliding windows, layers sharing KV,
    MLA, hybrid or encoder-decoder models): there the worker's check, on the built model, is the only one."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    mc = vllm_config.model_config
    text = mc.hf_text_config
    if (mc.is_hybrid or mc.has_noops or mc.is_attention_free or mc.use_mla or mc.is_encoder_decoder
            or mc.get_sliding_window() is not None or getattr(text, "num_kv_shared_layers", 0)
            or any(t != "full_attention" for t in getattr(text, "layer_types", None) or ())):
        return None
    parallel = vllm_config.parallel_config
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, mc)
    return 2 * mc.get_num_layers(parallel) * mc.get_num_kv_heads(parallel) * mc.get_head_size() * dtype.itemsize


def check_pool_size(vllm_config) -> None:
    """Where the engine's configuration is made: a pool ``VTENSOR_POOL_BYTES`` sizes that cannot hold one request
    of ``--max-model-len`` (counted at most as the worker will count it, a whole number of blocks each) is
    refused before any engine process starts."""
    name, pool_bytes = settings.get("VTENSOR_POOL"), settings.get("VTENSOR_POOL_BYTES")
    if name is None or pool_bytes is None:
        return
    per_token = kv_bytes_per_token(vllm_config)
    if per_token:
        max_model_len = vllm_config.model_config.max_model_len
        _check_holds_one_request(name, pool_bytes, max_model_len * per_token, max_model_len)


def join_worker(kv, *, ceiling: int, max_model_len: int, label: str, device: str,
                executor: str) -> WorkerShare | None:
    """In the worker, once its KV space exists: register the engine on the pool ``VTENSOR_POOL`` names."""
    ledger = open_from_settings(device)
    if ledger is None:
        return None
    if executor not in ("mp", "uni"):
        raise PoolError(f"VTENSOR_POOL serves engines whose worker runs in or under the engine core process "
                        f"(executor 'mp' or 'uni'), not {executor!r}: run without VTENSOR_POOL")
    engine_pid = os.getppid() if executor == "mp" else os.getpid()  # the engine core's process names the engine
    _check_holds_one_request(ledger.name, ledger.pool_bytes, math.ceil(max_model_len / kv.block_size) * kv.chunk_bytes,
                             max_model_len)
    slot = ledger.join(engine_pid=engine_pid, chunk_bytes=kv.chunk_bytes, ceiling=ceiling, label=label)
    logger.info("vTensor: engine joined KV pool %r (%.2f GiB shared; this engine's ceiling %.2f GiB)",
                ledger.name, ledger.pool_bytes / 2**30, ceiling / 2**30)
    return WorkerShare(ledger, slot, kv)


def drop_blocks_memory(worker, block_ids: list[int], trim: bool) -> int:
    """Run in the worker by the engine core when another engine wants memory the pool has not got: give
    back the memory of ``block_ids`` (which its scheduler just evicted from the prefix cache) and, with
    ``trim``, of every idle chunk (reserve, lingering); return the bytes given back."""
    from .worker import _memory_work, vt_stats

    kv = getattr(getattr(worker, "model_runner", None), "_vtensor_kv", None)
    if kv is None:
        return 0
    before = kv.pool.stats().resident_bytes
    with _memory_work(kv):
        kv.drop_blocks(block_ids)
        if trim:
            kv.pool.trim()
    vt_stats.publish(kv, force=True)
    return before - kv.pool.stats().resident_bytes


# -- the scheduler's part ---------------------------------------------------------------------------
class EngineShare:
    """Bounds an engine core's block pool by the shared pool (see the module's docstring)."""

    def __init__(self, core, ledger: Ledger, slot: int, chunk_bytes: int):
        self.core, self.ledger, self.slot, self.chunk = core, ledger, slot, chunk_bytes
        sched = core.scheduler
        self.sched, self.kvm = sched, sched.kv_cache_manager
        self.bp = bp = self.kvm.block_pool
        self.block_size = core.vllm_config.cache_config.block_size
        self.caching = bool(bp.enable_caching)
        self.mem = self.count()
        self.short = 0  # blocks the pool could not give in this step
        self._claimed = self.mem  # blocks whose memory the ledger holds for this engine (>= mem within a step)
        self._asked = None  # blocks vLLM's next allocation needs, as it just computed them
        self.preemptions = 0
        self.pending = 0  # cached blocks to give back, by the engine's thread (-1: none, idle chunks only)
        self.trim = False  # the worker gives its idle chunks back too
        self._raw = 0
        self._limited = False
        self._view, self._view_at = None, 0.0
        self._published = None
        self._warned = False
        self._install()
        self._thread = threading.Thread(target=self._watch, name="vtensor-pool-engine", daemon=True)
        self._thread.start()

    # -- counting ------------------------------------------------------
    def _has_memory_free(self, block) -> bool:
        """A free block has memory when the prefix cache keeps it."""
        return self.caching and block.block_hash is not None

    def count(self) -> int:
        """Blocks with memory, counted from scratch."""
        return sum(1 for b in self.bp.blocks if not b.is_null and (b.ref_cnt > 0 or self._has_memory_free(b)))

    def _raw_free(self) -> int:
        return self.bp.free_block_queue.num_free_blocks

    def _used(self) -> int:
        return self.bp.num_gpu_blocks - 1 - self._raw_free()  # less the null block

    def _free_queue(self):
        q = self.bp.free_block_queue
        b = q.fake_free_list_head.next_free_block
        while b is not None and b is not q.fake_free_list_tail:
            yield b
            b = b.next_free_block

    def _cached_free(self, n: int) -> list:
        """Up to ``n`` free blocks that have memory, least recently used first (the queue's order)."""
        return list(itertools.islice((b for b in self._free_queue() if self._has_memory_free(b)), n))

    def view(self, fresh: bool = False):
        now = time.monotonic()
        if fresh or self._view is None or now - self._view_at > 0.005:
            self._view, self._view_at = self.ledger.peek(), now
        return self._view

    def room(self, fresh: bool = False) -> int:
        """Blocks this engine may still give memory to."""
        v = self.view(fresh)
        others = sum(e.committed for e in v.engines if e.slot != self.slot)
        me = next((e for e in v.engines if e.slot == self.slot), None)
        physical = me.physical // self.chunk if me is not None else 0
        limit = (v.pool_bytes - others) // self.chunk
        return max(0, max(limit, physical) - self.mem)

    # -- vLLM's block pool, bounded ---------------------------------------
    def _install(self) -> None:
        bp, kvm, sched, coordinator = self.bp, self.kvm, self.sched, self.kvm.coordinator
        orig = {n: getattr(bp, n) for n in ("get_num_free_blocks", "get_new_blocks", "free_blocks",
                                            "reset_prefix_cache", "evict_blocks", "get_usage")}
        orig_allocate, orig_schedule = kvm.allocate_slots, sched.schedule
        orig_preempt, orig_handle = sched._preempt_request, self.core._handle_client_request
        orig_to_allocate = coordinator.get_num_blocks_to_allocate

        def raw(name):
            def call(*args, **kwargs):
                self._raw += 1
                try:
                    return orig[name](*args, **kwargs)
                finally:
                    self._raw -= 1
            return call

        def get_num_blocks_to_allocate(*args, **kwargs) -> int:
            n = orig_to_allocate(*args, **kwargs)
            if not kwargs.get("apply_admission_cap"):  # an allocation follows (admission checks only look)
                self._asked = n
            return n

        def get_num_free_blocks() -> int:
            free = orig["get_num_free_blocks"]()
            asked, self._asked = self._asked, None
            if self._raw:
                return free
            if asked is not None and asked <= free and self._secure(asked):
                return free  # the memory for what vLLM is about to take is claimed: its own rules decide
            bounded = min(free, (self.mem - self._used()) + self.room())
            if asked is not None and asked <= free:
                bounded = min(bounded, asked - 1)  # the pool could not give it
            if bounded < free:
                self._limited = True
            return bounded

        def get_new_blocks(num_blocks: int):
            self._raw += 1
            try:
                self._claim_for(num_blocks)
                return orig["get_new_blocks"](num_blocks)
            finally:
                self._raw -= 1

        def free_blocks(ordered_blocks):
            blocks = list(ordered_blocks)
            orig["free_blocks"](blocks)
            gone = {b.block_id for b in blocks if getattr(b, "pool", bp) is bp and not b.is_null
                    and b.ref_cnt == 0 and not self._has_memory_free(b)}
            self.mem -= len(gone)

        def recounted(name):
            call = raw(name)

            def recount(*args, **kwargs):
                out = call(*args, **kwargs)
                self.mem = self.count()
                return out
            return recount

        def allocate_slots(request, num_new_tokens, *args, **kwargs):
            self._limited, self._asked = False, None
            out = orig_allocate(request, num_new_tokens, *args, **kwargs)
            if out is None and self._limited:
                self.short += math.ceil(num_new_tokens / self.block_size) + 1
            return out

        def schedule(*args, **kwargs):
            out = orig_schedule(*args, **kwargs)
            waiting_for_memory = self.short and not out.total_num_scheduled_tokens
            self.publish()
            if waiting_for_memory:  # nothing runs until another engine gives memory back: do not spin the CPU
                time.sleep(WAIT_S)
            return out

        def preempt(*args, **kwargs):
            self.preemptions += 1
            return orig_preempt(*args, **kwargs)

        def handle_client_request(*args, **kwargs):
            if self.pending:
                self._give_back()
            return orig_handle(*args, **kwargs)

        bp.get_num_free_blocks = get_num_free_blocks
        bp.get_new_blocks = get_new_blocks
        bp.free_blocks = free_blocks
        bp.reset_prefix_cache = recounted("reset_prefix_cache")
        bp.evict_blocks = recounted("evict_blocks")
        bp.get_usage = raw("get_usage")
        kvm.allocate_slots = allocate_slots
        coordinator.get_num_blocks_to_allocate = get_num_blocks_to_allocate
        sched.schedule = schedule
        sched._preempt_request = preempt
        self.core._handle_client_request = handle_client_request

    def _claim(self, blocks: int) -> bool:
        """Have the ledger hold the memory of ``blocks`` blocks for this engine (if the pool has room)."""
        if blocks <= self._claimed:
            return True
        if not self.ledger.commit(self.slot, claim=blocks * self.chunk):
            return False
        self._claimed = blocks
        return True

    def _fresh(self, n: int) -> tuple[int, int]:
        """Of the ``n`` free blocks vLLM would pop next: how many have no memory, and how few would if
        the free blocks that have memory went first."""
        heads = itertools.islice(self._free_queue(), n)
        return sum(1 for b in heads if not self._has_memory_free(b)), max(0, n - (self.mem - self._used()))

    def _secure(self, n: int) -> bool:
        """Before vLLM decides to take ``n`` free blocks: claim their memory (the claim and the decision are
        then one step: no other engine takes the room in between)."""
        fresh, least = self._fresh(n)
        return self._claim(self.mem + fresh) or (least < fresh and self._claim(self.mem + least))

    def _claim_for(self, n: int) -> None:
        """As vLLM pops ``n`` free blocks: claim the memory of those that have none (done already when
        :meth:`_secure` ran), handing out free blocks that have memory first when that is all the claim
        or the pool covers."""
        heads = list(itertools.islice(self._free_queue(), n))
        fresh = sum(1 for b in heads if not self._has_memory_free(b))
        if fresh and not self._claim(self.mem + fresh):
            kept = self._cached_free(n)
            chosen = kept + [b for b in heads if not self._has_memory_free(b)][:n - len(kept)]
            q = self.bp.free_block_queue
            for b in chosen:
                q.remove(b)
            q.prepend_n(chosen)  # vLLM pops these
            fresh = n - len(kept)
            if fresh and not self._claim(self.mem + fresh):  # vLLM takes them whatever the pool says: counted
                self.ledger.commit(self.slot, claim=(self.mem + fresh) * self.chunk, force=True)
                self._claimed = self.mem + fresh
                if not self._warned:
                    self._warned = True
                    logger.warning("vTensor pool: %d block(s) claimed beyond the shared pool's room; counted", fresh)
        self.mem += fresh

    def publish(self) -> None:
        used = self._used()
        figures = dict(claim=self.mem * self.chunk, used=used * self.chunk,
                       cached=max(0, self.mem - used) * self.chunk, want=self.short * self.chunk,
                       preemptions=self.preemptions)
        self.short = 0
        if figures != self._published or self._claimed != self.mem:  # a claim made for a step and not used too
            self.ledger.commit(self.slot, force=True, **figures)
            self._published = figures
        self._claimed = self.mem

    # -- giving back -------------------------------------------------------
    def _watch(self) -> None:
        from vllm.v1.engine import EngineCoreRequestType

        move_to_helper_cores()
        while True:
            time.sleep(POLL_S)
            try:
                v = self.ledger.peek()  # no lock, no system call: this runs beside the compute
                me = next((e for e in v.engines if e.slot == self.slot), None)
                if me is None or self.pending:
                    continue
                wanted = sum(e.want for e in v.engines if e.slot != self.slot)
                if wanted > v.free and (me.cached or me.physical > me.claim):  # another engine waits for memory
                    # idle: everything the cache keeps; busy: what is wanted, at least a quarter of the cache;
                    # and the idle chunks (reserve, lingering) either way
                    give = me.cached if not me.used else max(wanted - v.free, me.cached // 4)
                    self.trim = True
                elif me.cached and v.free < v.pool_bytes * SPARE:  # keep some of the pool free for whoever grows
                    give = int(v.pool_bytes * SPARE) - v.free
                else:
                    continue
                self.pending = -(-min(me.cached, give) // self.chunk) if me.cached else -1  # -1: nothing cached
                self.core.input_queue.put_nowait((EngineCoreRequestType.WAKEUP, None))
            except Exception:
                logger.exception("vTensor pool: watching the shared pool failed")

    def _give_back(self) -> None:
        """In the engine's thread: evict up to ``pending`` least recently used cached free blocks and have
        the worker give their memory back."""
        n, self.pending = max(0, self.pending), 0
        trim, self.trim = self.trim, False
        victims = self._cached_free(n)
        for b in victims:
            self.bp._maybe_evict_cached_block(b)
        self.mem -= len(victims)
        if not victims and not trim:
            return
        gone = self.core.model_executor.collective_rpc(drop_blocks_memory,
                                                       args=([b.block_id for b in victims], trim))
        self.publish()
        logger.debug("vTensor pool: %d cached block(s) (%.1f MiB) given back to pool %r for another engine",
                    len(victims), sum(gone) / 2**20, self.ledger.name)


def attach_engine(core) -> EngineShare | None:
    """In the engine core, once its scheduler exists: bound it by the pool its worker joined."""
    if settings.get("VTENSOR_POOL") is None:
        return None
    ledger = open_from_settings(None)  # the device is the worker's to name
    entry = ledger.find(os.getpid())
    if entry is None:
        raise PoolError(f"this engine's worker did not join pool {ledger.name!r}: run it with "
                        "--attention-backend VTENSOR and tensor parallel size 1")
    share = EngineShare(core, ledger, entry.slot, entry.chunk_bytes)
    share.publish()
    return share
