"""Asynchronous prefetching of streamed weights into a fixed arena.

Units (one per decoder layer with streamed tensors, plus the lm_head when it
streams) are read in forward order, cyclically, by a producer thread into a
FIFO ring inside one page-aligned arena of ``arena_bytes``: at most
``window`` units ahead of the one computing, and never more than fits.  The
consumer (the model's forward hooks) takes a unit when its layer starts and
gives its space back when the layer ends.  With ``window == 0`` reads are
synchronous (the ablation).

Invariant: bytes of resident weights + ``arena_bytes`` <= the budget; the ring
never allocates outside the arena.

A :class:`HostTier` (``host_budget``) holds some streamed tensors in host memory, read from the
store once at load: on a CPU the producer copies those into the ring instead of reading them from
disk; on CUDA the host tier is pinned too and they are copied from it straight into the device
arena (no pass through the ring), the rest of a unit as before.

On a CUDA device the host arena is pinned (``cudaHostRegister``) and mirrored
by a device arena of the same size: after a unit's disk read lands in host
slot ``[start, start + size)``, the producer copies it to the same offsets of
the device arena on a side stream and records an event; the consumer's stream
waits on that event (the host never blocks on the copy) and the layer computes
on views of the device arena.  A device region is overwritten only after the
compute stream has passed the release of its previous unit, and a host region
is refilled only after its previous copy finished.  The device budget then
holds resident weights + the device arena; the host arena is staging memory.
"""
from __future__ import annotations

import collections
import ctypes
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from vllm_vtensor.log import get_logger
from vllm_vtensor.threads import move_to_helper_cores

from .store import WeightStore, aligned_buffer

logger = get_logger(__name__)


@dataclass
class Unit:
    key: str  # "layer.<i>" or "head"
    names: list[str]
    nbytes: int = 0  # padded bytes in the arena


@dataclass
class _Slot:
    seq: int
    unit: int
    start: int
    size: int
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    copied: object = None  # CUDA: event recorded after the host-to-device copy
    direct: dict = field(default_factory=dict)  # CUDA: arena offset -> host-tier bytes copied from there
    pending: int = 0  # AIO: its reads (a tensor's pieces) not finished yet


class HostTier:
    """Streamed tensors kept in one page-aligned host buffer (mlocked where the limit allows), read
    from the store once; :meth:`read_into` has the store's signature, so the producer reads a tensor
    from whichever holds it.  On CUDA the streamer pins the buffer and copies from it to the device
    straight (:meth:`bytes_of`), without passing through the staging ring."""

    def __init__(self, store: WeightStore, names: list[str], lock_memory: bool):
        self.index = {n: store.index[n] for n in names}
        self.offsets, off = {}, 0
        for n in names:
            self.offsets[n] = off
            off += self.index[n].padded
        self.nbytes = off
        self.buffer = aligned_buffer(off) if off else None
        self._view = memoryview(self.buffer) if off else None
        self._bytes = None
        self.locked = False
        if off:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
            self.locked = lock_memory and mlock(addr, len(self.buffer))
            for n in names:
                store.read_into(n, self._view[self.offsets[n]: self.offsets[n] + self.index[n].padded])

    def __contains__(self, name: str) -> bool:
        return name in self.offsets

    def read_into(self, name: str, buf: memoryview) -> int:
        e, off = self.index[name], self.offsets[name]
        buf[: e.padded] = self._view[off: off + e.padded]
        return e.nbytes

    def bytes_of(self, name: str) -> torch.Tensor:
        """Tensor ``name``'s padded bytes in the buffer, as a uint8 tensor (no copy)."""
        if self._bytes is None:
            self._bytes = torch.frombuffer(self.buffer, dtype=torch.uint8)
        off = self.offsets[name]
        return self._bytes[off: off + self.index[name].padded]


@dataclass
class StreamStats:
    bytes_streamed: int = 0  # read from disk
    bytes_from_host: int = 0  # copied from the host tier
    io_seconds: float = 0.0  # time during which reads were in flight
    wait_seconds: float = 0.0  # time compute waited for reads (I/O not hidden)
    units_read: int = 0
    units_skipped: int = 0
    forwards: int = 0
    bytes_copied_to_device: int = 0  # CUDA: host-to-device bytes on the side stream

    @property
    def overlap(self) -> float:
        return 0.0 if self.io_seconds == 0 else max(0.0, 1.0 - self.wait_seconds / self.io_seconds)


def mlock(addr: int, nbytes: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes)) == 0


def _pin(addr: int, nbytes: int) -> bool:
    """Page-lock host memory for CUDA (true asynchronous DMA copies); False if the driver refuses."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(addr, nbytes, 0)) == 0
    except (AttributeError, RuntimeError):  # a PyTorch build without the binding
        return False


class Streamer:
    def __init__(self, store: WeightStore, units: list[Unit], arena_bytes: int, *, window: int, io_threads: int,
                 lock_memory: bool, device: str | torch.device = "cpu", host: HostTier | None = None):
        for u in units:
            u.nbytes = sum(store.index[n].padded for n in u.names)
        biggest = max(u.nbytes for u in units)
        if arena_bytes < biggest:
            raise ValueError(f"stream arena {arena_bytes} bytes cannot hold a unit of {biggest} bytes")
        self.store, self.units, self.window = store, units, window
        self.host = host
        self.arena = aligned_buffer(arena_bytes)
        self.capacity = len(self.arena)
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(self.arena))
        self.locked = lock_memory and mlock(self._addr, self.capacity)
        self._view = memoryview(self.arena)
        self._byte_tensor = torch.frombuffer(self.arena, dtype=torch.uint8)
        self.device = torch.device(device)
        self.pinned = False
        self._dev_arena = None
        self._host_addr = None  # CUDA: the host tier, pinned (its tensors are copied to the device from it)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self.pinned = _pin(self._addr, self.capacity)
            if host is not None and host.buffer is not None:
                addr = ctypes.addressof(ctypes.c_char.from_buffer(host.buffer))
                if _pin(addr, len(host.buffer)):
                    self._host_addr = addr
            if not self.pinned:
                logger.warning("flexinfer: cudaHostRegister refused the %d-byte staging arena; host-to-device "
                               "copies will not overlap with compute", self.capacity)
            self._dev_arena = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
            self._copy_stream = torch.cuda.Stream(self.device)
            self._freed = None  # compute-stream event at the latest release: device space reusable after it
            self._issued: list[_Slot] = []  # slots whose copies may still read host space (producer-owned)
        elif self.device.type != "cpu":
            raise ValueError(f"flexinfer streams to 'cpu' or 'cuda' devices, not {self.device}")
        self._ring: collections.deque[_Slot] = collections.deque()
        self._cond = threading.Condition()
        self._in_flight, self._busy_since = 0, 0.0  # units being read; since when some have been
        self._next_seq = 0
        self._closed = False
        self.stats = StreamStats()
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # see tensors()
        self._thread = None
        self._start_readers(io_threads)

    def _start_readers(self, io_threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="flexinfer-io",
                                        initializer=move_to_helper_cores)
        self._max_in_flight = max(1, io_threads)  # units whose reads may run at once
        if self.window > 0:
            self._thread = threading.Thread(target=self._produce_loop, name="flexinfer-prefetch", daemon=True)
            self._thread.start()

    # -- the ring ----------------------------------------------------------
    def _place(self, size: int) -> int | None:
        """Start offset for ``size`` bytes at the ring's tail, or None when it does not fit yet."""
        if not self._ring:
            return 0
        head, tail = self._ring[0].start, self._ring[-1].start + self._ring[-1].size
        if self._ring[-1].start >= head:  # not wrapped: free space is [tail, cap) and [0, head)
            if tail + size <= self.capacity:
                return tail
            return 0 if size <= head else None
        return tail if tail + size <= head else None  # wrapped: free space is [tail, head)

    def _read(self, slot: _Slot) -> None:
        self._finish(self._submit(slot))

    def _submit(self, slot: _Slot) -> tuple:
        """Start reading ``slot``'s tensors (disk reads on the I/O threads; host-tier copies here)."""
        if self._dev_arena is not None:  # host space still being copied out must not be overwritten
            end, still = slot.start + slot.size, []
            for old in self._issued:
                if old.start < end and slot.start < old.start + old.size:
                    old.copied.synchronize()
                elif not old.copied.query():
                    still.append(old)
            self._issued = still
        with self._cond:
            if not self._in_flight:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        futures, from_host, error = [], 0, None
        try:
            off = slot.start
            for name in self.units[slot.unit].names:
                e = self.store.index[name]
                if self.host is not None and name in self.host:
                    if self._dev_arena is not None:
                        slot.direct[off] = self.host.bytes_of(name)  # copied to the device from there
                        from_host += e.nbytes
                    else:
                        from_host += self.host.read_into(name, self._view[off : off + e.padded])
                else:
                    futures.append(self._pool.submit(self.store.read_into, name, self._view[off : off + e.padded]))
                off += e.padded
        except BaseException as e:  # surfaced to the consumer by _finish, never lost in a thread
            error = e
        return slot, futures, from_host, error

    def _count_io_seconds(self) -> None:
        """Reads have been in flight since the last mark: that time is counted now (reads kept in flight
        throughout, that never all drain, count too)."""
        now = time.perf_counter()
        self.stats.io_seconds += now - self._busy_since
        self._busy_since = now

    def _finish(self, reading: tuple) -> None:
        """Wait for a unit's reads (in submission order), copy it to the device, and mark it ready."""
        slot, futures, from_host, error = reading
        try:
            n = 0
            for f in futures:
                try:
                    n += f.result()
                except BaseException as e:
                    error = error or e
            with self._cond:
                self._in_flight -= 1
                self._count_io_seconds()
                if error is None:
                    self.stats.bytes_streamed += n
                    self.stats.bytes_from_host += from_host
                    self.stats.units_read += 1
            if error is None and self._dev_arena is not None:
                self._copy_to_device(slot)
        except BaseException as e:
            error = error or e
        with self._cond:
            slot.error = error
            slot.ready.set()
            self._cond.notify_all()  # a consumer may be waiting to skip past it

    def _copy_to_device(self, slot: _Slot) -> None:
        with self._cond:
            freed = self._freed
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            if freed is not None:
                self._copy_stream.wait_event(freed)  # the region's previous unit has been computed
            for start, src, pinned in self._copy_sources(slot):
                self._dev_arena[start : start + src.numel()].copy_(src, non_blocking=pinned)
            slot.copied = torch.cuda.Event()
            slot.copied.record(self._copy_stream)
        self._issued.append(slot)
        with self._cond:
            self.stats.bytes_copied_to_device += slot.size

    def _copy_sources(self, slot: _Slot) -> list[tuple[int, torch.Tensor, bool]]:
        """``(arena offset, host bytes, pinned)`` to copy to the device for ``slot``: runs of the staging
        ring its disk reads filled, and host-tier tensors from the host tier itself."""
        if not slot.direct:
            return [(slot.start, self._byte_tensor[slot.start : slot.start + slot.size], self.pinned)]
        sources, run, off = [], None, slot.start
        for name in self.units[slot.unit].names:
            padded = self.store.index[name].padded
            if off in slot.direct:
                if run is not None:
                    sources.append((run, self._byte_tensor[run:off], self.pinned))
                    run = None
                sources.append((off, slot.direct[off], self._host_addr is not None))
            elif run is None:
                run = off
            off += padded
        if run is not None:
            sources.append((run, self._byte_tensor[run:off], self.pinned))
        return sources

    def _enqueue(self) -> _Slot | None:
        """Reserve ring space for the next unit in cyclic order (caller holds the lock)."""
        unit = self._next_seq % len(self.units)
        start = self._place(self.units[unit].nbytes)
        if start is None:
            return None
        slot = _Slot(self._next_seq, unit, start, self.units[unit].nbytes)
        self._next_seq += 1
        self._ring.append(slot)
        return slot

    def _produce_loop(self) -> None:
        """Read ahead up to ``window`` units, with up to ``io_threads`` units' reads in flight at once (a unit
        of one small tensor alone would leave the disk idle between reads), finished in order."""
        move_to_helper_cores()
        reading: collections.deque[tuple] = collections.deque()
        while True:
            with self._cond:
                while not self._closed and not reading and not self._room_for_next():
                    self._cond.wait()
                if self._closed:
                    break
                slot = self._enqueue() if len(reading) < self._max_in_flight and self._room_for_next() else None
                if slot is not None:
                    self._cond.notify_all()  # a consumer may be waiting for this unit to appear
            if slot is not None:
                reading.append(self._submit(slot))
            else:
                self._finish(reading.popleft())
        for r in reading:  # closing: let the reads in flight end before the arena goes
            self._finish(r)

    def _room_for_next(self) -> bool:
        """Whether the next unit may be read ahead now (caller holds the lock)."""
        return len(self._ring) <= self.window and self._place(self.units[self._next_seq % len(self.units)].nbytes) is not None

    # -- the consumer ------------------------------------------------------
    def acquire(self, unit: int) -> _Slot:
        """The slot holding ``unit``, waiting for its read; older slots are dropped."""
        t0 = time.perf_counter()
        with self._cond:
            while True:
                while self._ring and self._ring[0].unit != unit and self._ring[0].ready.is_set():
                    self._ring.popleft()  # a unit the model did not use this time (e.g. no logits)
                    self.stats.units_skipped += 1
                    self._cond.notify_all()
                if self._ring and self._ring[0].unit != unit:  # its reads still land in its space: wait for them
                    self._cond.wait()
                    continue
                if self._ring:
                    slot = self._ring[0]
                    break
                if self._thread is None:  # synchronous mode: read it now
                    self._next_seq = unit
                    slot = self._enqueue()
                    break
                self._cond.wait()
        if self._thread is None:
            self._read(slot)
        slot.ready.wait()
        with self._cond:
            self.stats.wait_seconds += time.perf_counter() - t0
        if slot.error is not None:
            raise RuntimeError(f"flexinfer could not read {self.units[unit].key}") from slot.error
        if slot.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.copied)  # GPU-side wait; the host runs on
        return slot

    @property
    def device_arena_bytes(self) -> int:
        """Bytes of the arena's mirror in device memory (0 when streaming to the CPU)."""
        return 0 if self._dev_arena is None else self._dev_arena.numel()

    def tensors(self, slot: _Slot) -> dict[str, torch.Tensor]:
        """Views of ``slot``'s tensors (in the device arena on CUDA), valid until :meth:`release`.  A unit
        lands at the same few ring offsets pass after pass, so the views are kept per (unit, offset):
        making them took ~15 us per layer of the computing thread's time."""
        key = (slot.unit, slot.start)
        out = self._views.get(key)
        if out is None:
            if len(self._views) > 8 * len(self.units):  # offsets that do not repeat: start over
                self._views.clear()
            arena = self._byte_tensor if self._dev_arena is None else self._dev_arena
            out, off = {}, slot.start
            for name in self.units[slot.unit].names:
                e = self.store.index[name]
                out[name] = arena[off : off + e.nbytes].view(e.torch_dtype).view(e.shape)
                off += e.padded
            self._views[key] = out
        return dict(out)

    def release(self, slot: _Slot) -> None:
        """Give ``slot``'s space back (call after the work that reads it has been issued)."""
        freed = None
        if self._dev_arena is not None:
            freed = torch.cuda.Event()
            freed.record(torch.cuda.current_stream(self.device))
        with self._cond:
            if freed is not None:
                self._freed = freed
            if self._ring and self._ring[0] is slot:
                self._ring.popleft()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True)
        if self._dev_arena is not None:
            self._copy_stream.synchronize()
            if self.pinned:
                torch.cuda.cudart().cudaHostUnregister(self._addr)
                self.pinned = False
            if self._host_addr is not None:
                torch.cuda.cudart().cudaHostUnregister(self._host_addr)
                self._host_addr = None
