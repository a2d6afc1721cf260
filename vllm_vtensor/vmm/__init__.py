"""Virtual-memory backends: one interface, a host (memfd) and a CUDA (VMM) implementation."""
from __future__ import annotations

from .base import VirtualRange, VMMBackend, VMMError


def make_backend(device: str = "cpu", **host_options) -> VMMBackend:
    """The backend for ``device`` (``"cpu"``, ``"cuda"`` or ``"cuda:N"``); ``host_options`` go to
    :class:`~.host.HostBackend` (``populate``, ``stage``)."""
    if device == "cpu":
        from .host import HostBackend

        return HostBackend(**host_options)
    if device.startswith("cuda"):
        if host_options:
            raise ValueError(f"{sorted(host_options)} are options of the host backend, not of {device!r}")
        from .cuda import CudaBackend

        index = int(device.split(":")[1]) if ":" in device else 0
        return CudaBackend(index)
    raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda[:N]'")


__all__ = ["VirtualRange", "VMMBackend", "VMMError", "make_backend"]
