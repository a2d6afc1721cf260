"""A KV memory pool shared by several engines: the cross-process ledger.

Engines started with the same ``VTENSOR_POOL=<name>`` on one device share one
physical budget, ``VTENSOR_POOL_BYTES``.  The ledger is a small file in the
user's private folder (``$TMPDIR/vllm-vtensor-<uid>/pool-<name>``, mode 0600),
read and written under ``flock``: a header (magic, pool bytes, device) and one
fixed-size entry per engine.  Two processes write an entry: the engine's worker
(the physical chunks it holds) and its scheduler (the blocks it has handed out,
its *claim*).  An engine commits ``max(claim, physical)``: the scheduler claims
memory before the worker creates it, and a block the scheduler has freed counts
until the worker has given its chunk back.  The engines' commitments never sum
past the pool: a claim or a new chunk that would is refused (the scheduler then
waits or preempts, as vLLM does when blocks run out).

Each part of an entry names its process by pid and start time; a part whose
process is gone (killed, even by ``kill -9``) counts as nothing and is wiped by
the next engine that reads the ledger.  No torch or vLLM imports.
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .settings import POOL_NAME

MAGIC = b"VTPOOL01"
_HEADER = struct.Struct("<8sq16sdi")  # magic, pool bytes, device, created at, entries
_OVERDRAWN = struct.Struct("<q")  # after the header: the most the commitments have summed past the pool
OVERDRAWN_AT = _HEADER.size
HEADER_BYTES = 64
_ENTRY = struct.Struct("<iiqqqqqqqqqqd32s")
ENTRY_BYTES = 128
MAX_ENGINES = 64
FILE_BYTES = HEADER_BYTES + MAX_ENGINES * ENTRY_BYTES
_FIELDS = ("engine_pid", "worker_pid", "engine_start", "worker_start", "chunk_bytes", "ceiling", "physical",
           "claim", "used", "cached", "want", "preemptions", "updated", "label")
_ENGINE_FIELDS = ("claim", "used", "cached", "want", "preemptions")  # written by the scheduler's process
_WORKER_FIELDS = ("physical",)  # written by the worker's process


class PoolError(RuntimeError):
    """The shared pool cannot be used as asked (its file, its size, its device): the message names the fix."""


def start_time(pid: int) -> int:
    """A process's start time (clock ticks since boot), which tells a live pid from a reused one; 0 if gone.

    A zombie counts as gone: it has exited and its memory is freed, but it keeps its pid and start time
    until its parent reaps it, and a killed engine's worker, whose parent died with it, waits for the
    system's init to do that (seen to take longer than 10 s in a container)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    fields = data[data.rindex(b")") + 2:].split()
    return 0 if fields[0] in (b"Z", b"X") else int(fields[19])


def alive(pid: int, start: int) -> bool:
    return pid > 0 and start_time(pid) == start


@dataclass
class Entry:
    """One engine on the pool (bytes throughout)."""
    slot: int
    engine_pid: int = 0
    worker_pid: int = 0
    engine_start: int = 0
    worker_start: int = 0
    chunk_bytes: int = 0
    ceiling: int = 0  # the engine's own KV limit (vLLM's --kv-cache-memory-bytes or --gpu-memory-utilization)
    physical: int = 0  # memory the worker holds: chunks in use, kept for the prefix cache, reserve, lingering
    claim: int = 0  # memory of the blocks the scheduler has handed out or keeps cached
    used: int = 0  # of which running requests' blocks
    cached: int = 0  # of which blocks only the prefix cache keeps
    want: int = 0  # memory the scheduler could not get in its last step (others give back when they can)
    preemptions: int = 0
    updated: float = 0.0
    label: str = ""

    @property
    def free(self) -> bool:
        return not (self.engine_pid or self.worker_pid)

    @property
    def committed(self) -> int:
        return max(self.claim, self.physical)

    def as_dict(self) -> dict:
        return asdict(self) | {"committed": self.committed}

    def _pack(self) -> bytes:
        values = [getattr(self, f) for f in _FIELDS]
        values[-1] = self.label.encode()[:32]
        return _ENTRY.pack(*values).ljust(ENTRY_BYTES, b"\0")

    @classmethod
    def _unpack(cls, slot: int, raw: bytes) -> "Entry":
        values = list(_ENTRY.unpack_from(raw))
        values[-1] = values[-1].rstrip(b"\0").decode(errors="replace")
        return cls(slot, **dict(zip(_FIELDS, values)))


@dataclass(frozen=True)
class PoolView:
    name: str
    pool_bytes: int
    device: str
    engines: tuple[Entry, ...]  # live ones only
    overdrawn: int = 0  # the most the commitments have ever summed past the pool (forced figures; 0 by design)

    @property
    def committed(self) -> int:
        return sum(e.committed for e in self.engines)

    @property
    def free(self) -> int:
        return self.pool_bytes - self.committed


def _header(raw: bytes) -> tuple:
    """Magic, pool bytes, device, created at, entries, overdrawn bytes."""
    return _HEADER.unpack_from(raw) + _OVERDRAWN.unpack_from(raw, OVERDRAWN_AT)


def pool_path(folder: Path, name: str) -> Path:
    if not POOL_NAME.fullmatch(name):
        raise PoolError(f"VTENSOR_POOL={name!r}: a pool name is 1-64 letters, digits, '.', '_' or '-'")
    return folder / f"pool-{name}"


class Ledger:
    """The pool file, opened (and created with ``pool_bytes`` if no engine uses the pool yet)."""

    def __init__(self, path: Path, name: str, pool_bytes: int | None, device: str | None):
        self.path, self.name, self.device = path, name, device
        self._thread_lock = threading.Lock()
        self.fd = self._open(pool_bytes)
        self._mm = mmap.mmap(self.fd, FILE_BYTES, prot=mmap.PROT_READ)
        with self._locked():
            header, entries = self._read()
            magic, size, dev, _, n, _ = header
            dev = dev.rstrip(b"\0").decode()
            live = [e for e in entries if not e.free]
            if pool_bytes is not None and size != pool_bytes:
                if live:
                    raise PoolError(
                        f"pool {name!r} is {size} bytes ({size / 2**30:.2f} GiB, set by the engine that created it) "
                        f"and VTENSOR_POOL_BYTES asks for {pool_bytes}: give the same size, leave VTENSOR_POOL_BYTES "
                        f"unset to join it, or name another pool")
                size = pool_bytes  # nobody uses it any more: the size is the newcomer's to choose
                os.pwrite(self.fd, _HEADER.pack(MAGIC, size, (device or dev).encode(), time.time(), MAX_ENGINES)
                          + _OVERDRAWN.pack(0), 0)
            elif device is not None and dev != device:
                if live:
                    raise PoolError(f"pool {name!r} is on {dev}, not {device}: "
                                    "an engine joins the pool of its own device; name another pool")
                os.pwrite(self.fd, _HEADER.pack(MAGIC, size, device.encode(), time.time(), MAX_ENGINES) + _OVERDRAWN.pack(0), 0)
            self.pool_bytes = size

    # -- the file ------------------------------------------------------
    def _open(self, pool_bytes: int | None) -> int:
        path = self.path
        if pool_bytes is not None and pool_bytes <= 0:
            raise PoolError(f"VTENSOR_POOL_BYTES={pool_bytes}: give the pool's size, such as 8GiB")
        for _ in range(2):
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                if pool_bytes is None or self.device is None:
                    raise PoolError(f"pool {self.name!r} does not exist yet: the first engine on it sets "
                                    "VTENSOR_POOL_BYTES (the pool's size, such as 8GiB)") from None
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                os.pwrite(fd, _HEADER.pack(MAGIC, pool_bytes, self.device.encode(), time.time(), MAX_ENGINES)
                          .ljust(FILE_BYTES, b"\0"), 0)
                try:
                    os.link(tmp, path)  # atomic: another engine creating it at the same time wins or loses whole
                except FileExistsError:
                    os.close(fd)
                    continue
                finally:
                    os.unlink(tmp)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
                os.close(fd)
                raise PoolError(f"{path} belongs to another user or others may read it: remove it, or name "
                                "another pool (VTENSOR_POOL)")
            if st.st_size != FILE_BYTES or os.pread(fd, 8, 0) != MAGIC:
                os.close(fd)
                raise PoolError(f"{path} is not a vllm-vtensor pool file of this version: remove it once no "
                                "engine runs, or name another pool")
            return fd
        raise PoolError(f"could not open {path}")

    @contextlib.contextmanager
    def _locked(self):
        # flock excludes other processes only: threads of this one (a worker's step and its chunk thread)
        # share the open file, so they take a thread lock first
        with self._thread_lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _read(self) -> tuple[tuple, list[Entry]]:
        """Header and entries, with the parts of dead processes wiped (under the lock)."""
        raw = os.pread(self.fd, FILE_BYTES, 0)
        header = _header(raw)
        entries = []
        for i in range(MAX_ENGINES):
            e = Entry._unpack(i, raw[HEADER_BYTES + i * ENTRY_BYTES:])
            changed = False
            if e.engine_pid and not alive(e.engine_pid, e.engine_start):
                e.engine_pid = e.engine_start = 0
                for f in _ENGINE_FIELDS:
                    setattr(e, f, 0)
                changed = True
            if e.worker_pid and not alive(e.worker_pid, e.worker_start):
                e.worker_pid = e.worker_start = 0
                e.physical = 0
                changed = True
            if changed:
                if e.free:
                    e = Entry(i)
                self._write(e)
            entries.append(e)
        return header, entries

    def _write(self, e: Entry) -> None:
        e.updated = time.time()
        os.pwrite(self.fd, e._pack(), HEADER_BYTES + e.slot * ENTRY_BYTES)

    # -- engines -------------------------------------------------------
    def join(self, *, engine_pid: int, chunk_bytes: int, ceiling: int, label: str,
             worker_pid: int | None = None) -> int:
        """The worker's process registers its engine (named by the engine core's pid); returns the slot."""
        worker_pid = os.getpid() if worker_pid is None else worker_pid
        with self._locked():
            _, entries = self._read()
            for e in entries:
                if e.engine_pid == engine_pid and e.worker_pid and e.worker_pid != worker_pid:
                    raise PoolError("VTENSOR_POOL serves engines with one worker each: run this engine with "
                                    "tensor parallel size 1, or without VTENSOR_POOL")
            slot = next((e.slot for e in entries if e.free), None)
            if slot is None:
                raise PoolError(f"pool {self.name!r} already serves {MAX_ENGINES} engines: name another pool")
            self._write(Entry(slot, engine_pid=engine_pid, engine_start=start_time(engine_pid),
                              worker_pid=worker_pid, worker_start=start_time(worker_pid),
                              chunk_bytes=chunk_bytes, ceiling=ceiling, label=label))
            return slot

    def find(self, engine_pid: int) -> Entry | None:
        """The entry the worker of the engine whose core runs as ``engine_pid`` made."""
        with self._locked():
            _, entries = self._read()
        return next((e for e in entries if e.engine_pid == engine_pid and e.worker_pid), None)

    def leave(self, slot: int) -> None:
        with self._locked():
            self._write(Entry(slot))

    def _entry(self, entries: list[Entry], slot: int) -> Entry:
        e = entries[slot]
        if e.free:
            raise PoolError(f"this engine's entry in pool {self.name!r} is gone (its processes were taken "
                            "for dead): restart the engine")
        return e

    def commit(self, slot: int, *, claim: int | None = None, physical: int | None = None,
               force: bool = False, **fields) -> bool:
        """Set the engine's claim and/or physical bytes, and any figures in ``fields``.

        Refused (False, nothing written) when the engine's commitment would grow and the pool's total
        pass its size, unless ``force`` (the figures are then the truth, to be counted even if over)."""
        with self._locked():
            header, entries = self._read()
            e = self._entry(entries, slot)
            before = e.committed
            new = Entry(**asdict(e))
            if claim is not None:
                new.claim = claim
            if physical is not None:
                new.physical = physical
            for k, v in fields.items():
                setattr(new, k, v)
            if new.committed > before:
                over = sum(o.committed for o in entries if o.slot != slot and not o.free) + new.committed - header[1]
                if over > 0 and not force:
                    return False
                if over > header[5]:
                    os.pwrite(self.fd, _OVERDRAWN.pack(over), OVERDRAWN_AT)
            self._write(new)
            return True

    def view(self) -> PoolView:
        with self._locked():
            header, entries = self._read()
        return self._view(header, entries)

    def _view(self, header, entries) -> PoolView:
        return PoolView(self.name, header[1], header[2].rstrip(b"\0").decode(), tuple(e for e in entries if not e.free),
                        header[5])

    def peek(self) -> PoolView:
        """The pool as last written, read from memory without the lock or any system call (for the engines'
        frequent looks; a dead engine's entry counts until the next locked call wipes it). Decisions that
        commit memory take the lock (:meth:`commit`)."""
        raw = self._mm[:FILE_BYTES]
        header = _header(raw)
        entries = (Entry._unpack(i, raw[HEADER_BYTES + i * ENTRY_BYTES:HEADER_BYTES + (i + 1) * ENTRY_BYTES])
                   for i in range(MAX_ENGINES))
        return self._view(header, entries)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def open_pool(name: str, pool_bytes: int | None, device: str | None, folder: Path | None = None) -> Ledger:
    from .stats import private_folder

    folder = private_folder() if folder is None else folder
    return Ledger(pool_path(folder, name), name, pool_bytes, device)


def list_pools(folder: Path | None = None) -> list[str]:
    from .stats import private_folder_path

    folder = private_folder_path() if folder is None else folder
    return sorted(p.name[5:] for p in folder.glob("pool-*") if POOL_NAME.fullmatch(p.name[5:]))
