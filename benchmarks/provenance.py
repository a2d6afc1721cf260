"""What every benchmark result records about itself: the commit, date, command and machine."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """HEAD's hash, marked when tracked files differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+uncommitted changes" if dirty else "")


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def provenance(script: str, argv: list[str] | None = None) -> dict:
    """``{"command", "commit", "date", "machine"}`` for a result of ``benchmarks/<script>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {"command": " ".join(["python", f"benchmarks/{script}", *args]), "commit": commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}


def card_name(device_name: str) -> str:
    """A result file's hardware part for a GPU: ``h200`` for "NVIDIA H200", else the name in lower case."""
    d = device_name.lower()
    return next((c for c in ("h200", "h100", "a100", "l40s", "b200", "gb200") if c in d), d.replace(" ", "-") or "cuda")
