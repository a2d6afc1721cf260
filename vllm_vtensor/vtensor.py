"""VTensor: a tensor whose virtual addresses never move while physical chunks come and go.

A VTensor reserves ``capacity`` bytes of virtual addresses once.  Its mapped
part is always a prefix ``[0, num_chunks * chunk_bytes)``: :meth:`grow` maps
chunks at the end, :meth:`shrink` unmaps them from the end, and
:meth:`share_prefix` maps *another* VTensor's first chunks (the same physical
memory, refcounted) at the same offsets.  Bytes past the mapped prefix read as
zeros (the backend's invariant) and must not be written.

Contents of freshly grown chunks are undefined (like ``torch.empty``) unless
``grow(..., zero=True)``.  Before writing into a chunk that is shared, call
:meth:`prepare_write`: it gives this VTensor a private copy first
(copy-on-write), so the other holders keep their contents.

Its role: the vTensor paper's abstraction as a library API over the VMM core (one tensor, one
reserved range, chunks from a :class:`~vllm_vtensor.pool.ChunkPool`), for use outside vLLM and as
the executable specification of the VMM core's guarantees (tests/test_vtensor.py runs property
tests over it on CPU and CUDA). The vLLM integration does not use it: a
:class:`~vllm_vtensor.kv_space.KVSpace` manages many requests' ranges inside one reservation with
the same pool and backends, because vLLM's scheduler, not the tensor, decides which physical
block goes where.
"""
from __future__ import annotations

import math

from .pool import ChunkPool


class VTensorFreedError(RuntimeError):
    """The VTensor was freed; its memory may already belong to another."""


class VTensor:
    def __init__(self, pool: ChunkPool, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity {capacity_bytes} must be positive")
        self.pool = pool
        self.chunk_bytes = pool.chunk_bytes
        self.capacity = math.ceil(capacity_bytes / self.chunk_bytes) * self.chunk_bytes
        self._backend = pool.backend
        self._range = self._backend.reserve(self.capacity)
        self._chunks: list[int] = []  # chunk i is mapped at offset i * chunk_bytes
        self._bytes = self._backend.as_tensor(self._range.addr, self.capacity)
        self._freed = False

    # -- introspection -------------------------------------------------
    def _alive(self) -> None:
        if self._freed:
            raise VTensorFreedError("this VTensor was freed; allocate a new one")

    @property
    def device(self) -> str:
        return self.pool.device

    @property
    def data_ptr(self) -> int:
        return self._range.addr

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    @property
    def mapped_bytes(self) -> int:
        return len(self._chunks) * self.chunk_bytes

    @property
    def chunk_ids(self) -> tuple[int, ...]:
        return tuple(self._chunks)

    def view(self, dtype=None, shape: tuple[int, ...] | None = None):
        """A tensor over the reservation (whole capacity, or the first ``prod(shape)`` elements).

        Its ``data_ptr()`` equals :attr:`data_ptr` for the VTensor's whole life.
        """
        self._alive()
        t = self._bytes if dtype is None else self._bytes.view(dtype)
        if shape is None:
            return t
        n = math.prod(shape)
        if n > t.numel():
            raise ValueError(f"shape {shape} needs {n} elements; the VTensor holds {t.numel()} of {t.dtype}")
        return t[:n].view(shape)

    def _chunks_for(self, nbytes: int) -> int:
        if nbytes < 0:
            raise ValueError(f"size {nbytes} must not be negative")
        if nbytes > self.capacity:
            raise ValueError(f"{nbytes} bytes exceed this VTensor's reserved capacity of {self.capacity} bytes")
        return math.ceil(nbytes / self.chunk_bytes)

    def _check_same_pool(self, other: "VTensor") -> None:
        if other.pool is not self.pool:
            raise ValueError(
                f"cannot share chunks between VTensors of different pools ({other.device} vs {self.device}): "
                "both must come from the same ChunkPool"
            )

    # -- growth and shrinkage ------------------------------------------
    def grow(self, nbytes: int, *, zero: bool = False) -> int:
        """Map chunks until the first ``nbytes`` are backed; return how many were mapped.

        Raises :class:`~vllm_vtensor.pool.VTensorOutOfMemory` (mapping nothing) when the pool is short.
        """
        self._alive()
        target = self._chunks_for(nbytes)
        have = len(self._chunks)
        if target <= have:
            return 0
        new = self.pool.acquire(target - have)
        for i, chunk in enumerate(new, start=have):
            self._backend.map(self._range, i * self.chunk_bytes, chunk, self.chunk_bytes)
            self._chunks.append(chunk)
        self.pool.note_maps(maps=len(new))
        if zero:
            self._bytes[have * self.chunk_bytes : target * self.chunk_bytes].zero_()
        return len(new)

    def shrink(self, nbytes: int) -> int:
        """Unmap chunks past the first ``nbytes`` and give them back; return how many."""
        self._alive()
        keep = self._chunks_for(nbytes)
        drop = self._chunks[keep:]
        if not drop:
            return 0
        self._backend.synchronize()  # a kernel may still read these chunks
        self._backend.unmap(self._range, keep * self.chunk_bytes, len(drop) * self.chunk_bytes)
        del self._chunks[keep:]
        self.pool.note_maps(unmaps=len(drop))
        for chunk in drop:
            self.pool.release(chunk)
        return len(drop)

    # -- sharing -------------------------------------------------------
    def share_prefix(self, src: "VTensor", nbytes: int) -> int:
        """Map ``src``'s chunks that back its first ``nbytes`` at the same offsets here.

        No bytes are copied.  Chunks this VTensor had at those offsets are
        given back first.  Returns the number of chunks shared.
        """
        self._alive()
        src._alive()
        self._check_same_pool(src)
        n = self._chunks_for(nbytes)
        if n > src.num_chunks:
            raise ValueError(f"source maps {src.mapped_bytes} bytes; cannot share its first {nbytes}")
        if n == 0:
            return 0
        shared = src._chunks[:n]
        for chunk in shared:
            self.pool.retain(chunk)  # before any release, so a chunk common to both never hits zero
        old = self._chunks[:n]
        if old:
            self._backend.synchronize()
        for i, chunk in enumerate(shared):
            offset = i * self.chunk_bytes
            if i < len(old):
                self._backend.unmap(self._range, offset, self.chunk_bytes)
            self._backend.map(self._range, offset, chunk, self.chunk_bytes)
        self._chunks[:n] = shared
        self.pool.note_maps(maps=n, unmaps=len(old))
        for chunk in old:
            self.pool.release(chunk)
        return n

    def prepare_write(self, start: int, end: int) -> int:
        """Copy-on-write: give this VTensor private copies of shared chunks in ``[start, end)``.

        Returns the number of chunks copied.  The bytes must already be mapped.
        """
        self._alive()
        if not 0 <= start <= end or self._chunks_for(end) > len(self._chunks):
            raise ValueError(f"write range [{start}, {end}) is not inside the mapped {self.mapped_bytes} bytes")
        copied = 0
        for i in range(start // self.chunk_bytes, self._chunks_for(end)):
            old = self._chunks[i]
            if self.pool.refcount(old) <= 1:
                continue
            (new,) = self.pool.acquire(1)
            self._backend.synchronize()  # pending writes to the shared chunk land before the copy
            self._backend.copy_chunk(new, old, self.chunk_bytes)
            offset = i * self.chunk_bytes
            self._backend.unmap(self._range, offset, self.chunk_bytes)
            self._backend.map(self._range, offset, new, self.chunk_bytes)
            self._chunks[i] = new
            self.pool.note_maps(maps=1, unmaps=1)
            self.pool.release(old)
            copied += 1
        return copied

    def free(self) -> None:
        """Unmap everything and give the reservation back.  Idempotent."""
        if self._freed:
            return
        self.shrink(0)
        self._freed = True
        self._backend.free_range(self._range)

    def __repr__(self) -> str:
        state = "freed" if self._freed else f"{self.num_chunks} chunks mapped"
        return f"VTensor({self.capacity} bytes on {self.device}, {state})"
