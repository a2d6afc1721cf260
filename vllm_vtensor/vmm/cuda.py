"""CUDA backend: the driver's virtual memory management through ``cuda-python``.

* ``cuMemAddressReserve`` reserves a range; ``cuMemCreate`` makes a physical
  chunk; ``cuMemMap`` + ``cuMemSetAccess`` put it in a range; ``cuMemUnmap`` and
  ``cuMemRelease`` undo that.
* One **zero chunk** (a granule of zeros) is mapped read-only over every
  granule of a range that holds no real chunk, so every address of a live
  reservation is readable: padded kernel reads are safe and addresses captured
  by CUDA graphs stay valid.  A range of more than :data:`ZERO_PIECES_ABOVE`
  granules (vLLM's default ``--max-model-len`` of a long-context model times
  ``--max-num-seqs``: millions) is covered with **zero pieces** instead, zero
  allocations of 2, 4, ... up to :func:`zero_piece_granules` granules, so that
  about :data:`COVER_MAPPINGS` mappings cover it: one mapping per granule took
  ~30 us each at start-up and ran a GPU out of memory at ~540k of them.  A chunk
  mapped inside a piece unmaps that piece and covers what the chunk leaves of it
  again, smallest pieces next to the chunk (a request grows into them): about one
  zero mapping more per chunk than with zero granules.
* Unmapping is preceded by :meth:`synchronize` (the caller batches it), since a
  kernel may still be reading the chunk.
* Consecutive mappings share their calls where the driver allows: one
  ``cuMemUnmap`` for a run of whole mappings and one ``cuMemSetAccess`` over a run
  of fresh ones (as PyTorch's expandable segments set access), each ``cuMemMap``
  still its own. A driver that refuses a shared call gets one call per mapping
  from then on (the backend knows each chunk mapping's extent for that).
"""
from __future__ import annotations

import math
import threading

from .base import VirtualRange, VMMBackend, VMMError

try:  # cuda-python >= 12.6 names the module cuda.bindings.driver
    from cuda.bindings import driver as cu
except ImportError:  # pragma: no cover - older cuda-python
    try:
        from cuda import cuda as cu  # type: ignore[no-redef]
    except ImportError:
        cu = None


ZERO_PIECES_ABOVE = 1 << 18  # granules a range may have and still be covered granule by granule (~8 s at 30 us)
COVER_MAPPINGS = 1 << 16  # zero mappings a larger range is covered with, about
MAX_ZERO_PIECE = 32  # granules of the largest zero piece (all pieces together: 63 granules, 126 MiB at 2 MiB)


def zero_piece_granules(granules: int) -> int:
    """The largest zero piece (a power of two, in granules) a range of ``granules`` is covered with: 1 (the
    zero granule over each granule) up to :data:`ZERO_PIECES_ABOVE`, else enough for ~:data:`COVER_MAPPINGS`
    mappings, at most :data:`MAX_ZERO_PIECE`."""
    if granules <= ZERO_PIECES_ABOVE:
        return 1
    return min(MAX_ZERO_PIECE, 1 << math.ceil(math.log2(granules / COVER_MAPPINGS)))


def _pieces(start: int, end: int, largest: int) -> list[tuple[int, int]]:
    """``[start, end)`` (granules) as ``(start, granules)`` pieces of powers of two up to ``largest``, growing
    from ``start``: 1, 2, 4, ... then ``largest`` ones, the rest shrinking. A request grows from ``start``:
    its next chunk lands on a one-granule piece (one unmap, as with zero granules), and growing through a
    piece of n granules maps n - 1 smaller ones on the way, about one per chunk."""
    out, at, k = [], start, 1
    while at < end:
        left = end - at
        take = k if k <= left else 1 << (left.bit_length() - 1)
        out.append((at, take))
        at += take
        k = min(2 * k, largest)
    return out


class _ZeroCover:
    """Where a range covered with zero pieces has them: each piece's start and size, and for every
    granule the start of the piece over it (-1 where a chunk is mapped)."""

    def __init__(self, granules: int, largest: int):
        import numpy as np

        self.largest = largest
        self.owner = np.full(granules, -1, dtype=np.int32)
        self.size_at: dict[int, int] = {}  # piece start (granule) -> granules

    def add(self, start: int, granules: int) -> None:
        self.owner[start:start + granules] = start
        self.size_at[start] = granules

    def over(self, a: int, b: int) -> list[tuple[int, int]]:
        """The pieces that cover ``[a, b)`` (every granule there must be zero)."""
        out, at = [], int(self.owner[a])
        while 0 <= at < b:
            k = self.size_at.get(at)
            if k is None:
                break
            out.append((at, k))
            at += k
        if not out or at < b:
            raise VMMError(f"map at granules [{a}, {b}) of a range: a chunk is already mapped there")
        return out

    def remove(self, pieces: list[tuple[int, int]]) -> None:
        for start, k in pieces:
            del self.size_at[start]
            self.owner[start:start + k] = -1


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
        # the chunk mappings and zero pieces of the ranges (_mapped, _covers) change under this lock: the step
        # maps while helper threads map ahead (VTENSOR_MAP_AHEAD) or unmap finished ranges (deferred unmaps)
        self._map_lock = threading.RLock()
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
        self._zero_pieces: dict[int, int] = {}  # granules -> handle key of a zero allocation that size
        self._zero_bytes = 0
        self._covers: dict[int, _ZeroCover] = {}  # range address -> its zero pieces, for ranges covered with them
        self._zero = self._zero_piece(1)

    def _zero_piece(self, granules: int) -> int:
        """The handle key of a zero allocation of ``granules`` (made once, zeroed through a scratch mapping)."""
        key = self._zero_pieces.get(granules)
        if key is None:
            size = granules * self._gran
            key = self._create(size)
            scratch = _ok(cu.cuMemAddressReserve(size, 0, 0, 0), "cuMemAddressReserve")
            self._map_raw(int(scratch), size, key, self._rw)
            _ok(cu.cuMemsetD8(scratch, 0, size), "cuMemsetD8(zero chunk)")
            self.synchronize()
            _ok(cu.cuMemUnmap(scratch, size), "cuMemUnmap")
            _ok(cu.cuMemAddressFree(scratch, size), "cuMemAddressFree")
            self._zero_pieces[granules] = key
            self._zero_bytes += size
        return key

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
        return self._set_access_each(addr, [piece] * (size // piece), access, what)

    def _set_access_each(self, addr: int, sizes: list[int], access, what: str) -> bool:
        """``cuMemSetAccess`` over consecutive fresh mappings of ``sizes`` bytes from ``addr``: one call, or one
        per mapping where the driver refuses a call over several. False if it refuses ``access`` itself."""
        if len(sizes) > 1 and self.shared_calls:
            if not _failed(cu.cuMemSetAccess(addr, sum(sizes), [access], 1)):
                return True
            if _failed(cu.cuMemSetAccess(addr, sizes[0], [access], 1)):
                return False  # the access flags, not the shared call (the caller may try others)
            self.shared_calls = False
            first = 1
        else:
            first = 0
        at = addr + sum(sizes[:first])
        for i in range(first, len(sizes)):
            if _failed(result := cu.cuMemSetAccess(at, sizes[i], [access], 1)):
                if i == 0:
                    return False
                _ok(result, what)
            at += sizes[i]
        return True

    def _map_zero(self, addr: int, size: int) -> None:
        g = self._gran
        for off in range(0, size, g):
            _ok(cu.cuMemMap(addr + off, g, 0, self._handles[self._zero], 0), "cuMemMap(zero chunk)")
        self._zero_access(addr, [g] * (size // g))

    def _zero_access(self, addr: int, sizes: list[int]) -> None:
        """Access for fresh zero mappings of ``sizes`` bytes from ``addr``: read-only, or read-write on a
        driver that refuses read-only (nothing here ever writes through a zero mapping)."""
        if self.zero_read_only and self._set_access_each(addr, sizes, self._ro, "cuMemSetAccess(zero chunk)"):
            return
        self.zero_read_only = False
        if not self._set_access_each(addr, sizes, self._rw, "cuMemSetAccess(zero chunk)"):
            _ok(cu.cuMemSetAccess(addr, sizes[0], [self._rw], 1), "cuMemSetAccess(zero chunk)")

    def _cover(self, base: int, cover: _ZeroCover, start: int, end: int) -> None:
        """Map zero pieces over granules ``[start, end)`` of the range at ``base`` (see :func:`_pieces`)."""
        if start >= end:
            return
        g, pieces = self._gran, _pieces(start, end, cover.largest)
        for at, k in pieces:
            _ok(cu.cuMemMap(base + at * g, k * g, 0, self._handles[self._zero_piece(k)], 0), "cuMemMap(zero piece)")
            cover.add(at, k)
        self._zero_access(base + start * g, [k * g for _, k in pieces])

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
        granules = size // self._gran
        largest = zero_piece_granules(granules)
        if largest == 1:
            self._map_zero(addr, size)
        else:
            for k in (1 << i for i in range(largest.bit_length())):
                self._zero_piece(k)  # all made now: a step that maps a chunk never makes one
            cover = self._covers[addr] = _ZeroCover(granules, largest)
            self._cover(addr, cover, 0, granules)
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
        with self._map_lock:
            self._map_many(vr, offset, handles, size)

    def _map_many(self, vr: VirtualRange, offset: int, handles: list[int], size: int) -> None:
        addr, total, g = vr.addr + offset, size * len(handles), self._gran
        cover = self._covers.get(vr.addr)
        if cover is None:
            self._unmap_pieces(addr, total, g)  # the zero granules over these chunks' place
        else:  # the zero pieces over it, and after the chunks are in, what they leave of them covered again
            a, b = offset // g, (offset + total) // g
            pieces = cover.over(a, b)
            self._unmap_run(vr.addr + pieces[0][0] * g, [k * g for _, k in pieces])
            cover.remove(pieces)
            self._cover(vr.addr, cover, pieces[0][0], a)
            self._cover(vr.addr, cover, b, pieces[-1][0] + pieces[-1][1])
        for i, handle in enumerate(handles):
            _ok(cu.cuMemMap(addr + i * size, size, 0, self._handles[handle], 0), "cuMemMap")
            self._mapped[addr + i * size] = size
        if not self._set_access(addr, total, size, self._rw, "cuMemSetAccess"):
            _ok(cu.cuMemSetAccess(addr, size, [self._rw], 1), "cuMemSetAccess")

    def unmap(self, vr: VirtualRange, offset: int, size: int) -> None:
        self._bind()
        with self._map_lock:
            self._unmap(vr, offset, size)

    def _unmap(self, vr: VirtualRange, offset: int, size: int) -> None:
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
        cover = self._covers.get(vr.addr)
        if cover is None:
            self._map_zero(addr, size)
        else:
            self._cover(vr.addr, cover, offset // self._gran, (offset + size) // self._gran)

    # -- access --------------------------------------------------------
    def as_tensor(self, addr: int, nbytes: int):
        import torch

        return torch.as_tensor(_CudaArray(addr, nbytes), device=self.device)

    def synchronize(self) -> None:
        self._bind()
        _ok(cu.cuCtxSynchronize(), "cuCtxSynchronize")

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values()) - self._zero_bytes  # the zero chunk and pieces are fixed overhead

    def close(self) -> None:
        self._bind()
        self.synchronize()
        with self._lock:
            for vr in self._ranges:
                if _failed(cu.cuMemUnmap(vr.addr, vr.size)):  # one call over every mapping, where allowed
                    at, cover = vr.addr, self._covers.get(vr.addr)
                    while at < vr.addr + vr.size:  # else mapping by mapping: chunks by their extent, zero pieces
                        piece = self._mapped.get(at) or self._gran * (
                            1 if cover is None else cover.size_at.get((at - vr.addr) // self._gran, 1))
                        cu.cuMemUnmap(at, piece)  # best effort: a failure leaves the rest to the driver's teardown
                        at += piece
                cu.cuMemAddressFree(vr.addr, vr.size)
            self._ranges.clear()
            self._free_ranges.clear()
            self._mapped.clear()
            self._covers.clear()
            for h in self._handles.values():
                cu.cuMemRelease(h)
            self._handles.clear()
            self._sizes.clear()
