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
    return (f"{platform.machine()} {os.cpu_count()} cores{cpu()}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def cpu() -> str:
    """`` (MODEL, ISA)`` from /proc/cpuinfo: the widest vector ISA decides CPU results (vLLM's kernels,
    oneDNN), so results from machines of one core count but another ISA are told apart."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "")
    model = fields.get("model name", "")
    return f" ({', '.join(x for x in (model, isa) if x)})" if model or isa else ""


def provenance(script: str, argv: list[str] | None = None) -> dict:
    """``{"command", "commit", "date", "machine"}`` for a result of ``benchmarks/<script>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {"command": " ".join(["python", f"benchmarks/{script}", *args]), "commit": commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}


def card_name(device_name: str) -> str:
    """A result file's hardware part for a GPU: ``h200`` for "NVIDIA H200", else the name in lower case."""
    d = device_name.lower()
    return next((c for c in ("h200", "h100", "a100", "l40s", "b200", "gb200") if c in d), d.replace(" ", "-") or "cuda")
