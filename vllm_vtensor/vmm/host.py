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
"""
from __future__ import annotations

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

    def __init__(self, populate: bool = True):
        super().__init__()
        self._libc = _load_libc()
        self._populate = populate
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
    def create_chunk(self, size: int) -> int:
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
        self._write_zeros(slot * size, size)
        return slot

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
        flags = MAP_SHARED | MAP_FIXED | (MAP_POPULATE if self._populate else 0)
        addr = vr.addr + offset
        ret = self._libc.mmap(addr, size, PROT_READ | PROT_WRITE, flags, self._fd, handle * self._slot_size)
        _check(ret, f"mmap(map chunk {handle})")
        _check(self._libc.madvise(addr, size, MADV_DONTFORK), "madvise(MADV_DONTFORK)")

    def unmap(self, vr: VirtualRange, offset: int, size: int) -> None:
        self._reserve_at(vr.addr + offset, size, fixed=True)

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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
