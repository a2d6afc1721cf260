"""benchmarks/soak.py's short version: two rounds of overload against `vllm serve --attention-backend
VTENSOR` with clients hanging up, each followed by an idle gap with no request at all. After each
round nothing is running, mapped or lingering, the memory beyond the prefix cache is the ready
reserve, a prefix-cache reset brings KV memory back to where the server started and the footprint
(worker PSS, tree RSS) within 5% of it; the memfds stay constant; when the server stops no process
or snapshot file of it is left."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # minutes of overload against a server; the server tests cover hang-ups and metrics
def test_soak_quick_leaves_memory_and_files_as_they_were(smollm2_path, tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick", "--model", smollm2_path,
                          "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    checks = data["engines"]["vtensor"]["checks"]
    for ok in ("every_request_ended", "memfds_constant", "footprint_within_5pct", "idle_after_every_round",
               "idle_beyond_cache_is_the_reserve", "kv_back_to_start_after_reset", "within_budget"):
        assert checks[ok] is True, (ok, checks)
    assert checks["stats_file_seen"] is True, checks  # the server's own snapshot file, in its folder, while it ran
    assert checks["processes_left"] == [] and checks["stats_file_left"] == [], checks
    rows = data["engines"]["vtensor"]["rows"]
    assert len(rows) == 3 and all(r["hung_up"] > 0 and r["answered"] > 0 for r in rows[1:])
