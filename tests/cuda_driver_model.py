"""A model of the CUDA driver's virtual memory calls, as ``cuda.bindings.driver`` presents them, for
running :class:`vllm_vtensor.vmm.cuda.CudaBackend` on a machine without a GPU.

It keeps the rules the driver documents and checks them on every call: a mapping covers a whole
physical allocation at a reserved, unmapped address; ``cuMemSetAccess`` and ``cuMemUnmap`` cover whole
mappings; a mapping is accessible only once access was set; a range is freed only when nothing is
mapped in it; an allocation is released once. Drivers differ in what they accept, so it can be told
to refuse a ``cuMemSetAccess`` or ``cuMemUnmap`` over several mappings (``one_mapping_per_call``),
read-only access (``refuse_read_only``), or to run out of memory after some allocations
(``memory_chunks``). Memory contents are modelled per allocation as one fill value (what
``cuMemsetD8`` wrote, or what a copy brought), enough to follow zeroing and copies.

It is not the GPU: timings, concurrency with kernels and the real driver's quirks are what the GPU
tests (``-m gpu``) check.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import threading
import types
from dataclasses import dataclass, field


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NOT_PERMITTED = 800


@dataclass
class _Location:
    type: object = None
    id: int = 0


@dataclass
class CUmemAllocationProp:
    type: object = None
    location: _Location = field(default_factory=_Location)


@dataclass
class CUmemAccessDesc:
    location: _Location = field(default_factory=_Location)
    flags: object = None


READ = "CU_MEM_ACCESS_FLAGS_PROT_READ"
READWRITE = "CU_MEM_ACCESS_FLAGS_PROT_READWRITE"


@dataclass
class Mapping:
    addr: int
    size: int
    handle: int
    access: str | None = None  # READ or READWRITE once set


class DriverModel:
    """Module-like: the functions and types ``vllm_vtensor.vmm.cuda`` calls through ``cu``."""

    def __init__(self, granularity: int = 2 << 20, *, one_mapping_per_call: bool = False,
                 refuse_read_only: bool = False, memory_chunks: int | None = None):
        self.gran = granularity
        self.one_mapping_per_call = one_mapping_per_call
        self.refuse_read_only = refuse_read_only
        self.memory_chunks = memory_chunks  # allocations (of any size) the device has room for
        self.CUresult = CUresult
        self.CUmemAllocationProp = CUmemAllocationProp
        self.CUmemAccessDesc = CUmemAccessDesc
        self.CUmemAllocationType = types.SimpleNamespace(CU_MEM_ALLOCATION_TYPE_PINNED="PINNED")
        self.CUmemLocationType = types.SimpleNamespace(CU_MEM_LOCATION_TYPE_DEVICE="DEVICE")
        self.CUmemAccess_flags = types.SimpleNamespace(CU_MEM_ACCESS_FLAGS_PROT_READ=READ,
                                                       CU_MEM_ACCESS_FLAGS_PROT_READWRITE=READWRITE)
        self.CUmemAllocationGranularity_flags = types.SimpleNamespace(CU_MEM_ALLOC_GRANULARITY_MINIMUM="MINIMUM")
        self.reserved: dict[int, int] = {}  # address -> size
        self.allocations: dict[int, int] = {}  # handle -> size (created, not released)
        self.released_unmapped: set[int] = set()  # released while still mapped: freed at its last unmap
        self.contents: dict[int, int | None] = {}  # handle -> fill value (None: never written)
        self.mappings: dict[int, Mapping] = {}  # address -> mapping
        self.calls: dict[str, int] = {}
        self._next_addr = 1 << 40
        self._next_handle = 1
        # the driver is thread-safe (a KV space's unmapping thread calls it beside the worker): one call at a time
        self.lock = threading.RLock()
        self.unmapping_threads: set[str] = set()  # names of the threads that called cuMemUnmap
        for name in dir(self):
            if name.startswith(("cu", "check_", "mapping_at")):
                setattr(self, name, self._locked(getattr(self, name)))

    def _locked(self, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with self.lock:
                return fn(*args, **kwargs)
        return call

    # -- bookkeeping ------------------------------------------------------
    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _covering(self, addr: int, size: int) -> list[Mapping] | None:
        """The mappings that exactly tile ``[addr, addr + size)``, or None where they do not."""
        out, at = [], addr
        while at < addr + size:
            m = self.mappings.get(at)
            if m is None:
                return None
            out.append(m)
            at += m.size
        return out if at == addr + size else None

    def _in_reserved(self, addr: int, size: int) -> bool:
        return any(base <= addr and addr + size <= base + n for base, n in self.reserved.items())

    def mapping_at(self, addr: int) -> Mapping | None:
        """The mapping that covers byte ``addr``."""
        for m in self.mappings.values():
            if m.addr <= addr < m.addr + m.size:
                return m
        return None

    # -- context ----------------------------------------------------------
    def cuGetErrorName(self, err):
        return CUresult.CUDA_SUCCESS, CUresult(err).name.encode()

    def cuInit(self, flags):
        return (CUresult.CUDA_SUCCESS,)

    def cuDeviceGet(self, index):
        return CUresult.CUDA_SUCCESS, index

    def cuDevicePrimaryCtxRetain(self, dev):
        return CUresult.CUDA_SUCCESS, f"ctx{dev}"

    def cuCtxSetCurrent(self, ctx):
        return (CUresult.CUDA_SUCCESS,)

    def cuCtxSynchronize(self):
        self._count("cuCtxSynchronize")
        return (CUresult.CUDA_SUCCESS,)

    def cuMemGetAllocationGranularity(self, prop, flags):
        return CUresult.CUDA_SUCCESS, self.gran

    # -- virtual memory ----------------------------------------------------
    def cuMemAddressReserve(self, size, alignment, addr, flags):
        self._count("cuMemAddressReserve")
        if size <= 0 or size % self.gran:
            return CUresult.CUDA_ERROR_INVALID_VALUE, 0
        base = self._next_addr
        self._next_addr += size + self.gran  # a gap: ranges never touch
        self.reserved[base] = size
        return CUresult.CUDA_SUCCESS, base

    def cuMemAddressFree(self, addr, size):
        self._count("cuMemAddressFree")
        if self.reserved.get(addr) != size or any(addr <= a < addr + size for a in self.mappings):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        del self.reserved[addr]
        return (CUresult.CUDA_SUCCESS,)

    def cuMemCreate(self, size, prop, flags):
        self._count("cuMemCreate")
        if size <= 0 or size % self.gran:
            return CUresult.CUDA_ERROR_INVALID_VALUE, 0
        if self.memory_chunks is not None and len(self.allocations) >= self.memory_chunks:
            return CUresult.CUDA_ERROR_OUT_OF_MEMORY, 0
        handle = self._next_handle
        self._next_handle += 1
        self.allocations[handle] = size
        self.contents[handle] = None
        return CUresult.CUDA_SUCCESS, handle

    def cuMemRelease(self, handle):
        self._count("cuMemRelease")
        handle = int(handle)
        if handle not in self.allocations or handle in self.released_unmapped:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        if any(m.handle == handle for m in self.mappings.values()):
            self.released_unmapped.add(handle)  # the memory goes when its last mapping does
        else:
            self._free(handle)
        return (CUresult.CUDA_SUCCESS,)

    def _free(self, handle: int) -> None:
        del self.allocations[handle]
        del self.contents[handle]
        self.released_unmapped.discard(handle)

    def cuMemMap(self, addr, size, offset, handle, flags):
        self._count("cuMemMap")
        handle = int(handle)
        if (offset != 0 or handle not in self.allocations or handle in self.released_unmapped
                or self.allocations[handle] != size or not self._in_reserved(addr, size)
                or any(self.mapping_at(a) for a in range(addr, addr + size, self.gran))):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.mappings[addr] = Mapping(addr, size, handle)
        return (CUresult.CUDA_SUCCESS,)

    def cuMemSetAccess(self, addr, size, descs, count):
        self._count("cuMemSetAccess")
        covered = self._covering(addr, size)
        if covered is None or (self.one_mapping_per_call and len(covered) > 1) or count != 1:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        flags = descs[0].flags
        if flags == READ and self.refuse_read_only:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        for m in covered:
            m.access = flags
        return (CUresult.CUDA_SUCCESS,)

    def cuMemUnmap(self, addr, size):
        self._count("cuMemUnmap")
        self.unmapping_threads.add(threading.current_thread().name)
        covered = self._covering(addr, size)
        if covered is None or (self.one_mapping_per_call and len(covered) > 1):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        for m in covered:
            del self.mappings[m.addr]
            if m.handle in self.released_unmapped and not any(x.handle == m.handle for x in self.mappings.values()):
                self._free(m.handle)
        return (CUresult.CUDA_SUCCESS,)

    # -- device memory operations (on mapped, accessible memory) -----------------
    def _target(self, addr: int, size: int, write: bool) -> Mapping | None:
        m = self.mapping_at(addr)
        if m is None or addr + size > m.addr + m.size or m.access is None or (write and m.access != READWRITE):
            return None
        return m

    def cuMemsetD8(self, addr, value, n):
        self._count("cuMemsetD8")
        m = self._target(int(addr), n, write=True)
        if m is None or (int(addr), n) != (m.addr, m.size):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.contents[m.handle] = value
        return (CUresult.CUDA_SUCCESS,)

    def cuMemcpyDtoD(self, dst, src, n):
        self._count("cuMemcpyDtoD")
        d, s = self._target(int(dst), n, write=True), self._target(int(src), n, write=False)
        if d is None or s is None:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.contents[d.handle] = self.contents[s.handle]
        return (CUresult.CUDA_SUCCESS,)

    # -- what a test checks ------------------------------------------------------
    def check_readable(self, addr: int, size: int) -> None:
        """Every granule of ``[addr, addr + size)`` is mapped and readable (no kernel read can fault)."""
        for a in range(addr, addr + size, self.gran):
            m = self.mapping_at(a)
            assert m is not None and m.access is not None, f"granule at +{a - addr:#x} is not readable"


def cuda_backend_on(monkeypatch, driver: DriverModel):
    """``vllm_vtensor.vmm.cuda.CudaBackend`` making its driver calls to ``driver`` (torch's own CUDA context
    set-up skipped: there is no device)."""
    import torch

    from vllm_vtensor.vmm import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "cu", driver)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_backend.CudaBackend, "_torch_context", lambda self: None)
    return cuda_backend.CudaBackend(0)


def assert_nothing_left(driver: DriverModel) -> None:
    """After the backend closed: no mapping, no reserved range, no allocation."""
    assert not driver.mappings and not driver.reserved and not driver.allocations


@contextlib.contextmanager
def backend_on(monkeypatch, driver: DriverModel):
    """A :func:`cuda_backend_on` ``driver`` for the block; closed after it, leaving nothing behind."""
    backend = cuda_backend_on(monkeypatch, driver)
    yield backend
    backend.close()
    assert_nothing_left(driver)
