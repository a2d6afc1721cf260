"""A cgroup v1 memory controller group for the benchmarks that hold processes to a memory limit
(``offload.py``: one engine per run; ``multi_engine.py``: several servers in one group)."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


def available() -> bool:
    """Whether this process may make memory cgroups (root, and the v1 memory controller mounted)."""
    return os.geteuid() == 0 and (ROOT / "memory.limit_in_bytes").exists()


class MemoryCgroup:
    """A fresh group ``name``: processes started through :meth:`enter` run in it; :meth:`close` kills
    whatever is left in it and removes it."""

    def __init__(self, name: str, limit: int | None = None):
        self.path = ROOT / name
        if self.path.exists():
            self.path.rmdir()
        self.path.mkdir()
        if limit:
            self.hold(limit)

    def enter(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into the group (its children are born in it)."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$0" "$@"', *argv]

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def usage(self) -> int:
        return int(self.read("memory.usage_in_bytes"))

    def hold(self, limit: int) -> None:
        """Limit the group to ``limit`` bytes, page cache included (OSError EBUSY if it cannot get under it)."""
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def peak(self) -> int:
        return int(self.read("memory.max_usage_in_bytes"))

    def limit_hits(self) -> int:
        return int(self.read("memory.failcnt"))

    def oom_kills(self) -> int:
        m = re.search(r"oom_kill (\d+)", self.read("memory.oom_control"))
        return int(m.group(1)) if m else 0

    def unreclaimable(self) -> dict[str, int]:
        """Anonymous, shared-memory and mapped-file bytes: what the group cannot drop without faulting it
        back (mapped files include vLLM's mmap'd checkpoint while it is mapped)."""
        stat = dict(line.split() for line in self.read("memory.stat").splitlines())
        return {k: int(stat[f"total_{k}"]) for k in ("rss", "shmem", "mapped_file")}

    def file_rss(self, path: Path) -> int:
        """Bytes of file ``path`` mapped and resident in the group's processes (their smaps' Rss of its
        mappings, each process counted once: threads share it)."""
        total, target, ours = 0, str(Path(path).resolve()), False
        for pid in self.read("cgroup.procs").split():
            try:
                lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
            except OSError:  # gone since the listing
                continue
            for line in lines:
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                    ours = len(head) == 6 and head[5] == target
                elif ours and line.startswith("Rss:"):
                    total += int(line.split()[1]) << 10
        return total

    def kill_all(self) -> None:
        """SIGKILL every process in the group (vLLM's engine and worker processes too)."""
        for _ in range(100):
            pids = [int(p) for p in self.read("cgroup.procs").split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def close(self) -> None:
        self.kill_all()
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.2)
