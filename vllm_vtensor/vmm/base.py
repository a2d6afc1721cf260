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

    @property
    @abc.abstractmethod
    def granularity(self) -> int:
        """Smallest unit (bytes) of reservation, chunk size and map offset."""

    # -- virtual ranges -------------------------------------------------
    @abc.abstractmethod
    def reserve(self, size: int) -> VirtualRange:
        """Reserve ``size`` bytes (a multiple of the granularity) that read as zeros."""

    @abc.abstractmethod
    def free_range(self, vr: VirtualRange) -> None:
        """Give a reservation back.  Every chunk must have been unmapped first."""

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

    @abc.abstractmethod
    def unmap(self, vr: VirtualRange, offset: int, size: int) -> None:
        """Unmap ``[offset, offset + size)``; it reads as zeros again afterwards."""

    # -- access --------------------------------------------------------
    @abc.abstractmethod
    def as_tensor(self, addr: int, nbytes: int):
        """A ``torch.uint8`` tensor of ``nbytes`` viewing ``addr`` (no copy)."""

    def synchronize(self) -> None:
        """Wait until no kernel may still read memory about to be unmapped."""

    def resident_bytes(self) -> int:
        """Physical bytes this backend holds right now (as the OS or driver sees them)."""
        return 0

    def close(self) -> None:
        """Release backend-wide resources (zero chunk, files)."""
