"""How a benchmark child hands over to its parent (benchmarks/offload.py's run_in_cgroup): it loads
and warms up, touches ``RESULT.loaded``, and waits for ``RESULT.go`` - the parent tightens the cgroup
memory limit in between - before it runs what is timed. Standard library only: llama.cpp's child
runs in an environment of its own."""
from __future__ import annotations

import time
from pathlib import Path


def loaded_then_wait_for_go(result: str, timeout_s: float = 600) -> None:
    Path(result + ".loaded").touch()
    go = Path(result + ".go")
    deadline = time.monotonic() + timeout_s
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go from the parent")
        time.sleep(0.05)


def disk_counters(path: str, diskstats: str = "/proc/diskstats") -> dict | None:
    """What the block device holding ``path`` has done since boot, from the kernel's counters: bytes
    read and seconds with at least one request in flight (``io_ticks``; in a virtual machine, as the
    guest sees its disk). None where ``path`` is on no block device the kernel counts (tmpfs, overlay)."""
    import os

    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    try:
        lines = Path(diskstats).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) >= 13 and (int(f[0]), int(f[1])) == (major, minor):
            return {"read_bytes": int(f[5]) * 512, "busy_s": int(f[12]) / 1000}
    return None


def disk_activity(before: dict | None, after: dict | None) -> dict:
    """The device's reads and busy time between two :func:`disk_counters` readings, as a result's fields."""
    if before is None or after is None:
        return {}
    return {"disk_read_bytes": after["read_bytes"] - before["read_bytes"],
            "disk_busy_s": round(after["busy_s"] - before["busy_s"], 3)}
