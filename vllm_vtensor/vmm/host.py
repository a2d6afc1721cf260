"""Host (CPU) backend: Linux ``memfd`` + ``mmap`` through ctypes.

* Physical memory is one sparse ``memfd`` file; a chunk is a slot of it,
  allocated by writing zeros into it and given back by punching a hole.
* A reservation is an anonymous ``PROT_READ | MAP_NORESERVE`` mapping: it costs
  no memory and reads as zeros.  Mapping a chunk overlays part of it with a
  ``MAP_SHARED | MAP_FIXED`` mapping of the chunk's slot; unmapping overlays the
  part with the read-only reserve again (never ``munmap``, which would leave a
  hole that faults).
* The same slot mapped at two addresses is the same memory (prefix sharing).
* Every mapping is ``MADV_DONTFORK``: a forked child does not share the chunks.
* Staged mappings (``stage=True``; off by default, as in the VTENSOR engine where
  ``VTENSOR_STAGE_MAPPINGS=1`` turns them on): mapping a chunk with its page tables filled (``MAP_POPULATE``)
  costs ~0.5 ms per 6 MB, and tearing them down again ~0.2 ms.  So each chunk,
  when created (in the pool's background thread, as a rule), also gets a
  populated mapping of its own outside every range; mapping it into a range
  then *moves* that mapping there with ``mremap`` (page tables move, nothing is
  refilled: ~0.03 ms), and unmapping moves it back out, ready for the next
  map.  A chunk mapped at a second address at once (a shared prefix) gets a
  fresh populated mapping there.  Moving out uses ``MREMAP_DONTUNMAP`` (Linux
  5.13+ for shared mappings), so the range never has a hole, not even for an
  instant, where another thread's ``mmap`` could land and then be overlaid;
  where the kernel refuses it, chunks are not moved out (unmapping overlays
  them, as without staging).
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import sys

from .base import VirtualRange, VMMBackend, VMMError

PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE, MAP_POPULATE = 0x4000, 0x8000
MADV_DONTFORK = 10
MADV_DONTNEED = 4
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 0x1, 0x2, 0x4
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            raise VMMError(f"the host VMM backend needs Linux (memfd + mmap); this is {sys.platform}")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p  # the default c_int would truncate addresses
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mremap.restype = ctypes.c_void_p
        libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        _libc = libc
    return _libc


def _check(ret, what: str) -> None:
    if ret == -1 or ret == _MAP_FAILED or ret is None:
        err = ctypes.get_errno()
        hint = " (out of memory or vm.max_map_count reached)" if err == errno.ENOMEM else ""
        raise VMMError(f"{what} failed: {os.strerror(err)}{hint}")


class HostBackend(VMMBackend):
    device = "cpu"

    def __init__(self, populate: bool = True, stage: bool = False):
        super().__init__()
        self._libc = _load_libc()
        self._populate = populate
        self._stage = stage and populate  # keep a populated mapping of each chunk to move in (module doc)
        self._staged: dict[int, int] = {}  # chunk -> address of its populated mapping outside every range
        self._placed: dict[int, int] = {}  # address in a range -> chunk mapped whole there
        self._placed_addrs: list[int] = []  # the keys of _placed, sorted
        self.moves = 0  # maps and unmaps done by moving a populated mapping (mremap)
        self._move_out = self._stage  # until the kernel refuses MREMAP_DONTUNMAP
        self._fd = os.memfd_create("vllm-vtensor-kv", os.MFD_CLOEXEC)
        self._file_slots = 0  # slots handed out so far (of the first chunk size seen)
        self._file_capacity = 0  # file length in slots; sparse beyond what was written
        self._slot_size: int | None = None
        self._free_slots: list[int] = []
        self._zeros = b""

    @property
    def granularity(self) -> int:
        return mmap.PAGESIZE

    # -- virtual ranges -------------------------------------------------
    def _reserve_at(self, addr: int, size: int, fixed: bool) -> int:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (MAP_FIXED if fixed else 0)
        ret = self._libc.mmap(addr or None, size, PROT_READ, flags, -1, 0)
        _check(ret, f"mmap(reserve {size} bytes)")
        _check(self._libc.madvise(ret, size, MADV_DONTFORK), "madvise(MADV_DONTFORK)")
        return ret

    def _reserve_new(self, size: int) -> int:
        return self._reserve_at(0, size, fixed=False)

    # -- physical chunks ------------------------------------------------
    def create_chunk(self, size: int, *, fill: bool = True) -> int:
        """A chunk of ``size`` bytes.  ``fill=False`` only reserves its place in the file (instant);
        :meth:`fill_chunk` must then run before the chunk is mapped, copied or zeroed (the
        deferred backend queues it that way)."""
        if self._slot_size is None:
            self._slot_size = size
        elif size != self._slot_size:
            raise ValueError(f"chunk size {size} differs from this backend's {self._slot_size}")
        with self._lock:
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                slot = self._file_slots
                self._file_slots += 1
                if self._file_slots > self._file_capacity:  # grow the (sparse) file geometrically
                    self._file_capacity = max(self._file_slots, 2 * self._file_capacity)
                    os.ftruncate(self._fd, self._file_capacity * size)
        if fill:
            self.fill_chunk(slot)
        return slot

    def fill_chunk(self, handle: int) -> None:
        """Give a chunk created with ``fill=False`` its memory (zeros), and its staged mapping when staging."""
        size = self._slot_size
        self._write_zeros(handle * size, size)
        if self._stage:
            addr = self._mmap_chunk(None, handle, size)
            with self._lock:
                self._staged[handle] = addr

    def _mmap_chunk(self, addr: int | None, handle: int, size: int) -> int:
        """A populated read-write mapping of ``size`` bytes of chunk ``handle``, at ``addr`` (fixed) or anywhere."""
        flags = MAP_SHARED | (MAP_FIXED if addr else 0) | (MAP_POPULATE if self._populate else 0)
        ret = self._libc.mmap(addr, size, PROT_READ | PROT_WRITE, flags, self._fd, handle * self._slot_size)
        _check(ret, f"mmap(map chunk {handle})")
        _check(self._libc.madvise(ret, size, MADV_DONTFORK), "madvise(MADV_DONTFORK)")
        return ret

    def _write_zeros(self, off: int, size: int) -> None:
        """Allocate (or clear) ``size`` bytes of the file with zeros written through ``pwrite``.

        Written pages are ready: mapping them later only fills page tables.  (``fallocate`` would
        leave them to be cleared by the first page fault, in whichever thread maps them first - on
        the critical path - and clearing in a fault costs about twice as much as writing here.)
        """
        if len(self._zeros) != size:
            self._zeros = bytes(size)
        done = 0
        try:
            while done < size:
                done += os.pwrite(self._fd, memoryview(self._zeros)[: size - done], off + done)
        except OSError as e:
            raise OSError(e.errno, f"cannot allocate {size} bytes of host memory for a KV chunk ({e.strerror}): "
                                   "lower the vTensor budget or free memory") from None

    def release_chunk(self, handle: int) -> None:
        size = self._slot_size
        with self._lock:
            staged = self._staged.pop(handle, None)
        if staged is not None:
            _check(self._libc.munmap(staged, size), "munmap(staged chunk)")
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        _check(self._libc.fallocate(self._fd, mode, handle * size, size), "fallocate(punch hole)")
        with self._lock:
            self._free_slots.append(handle)

    def copy_chunk(self, dst: int, src: int, size: int) -> None:
        data = os.pread(self._fd, size, src * self._slot_size)
        os.pwrite(self._fd, data, dst * self._slot_size)

    def zero_chunk(self, handle: int, size: int) -> None:
        self._write_zeros(handle * self._slot_size, size)  # the pages stay allocated and mapped

    # -- mapping -------------------------------------------------------
    def map(self, vr: VirtualRange, offset: int, handle: int, size: int) -> None:
        addr = vr.addr + offset
        whole = size == self._slot_size
        with self._lock:
            self._forget_placed(addr, addr + size)  # whatever was mapped there is replaced
            staged = self._staged.pop(handle, None) if whole else None
            if staged is not None:
                ret = self._libc.mremap(staged, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, addr)
                if ret != addr:
                    self._staged[handle] = staged  # still where it was
                    _check(-1, f"mremap(map chunk {handle})")
                self.moves += 1
            else:
                self._mmap_chunk(addr, handle, size)
            if whole and self._move_out:  # recorded for unmap to move it back out
                i = bisect.bisect_left(self._placed_addrs, addr)
                self._placed_addrs.insert(i, addr)
                self._placed[addr] = handle

    def release_pages(self, vr: VirtualRange, offset: int, size: int) -> None:
        # On a shared file mapping MADV_DONTNEED only drops the page-table entries: the memfd keeps the data
        _check(self._libc.madvise(vr.addr + offset, size, MADV_DONTNEED), "madvise(MADV_DONTNEED)")

    def unmap(self, vr: VirtualRange, offset: int, size: int) -> None:
        start, end = vr.addr + offset, vr.addr + offset + size
        with self._lock:
            if self._move_out:  # whole chunks placed here move back out, still populated, for their next map
                slot = self._slot_size
                moving: dict[int, int] = {}  # chunk -> address here (one place per chunk)
                i = bisect.bisect_left(self._placed_addrs, start)
                while i < len(self._placed_addrs) and self._placed_addrs[i] + slot <= end:
                    handle = self._placed[self._placed_addrs[i]]
                    if handle not in self._staged:
                        moving.setdefault(handle, self._placed_addrs[i])
                    i += 1
                if moving:
                    dst = self._reserve_at(0, len(moving) * slot, fixed=False)
                    for k, (handle, addr) in enumerate(moving.items()):
                        to = dst + k * slot
                        # DONTUNMAP: the old place stays mapped (no hole) until the overlay below
                        flags = MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP
                        if self._libc.mremap(addr, slot, slot, flags, to) == to:
                            self._staged[handle] = to
                            self.moves += 1
                        else:  # left in place (the overlay below unmaps it); its new place is not needed
                            refused = ctypes.get_errno() == errno.EINVAL
                            self._libc.munmap(to, slot)
                            if refused:  # an older kernel: stop trying, and give back the other places
                                self._move_out = False
                                if k + 1 < len(moving):
                                    self._libc.munmap(to + slot, (len(moving) - k - 1) * slot)
                                break
            self._forget_placed(start, end)
            self._reserve_at(start, size, fixed=True)  # reads as zeros again (and fills what moved out)

    def _forget_placed(self, start: int, end: int) -> None:
        """Drop the records of whole-chunk mappings overlapping ``[start, end)`` (being replaced)."""
        addrs = self._placed_addrs
        i = bisect.bisect_left(addrs, start - (self._slot_size or 0) + 1)
        j = bisect.bisect_left(addrs, end)
        for addr in addrs[i:j]:
            del self._placed[addr]
        del addrs[i:j]

    # -- access --------------------------------------------------------
    def as_tensor(self, addr: int, nbytes: int):
        import torch

        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=torch.uint8)

    def resident_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        with self._lock:
            for vr in self._ranges:
                self._libc.munmap(vr.addr, vr.size)
            self._ranges.clear()
            self._free_ranges.clear()
            for addr in self._staged.values():
                self._libc.munmap(addr, self._slot_size)
            self._staged.clear()
            self._placed.clear()
            self._placed_addrs.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
