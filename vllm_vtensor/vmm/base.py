"""The one interface every virtual-memory backend implements.

A backend reserves virtual ranges, creates physical chunks, and maps chunks
into ranges.  Its invariant, relied on by everything above it: **every byte
of a live reserved range is readable**.  Where no chunk is mapped the range
reads as zeros (host: a read-only anonymous reserve; CUDA: one shared
read-only zero chunk), so a tensor view over the whole range never faults on
a read.  Writes must only touch mapped chunks.

Only this package knows about CUDA or operating-system calls.
"""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass


class VMMError(RuntimeError):
    """A virtual-memory operation failed; the message says which call and why."""


@dataclass(frozen=True)
class VirtualRange:
    """A reserved range of virtual addresses: ``[addr, addr + size)``."""

    addr: int
    size: int


class VMMBackend(abc.ABC):
    """Reserve / create / map / unmap on one device."""

    #: ``"cpu"`` or ``"cuda:N"``; tensors viewed over this backend's ranges live there.
    device: str

    def __init__(self):
        self._lock = threading.Lock()
        self._ranges: list[VirtualRange] = []  # every reservation made, released by close()
        self._free_ranges: dict[int, list[VirtualRange]] = {}  # size -> freed ranges kept for reuse

    @property
    @abc.abstractmethod
    def granularity(self) -> int:
        """Smallest unit (bytes) of reservation, chunk size and map offset."""

    # -- virtual ranges -------------------------------------------------
    @abc.abstractmethod
    def _reserve_new(self, size: int) -> int:
        """Reserve a fresh range of ``size`` bytes that reads as zeros; return its address."""

    def reserve(self, size: int) -> VirtualRange:
        """Reserve ``size`` bytes (a multiple of the granularity) that read as zeros."""
        if size <= 0 or size % self.granularity:
            raise ValueError(f"reserve size {size} must be a positive multiple of the {self.device} "
                             f"granularity {self.granularity}")
        with self._lock:
            cached = self._free_ranges.get(size)
            if cached:
                return cached.pop()
        vr = VirtualRange(self._reserve_new(size), size)
        with self._lock:
            self._ranges.append(vr)
        return vr

    def free_range(self, vr: VirtualRange) -> None:
        """Give a reservation back.  Every chunk must have been unmapped first.

        The range stays reserved (reading as zeros) and is reused by the next
        reservation of its size: a tensor view that outlives its VTensor, or an
        address captured by a CUDA graph, never faults; it only reads zeros or a
        later owner's data.
        """
        with self._lock:
            self._free_ranges.setdefault(vr.size, []).append(vr)

    # -- physical chunks ------------------------------------------------
    @abc.abstractmethod
    def create_chunk(self, size: int) -> int:
        """Create a physical chunk; return an opaque handle."""

    @abc.abstractmethod
    def release_chunk(self, handle: int) -> None:
        """Return a chunk's physical memory to the system.  It must be mapped nowhere."""

    @abc.abstractmethod
    def copy_chunk(self, dst: int, src: int, size: int) -> None:
        """Copy the contents of chunk ``src`` into chunk ``dst``."""

    @abc.abstractmethod
    def zero_chunk(self, handle: int, size: int) -> None:
        """Fill chunk ``handle`` with zeros."""

    # -- mapping -------------------------------------------------------
    @abc.abstractmethod
    def map(self, vr: VirtualRange, offset: int, handle: int, size: int) -> None:
        """Map chunk ``handle`` read-write at ``vr.addr + offset``."""

    def map_many(self, vr: VirtualRange, offset: int, handles: list[int], size: int) -> None:
        """Map chunks ``handles`` side by side, read-write, from ``vr.addr + offset`` (``size`` bytes each): a
        request's consecutive blocks. Backends whose calls can cover several mappings at once override it."""
        for i, handle in enumerate(handles):
            self.map(vr, offset + i * size, handle, size)

    @abc.abstractmethod
    def unmap(self, vr: VirtualRange, offset: int, size: int) -> None:
        """Unmap ``[offset, offset + size)``; it reads as zeros again afterwards."""

    # -- access --------------------------------------------------------
    @abc.abstractmethod
    def as_tensor(self, addr: int, nbytes: int):
        """A ``torch.uint8`` tensor of ``nbytes`` viewing ``addr`` (no copy)."""

    def release_pages(self, vr: VirtualRange, offset: int, size: int) -> None:
        """Let this process's page tables forget a mapped range: the mapping and the memory stay (a
        later access faults the pages back in), but the range no longer counts in the process's RSS.
        A hint: backends whose mappings do not count that way do nothing."""

    def synchronize(self) -> None:
        """Wait until no kernel may still read memory about to be unmapped."""

    def resident_bytes(self) -> int:
        """Physical bytes this backend holds right now (as the OS or driver sees them)."""
        return 0

    def close(self) -> None:
        """Release backend-wide resources (zero chunk, files)."""
