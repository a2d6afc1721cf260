"""CUDA backend: the driver's virtual memory management through ``cuda-python``.

* ``cuMemAddressReserve`` reserves a range; ``cuMemCreate`` makes a physical
  chunk; ``cuMemMap`` + ``cuMemSetAccess`` put it in a range; ``cuMemUnmap`` and
  ``cuMemRelease`` undo that.
* One **zero chunk** (a granule of zeros) is mapped read-only over every
  granule of a range that holds no real chunk, so every address of a live
  reservation is readable: padded kernel reads are safe and addresses captured
  by CUDA graphs stay valid.
* Unmapping is preceded by :meth:`synchronize` (the caller batches it), since a
  kernel may still be reading the chunk.
* Consecutive mappings share their calls where the driver allows: one
  ``cuMemUnmap`` for a run of whole mappings and one ``cuMemSetAccess`` over a run
  of fresh ones (as PyTorch's expandable segments set access), each ``cuMemMap``
  still its own. A driver that refuses a shared call gets one call per mapping
  from then on (the backend knows each chunk mapping's extent for that).
"""
from __future__ import annotations

import threading

from .base import VirtualRange, VMMBackend, VMMError

try:  # cuda-python >= 12.6 names the module cuda.bindings.driver
    from cuda.bindings import driver as cu
except ImportError:  # pragma: no cover - older cuda-python
    try:
        from cuda import cuda as cu  # type: ignore[no-redef]
    except ImportError:
        cu = None


def _failed(result) -> bool:
    err = result[0] if isinstance(result, tuple) else result
    return err != cu.CUresult.CUDA_SUCCESS


def _ok(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        hint = " (GPU memory exhausted: lower the vTensor budget)" if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY else ""
        raise VMMError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}{hint}")
    return rest[0] if len(rest) == 1 else rest


class _CudaArray:
    """Minimal ``__cuda_array_interface__`` so torch can view a raw device pointer."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class CudaBackend(VMMBackend):
    def __init__(self, device_index: int = 0):
        if cu is None:
            raise VMMError("the CUDA VMM backend needs cuda-python: pip install 'vllm-vtensor[cuda]'")
        import torch

        super().__init__()
        if not torch.cuda.is_available():
            raise VMMError("the CUDA VMM backend needs a CUDA GPU; use the host backend on CPU")
        self.index = device_index
        self.device = f"cuda:{device_index}"
        self._torch_context()
        _ok(cu.cuInit(0), "cuInit")
        dev = _ok(cu.cuDeviceGet(device_index), "cuDeviceGet")
        self._ctx = _ok(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        self._tls = threading.local()
        self._bind()

        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        self._prop = prop
        self._gran = _ok(
            cu.cuMemGetAllocationGranularity(prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity",
        )
        self._rw, self._ro = cu.CUmemAccessDesc(), cu.CUmemAccessDesc()
        self.zero_read_only = True  # False where the driver refuses read-only mappings (then read-write)
        self.shared_calls = True  # False where the driver refuses one unmap / set-access call over several mappings
        for desc, flag in ((self._rw, "PROT_READWRITE"), (self._ro, "PROT_READ")):
            desc.location.type = prop.location.type
            desc.location.id = device_index
            desc.flags = getattr(cu.CUmemAccess_flags, f"CU_MEM_ACCESS_FLAGS_{flag}")
        self._sizes: dict[int, int] = {}  # handle key -> bytes
        self._handles: dict[int, object] = {}  # handle key -> CUmemGenericAllocationHandle
        self._mapped: dict[int, int] = {}  # address -> bytes of each chunk mapping in a range (not the zero's)
        self._zero = self._create(self._gran)
        scratch = _ok(cu.cuMemAddressReserve(self._gran, 0, 0, 0), "cuMemAddressReserve")
        self._map_raw(int(scratch), self._gran, self._zero, self._rw)
        _ok(cu.cuMemsetD8(scratch, 0, self._gran), "cuMemsetD8(zero chunk)")
        self.synchronize()
        _ok(cu.cuMemUnmap(scratch, self._gran), "cuMemUnmap")
        _ok(cu.cuMemAddressFree(scratch, self._gran), "cuMemAddressFree")

    def _torch_context(self) -> None:
        """Make torch create and bind the device's primary context (the one this backend's calls use)."""
        import torch

        torch.cuda.init()
        torch.empty(1, device=self.device)

    def _bind(self) -> None:
        # Driver calls from another thread (the pool's pre-creation thread) need the context current.
        if not getattr(self._tls, "bound", False):
            _ok(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            self._tls.bound = True

    @property
    def granularity(self) -> int:
        return int(self._gran)

    def _create(self, size: int) -> int:
        handle = _ok(cu.cuMemCreate(size, self._prop, 0), f"cuMemCreate({size} bytes)")
        key = int(handle)
        with self._lock:
            self._sizes[key] = size
            self._handles[key] = handle
        return key

    def _map_raw(self, addr: int, size: int, key: int, access) -> None:
        handle = self._handles[key]
        _ok(cu.cuMemMap(addr, size, 0, handle, 0), "cuMemMap")
        _ok(cu.cuMemSetAccess(addr, size, [access], 1), "cuMemSetAccess")

    def _set_access(self, addr: int, size: int, piece: int, access, what: str) -> bool:
        """``cuMemSetAccess`` over ``size`` bytes of fresh ``piece``-byte mappings: one call, or one per mapping
        where the driver refuses a call over several. False if the driver refuses ``access`` itself."""
        if size > piece and self.shared_calls:
            if not _failed(cu.cuMemSetAccess(addr, size, [access], 1)):
                return True
            if _failed(cu.cuMemSetAccess(addr, piece, [access], 1)):
                return False  # the access flags, not the shared call (the caller may try others)
            self.shared_calls = False
            start = piece
        else:
            start = 0
        for off in range(start, size, piece):
            if _failed(result := cu.cuMemSetAccess(addr + off, piece, [access], 1)):
                if off == 0:
                    return False
                _ok(result, what)
        return True

    def _map_zero(self, addr: int, size: int) -> None:
        g = self._gran
        for off in range(0, size, g):
            _ok(cu.cuMemMap(addr + off, g, 0, self._handles[self._zero], 0), "cuMemMap(zero chunk)")
        # Some drivers refuse PROT_READ alone; nothing here ever writes through a zero mapping.
        if self.zero_read_only and self._set_access(addr, size, g, self._ro, "cuMemSetAccess(zero chunk)"):
            return
        self.zero_read_only = False
        if not self._set_access(addr, size, g, self._rw, "cuMemSetAccess(zero chunk)"):
            _ok(cu.cuMemSetAccess(addr, g, [self._rw], 1), "cuMemSetAccess(zero chunk)")

    def _unmap_pieces(self, addr: int, size: int, piece: int) -> None:
        """Unmap ``size`` bytes mapped as consecutive whole ``piece``-byte mappings."""
        self._unmap_run(addr, [piece] * (size // piece))

    def _unmap_run(self, addr: int, sizes: list[int]) -> None:
        """Unmap consecutive whole mappings of ``sizes`` bytes from ``addr``: one call, or one per mapping
        where the driver refuses a call over several."""
        if len(sizes) > 1 and self.shared_calls:
            if not _failed(cu.cuMemUnmap(addr, sum(sizes))):
                return
            self.shared_calls = False
        for size in sizes:
            _ok(cu.cuMemUnmap(addr, size), "cuMemUnmap")
            addr += size

    # -- virtual ranges -------------------------------------------------
    def _reserve_new(self, size: int) -> int:
        self._bind()
        addr = int(_ok(cu.cuMemAddressReserve(size, self._gran, 0, 0), f"cuMemAddressReserve({size})"))
        self._map_zero(addr, size)
        return addr

    # -- physical chunks ------------------------------------------------
    def create_chunk(self, size: int) -> int:
        if size % self._gran:
            raise ValueError(f"chunk size {size} is not a multiple of the CUDA granularity {self._gran}")
        self._bind()
        return self._create(size)

    def release_chunk(self, handle: int) -> None:
        self._bind()
        with self._lock:
            h = self._handles.pop(handle)
            self._sizes.pop(handle)
        _ok(cu.cuMemRelease(h), "cuMemRelease")

    def _with_scratch(self, handles: list[int], size: int, op) -> None:
        """Map ``handles`` side by side at a scratch range, run ``op(addr)``, unmap."""
        total = size * len(handles)
        scratch = int(_ok(cu.cuMemAddressReserve(total, self._gran, 0, 0), "cuMemAddressReserve"))
        try:
            for i, h in enumerate(handles):
                self._map_raw(scratch + i * size, size, h, self._rw)
            op(scratch)
            self.synchronize()
            self._unmap_pieces(scratch, total, size)
        finally:
            _ok(cu.cuMemAddressFree(scratch, total), "cuMemAddressFree")

    def copy_chunk(self, dst: int, src: int, size: int) -> None:
        self._bind()
        self._with_scratch([src, dst], size, lambda a: _ok(cu.cuMemcpyDtoD(a + size, a, size), "cuMemcpyDtoD"))

    def zero_chunk(self, handle: int, size: int) -> None:
        self._bind()
        self._with_scratch([handle], size, lambda a: _ok(cu.cuMemsetD8(a, 0, size), "cuMemsetD8"))

    # -- mapping -------------------------------------------------------
    def map(self, vr: VirtualRange, offset: int, handle: int, size: int) -> None:
        self.map_many(vr, offset, [handle], size)

    def map_many(self, vr: VirtualRange, offset: int, handles: list[int], size: int) -> None:
        self._bind()
        addr, total = vr.addr + offset, size * len(handles)
        self._unmap_pieces(addr, total, self._gran)  # the zero granules over these chunks' place
        for i, handle in enumerate(handles):
            _ok(cu.cuMemMap(addr + i * size, size, 0, self._handles[handle], 0), "cuMemMap")
            self._mapped[addr + i * size] = size
        if not self._set_access(addr, total, size, self._rw, "cuMemSetAccess"):
            _ok(cu.cuMemSetAccess(addr, size, [self._rw], 1), "cuMemSetAccess")

    def unmap(self, vr: VirtualRange, offset: int, size: int) -> None:
        self._bind()
        addr, starts, sizes, covered = vr.addr + offset, [], [], 0  # the chunk mappings there, one by one
        while covered < size:
            piece = self._mapped.get(addr + covered)
            if piece is None:
                raise VMMError(f"unmap of [{offset:#x}, {offset + size:#x}) in a range: no chunk is mapped at "
                               f"{offset + covered:#x}")
            starts.append(addr + covered)
            sizes.append(piece)
            covered += piece
        if covered != size:
            raise VMMError(f"unmap of [{offset:#x}, {offset + size:#x}) in a range ends inside a chunk")
        self._unmap_run(addr, sizes)
        for start in starts:
            del self._mapped[start]
        self._map_zero(addr, size)

    # -- access --------------------------------------------------------
    def as_tensor(self, addr: int, nbytes: int):
        import torch

        return torch.as_tensor(_CudaArray(addr, nbytes), device=self.device)

    def synchronize(self) -> None:
        self._bind()
        _ok(cu.cuCtxSynchronize(), "cuCtxSynchronize")

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values()) - self._gran  # the zero chunk is fixed overhead

    def close(self) -> None:
        self._bind()
        self.synchronize()
        with self._lock:
            for vr in self._ranges:
                if _failed(cu.cuMemUnmap(vr.addr, vr.size)):  # one call over every mapping, where allowed
                    at = vr.addr
                    while at < vr.addr + vr.size:  # else mapping by mapping: chunks by their extent, zero granules
                        piece = self._mapped.get(at, self._gran)
                        cu.cuMemUnmap(at, piece)  # best effort: a failure leaves the rest to the driver's teardown
                        at += piece
                cu.cuMemAddressFree(vr.addr, vr.size)
            self._ranges.clear()
            self._free_ranges.clear()
            self._mapped.clear()
            for h in self._handles.values():
                cu.cuMemRelease(h)
            self._handles.clear()
            self._sizes.clear()
