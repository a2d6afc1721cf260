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
