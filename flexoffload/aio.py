"""Weight streaming on a CPU with glibc's POSIX AIO (``aio_read``): reader threads that are not Python's.

Every Python thread beside the model takes the GIL from it at each hand-off: with FlexInfer's
prefetch thread and reader pool, a decode whose reads cost nothing (read calls replaced by no-ops)
ran 25% slower than the same decode reading inline, on a 2-core machine.  glibc runs each
``aio_read`` on a C thread of its own, which never takes the GIL; the computing thread queues a read
in about a microsecond and checks it without a system call.  glibc serialises the requests of one
file descriptor in submission order, so a streamer reads through ``lanes`` descriptors of the store,
one request in flight on each: units finish in the order the model needs them.  Its threads are
started from the helper cores (:func:`vllm_vtensor.threads.helper_cores`; a thread inherits the
cores of the thread that starts it), so the kernel's share of each read runs beside the model, not
on its cores.  ctypes releases the GIL around each call.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
import time
from dataclasses import dataclass

import torch

from vllm_vtensor.threads import helper_cores

from .runtime import HostTier, Streamer, Unit, _Slot
from .store import ALIGN, WeightStore

_SIGEV_NONE = 1
_IDLE_SECONDS = 10**8  # glibc's reader threads stay (one started later would inherit the computing thread's cores)


class _Sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int), ("pad", ctypes.c_byte * 48)]


class _Aiocb(ctypes.Structure):  # glibc's struct aiocb on 64-bit Linux
    _fields_ = [("fildes", ctypes.c_int), ("lio_opcode", ctypes.c_int), ("reqprio", ctypes.c_int),
                ("buf", ctypes.c_void_p), ("nbytes", ctypes.c_size_t), ("sigevent", _Sigevent),
                ("next_prio", ctypes.c_void_p), ("abs_prio", ctypes.c_int), ("policy", ctypes.c_int),
                ("error_code", ctypes.c_int), ("return_value", ctypes.c_ssize_t), ("offset", ctypes.c_int64),
                ("reserved", ctypes.c_char * 32)]


class _Aioinit(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("threads", "num", "locks", "usedba", "debug", "numusers", "idle_time",
                                            "reserved")]


_libc = ctypes.CDLL(None, use_errno=True)
_init_lock = threading.Lock()
_initialised = False
_unavailable: str | None = None
_checked = False


class AioUnavailable(OSError):
    """glibc's POSIX AIO cannot be used here; the message says why."""


def unavailable_reason() -> str | None:
    """Why glibc's POSIX AIO cannot be used in this process, or None when it can (checked once)."""
    global _checked, _unavailable
    if not _checked:
        _checked = True
        if platform.architecture()[0] != "64bit" or ctypes.sizeof(_Aiocb) != 168:
            _unavailable = "the aiocb layout is known for 64-bit Linux only"
        else:
            try:
                _libc.gnu_get_libc_version.restype = ctypes.c_char_p
                version = _libc.gnu_get_libc_version().decode()
                if tuple(int(x) for x in version.split(".")[:2]) < (2, 34):  # aio_* in libc itself from 2.34
                    _libc_rt = ctypes.CDLL("librt.so.1", use_errno=True)
                    for name in ("aio_init", "aio_read", "aio_error", "aio_return", "aio_suspend"):
                        setattr(_libc, name, getattr(_libc_rt, name))
                for name in ("aio_init", "aio_read", "aio_error", "aio_return", "aio_suspend"):
                    getattr(_libc, name)
                _libc.aio_return.restype = ctypes.c_ssize_t  # a tensor may pass 2 GiB
            except (AttributeError, OSError, ValueError) as e:
                _unavailable = f"not glibc's POSIX AIO ({e})"
    return _unavailable


class Lanes:
    """``count`` descriptors of one file, each with at most one glibc read in flight (glibc runs the
    requests of a descriptor one after another, in order), on reader threads started from the helper
    cores."""

    def __init__(self, path, count: int, direct_io: bool):
        reason = unavailable_reason()
        if reason is not None:
            raise AioUnavailable(reason)
        flags = os.O_RDONLY | (os.O_DIRECT if direct_io else 0)
        self.fds = [os.open(path, flags) for _ in range(count)]
        self._start_readers()

    def _start_readers(self) -> None:
        """Start glibc's reader threads from the helper cores (a thread inherits the cores of the thread
        that starts it, and glibc starts one when a read finds no idle one): one read per lane, each
        blocked on a pipe until all are queued, makes glibc start a thread per lane now.  The first
        streamer of a process also caps glibc's threads at its lanes, so none is started later from
        the computing thread, on its cores, while they run (glibc ends a reader woken with no work
        left, a race under load; the next read then starts one again where it is queued)."""
        global _initialised
        with _init_lock:
            if not _initialised:  # takes effect before glibc's first request only
                _libc.aio_init(ctypes.byref(_Aioinit(threads=len(self.fds), num=64, idle_time=_IDLE_SECONDS)))
                _initialised = True
            me = threading.get_native_id()
            mine = os.sched_getaffinity(me)
            try:
                os.sched_setaffinity(me, helper_cores())
            except OSError:
                pass  # the readers start where this thread runs
            pipes = [os.pipe() for _ in self.fds]
            byte = ctypes.create_string_buffer(len(pipes))
            try:
                held = []
                for i, (r, _) in enumerate(pipes):
                    cb = _Aiocb(fildes=r, buf=ctypes.addressof(byte) + i, nbytes=1, offset=0)
                    cb.sigevent.notify = _SIGEV_NONE
                    if _libc.aio_read(ctypes.byref(cb)) == 0:
                        held.append(cb)
                for _, w in pipes:
                    os.write(w, b"x")
                for cb in held:
                    while not self.done(cb):
                        self.wait([cb])
                    self.result(cb)
            finally:
                for fds in pipes:
                    for fd in fds:
                        os.close(fd)
                os.sched_setaffinity(me, mine)

    def read(self, lane: int, addr: int, nbytes: int, offset: int) -> _Aiocb:
        """Queue a read on ``lane``; the returned control block must live until it is done."""
        cb = _Aiocb(fildes=self.fds[lane], buf=addr, nbytes=nbytes, offset=offset)
        cb.sigevent.notify = _SIGEV_NONE
        if _libc.aio_read(ctypes.byref(cb)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"aio_read failed: {os.strerror(err)}")
        return cb

    @staticmethod
    def done(cb: _Aiocb) -> bool:
        return _libc.aio_error(ctypes.byref(cb)) != errno.EINPROGRESS

    @staticmethod
    def result(cb: _Aiocb) -> int:
        """Bytes read, or -errno (call once, when :meth:`done`)."""
        err = _libc.aio_error(ctypes.byref(cb))
        n = _libc.aio_return(ctypes.byref(cb))
        return -err if err else n

    @staticmethod
    def wait(cbs: list[_Aiocb]) -> None:
        """Block until one of ``cbs`` is done (the GIL released)."""
        arr = (ctypes.POINTER(_Aiocb) * len(cbs))(*[ctypes.pointer(cb) for cb in cbs])
        if _libc.aio_suspend(arr, len(cbs), None) != 0 and ctypes.get_errno() not in (errno.EINTR, errno.EAGAIN):
            err = ctypes.get_errno()
            raise OSError(err, f"aio_suspend failed: {os.strerror(err)}")

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@dataclass
class _Read:
    slot: _Slot
    name: str
    lane: int
    start: int  # arena offset of this piece of the tensor
    offset: int  # its file offset
    size: int  # its bytes (4096-aligned)
    need: int  # of which the tensor's own (the rest is padding; a read may end at the end of the file)
    done: int = 0  # bytes read so far (a read that ends early is continued)
    cb: _Aiocb | None = None  # the request in flight


class AioStreamer(Streamer):
    """A CPU streamer whose reads run on glibc's reader threads (:class:`Lanes`, ``io_threads`` of them),
    queued and checked by the thread that computes, in the hooks it already runs: no Python thread
    beside the model.  Reads ahead are queued as ring space frees up (at :meth:`release`), in the
    order the model needs them; finished ones are collected at every :meth:`acquire`/:meth:`release`
    and waited for only when the unit a layer needs is not in.  Host-tier tensors are copied at
    submission, in that thread.  Every method is called from one thread (the model's forward);
    ``io_seconds`` counts the time reads were in flight as seen from there (at layer boundaries)."""

    def __init__(self, store: WeightStore, units: list[Unit], arena_bytes: int, *, window: int, io_threads: int,
                 lock_memory: bool, host: HostTier | None = None, device: str | torch.device = "cpu"):
        if torch.device(device).type != "cpu":
            raise ValueError("glibc's AIO reads feed a CPU arena; streaming to a GPU uses the reader threads "
                             "(io_engine 'threads')")
        super().__init__(store, units, arena_bytes, window=window, io_threads=io_threads, lock_memory=lock_memory,
                         device=device, host=host)

    def _start_readers(self, io_threads: int) -> None:
        self._lanes = Lanes(self.store.path, max(1, io_threads), self.store.direct_io)
        self._reads: list[_Read] = []  # in flight, in submission order
        self._lane = 0  # the lane of the next piece
        self._unit_pieces: dict[int, list[tuple]] = {}  # see _pieces

    def _issue(self, slot: _Slot) -> None:
        """Queue ``slot``'s disk reads (host-tier tensors are copied now)."""
        reads, lanes = [], len(self._lanes.fds)
        for name, at, offset, size, need in self._pieces(slot.unit):
            start = slot.start + at
            if offset is None:  # a host-tier tensor
                self.stats.bytes_from_host += self.host.read_into(name, self._view[start: start + size])
                continue
            reads.append(_Read(slot, name, self._lane, start, offset, size, need))
            self._lane = (self._lane + 1) % lanes
        slot.pending = len(reads)
        if not reads:
            self._finish_slot(slot)
        for r in reads:
            self._queue(r)

    def _pieces(self, unit: int) -> list[tuple]:
        """``unit``'s reads as ``(name, arena offset from the unit's start, file offset, bytes, bytes of the
        tensor's own)``, the file offset None for a host-tier tensor (copied, not read); made once per
        unit.  A tensor of 256 KiB or more per lane is read in one piece per lane: glibc gives each
        lane's requests to one thread in order, so whole tensors dealt to lanes in turn left one lane
        behind the other where a unit's tensors differ in size (a reader thread idle while the other
        read the unit needed next)."""
        pieces = self._unit_pieces.get(unit)
        if pieces is None:
            pieces, off, lanes = [], 0, len(self._lanes.fds)
            for name in self.units[unit].names:
                e = self.store.index[name]
                if self.host is not None and name in self.host:
                    pieces.append((name, off, None, e.padded, None))
                else:
                    n = lanes if e.padded >= lanes * (256 << 10) else 1
                    size = -(-e.padded // n // ALIGN) * ALIGN
                    pieces += [(name, off + at, e.offset + at, min(size, e.padded - at), max(0, min(size, e.nbytes - at)))
                               for at in range(0, e.padded, size)]
                off += e.padded
            self._unit_pieces[unit] = pieces
        return pieces

    def _queue(self, r: _Read) -> None:
        if not self._reads:
            self._busy_since = time.perf_counter()
        self._read_rest(r)
        self._reads.append(r)

    def _read_rest(self, r: _Read) -> None:
        r.cb = self._lanes.read(r.lane, self._addr + r.start + r.done, r.size - r.done, r.offset + r.done)

    def _collect(self) -> None:
        """Account the reads that have finished.  A lane's reads finish in the order they were queued, so
        the scan stops at the first unfinished read of each lane (a read continued after ending early
        is queued again, behind its lane's later ones: the scan then waits for it, which is safe)."""
        still, blocked, lanes = [], set(), len(self._lanes.fds)
        for i, r in enumerate(self._reads):
            if r.lane in blocked or not self._lanes.done(r.cb):
                blocked.add(r.lane)
                still.append(r)
                if len(blocked) == lanes:
                    still += self._reads[i + 1:]
                    break
                continue
            res = self._lanes.result(r.cb)
            if res < 0:
                r.slot.error = r.slot.error or OSError(-res, f"reading {r.name} from {self.store.path}: "
                                                             f"{os.strerror(-res)}")
            else:
                r.done += res
                if 0 < res and r.done < r.size:  # ended early: read the rest
                    self._read_rest(r)
                    still.append(r)
                    continue
                if r.done < r.need:
                    e = self.store.index[r.name]
                    r.slot.error = r.slot.error or OSError(
                        f"short read of {r.name} from {self.store.path}: {r.done} of the {r.need} bytes from byte "
                        f"{r.offset - e.offset} of its {e.nbytes} (file damaged?)")
                else:
                    self.stats.bytes_streamed += r.need
            r.slot.pending -= 1
            if not r.slot.pending:
                self._finish_slot(r.slot)
        if self._reads:
            self._count_io_seconds()
        self._reads = still

    def _wait_for(self, slot: _Slot) -> None:
        while True:
            self._collect()
            if slot.ready.is_set():
                return
            self._lanes.wait([r.cb for r in self._reads if r.slot is slot])

    def _finish_slot(self, slot: _Slot) -> None:
        if slot.error is None:
            self.stats.units_read += 1
        slot.ready.set()

    def _read_ahead(self) -> None:
        while self.window > 0 and not self._closed and self._room_for_next():
            self._issue(self._enqueue())

    def acquire(self, unit: int) -> _Slot:
        t0 = time.perf_counter()
        self._collect()
        while self._ring and self._ring[0].unit != unit:  # units the model did not use this time
            self._wait_for(self._ring[0])  # its reads still land in its space
            self._ring.popleft()
            self.stats.units_skipped += 1
        if not self._ring:  # synchronous reads, or the unit wanted was not ahead: read from it on
            self._next_seq = unit
            self._issue(self._enqueue())
        slot = self._ring[0]
        self._read_ahead()
        self._wait_for(slot)
        self.stats.wait_seconds += time.perf_counter() - t0
        if slot.error is not None:
            raise RuntimeError(f"flexinfer could not read {self.units[unit].key}") from slot.error
        return slot

    def release(self, slot: _Slot) -> None:
        if self._ring and self._ring[0] is slot:
            self._ring.popleft()
        self._collect()
        self._read_ahead()

    def close(self) -> None:
        self._closed = True
        while self._reads:  # the arena must outlive every read into it
            self._collect()
            if self._reads:
                self._lanes.wait([r.cb for r in self._reads])
        self._lanes.close()
