"""benchmarks/serve_compare.py runs end to end (its --quick workload) and writes what the README
reads: each engine's block size as the engine settled on it, paired ratios, and VTENSOR's exact KV
peaks within what it held and within its budget."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_serve_compare_quick_writes_a_consistent_result(smollm2_path, tmp_path):
    out = tmp_path / "sc.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_compare.py"), "--quick", "--model",
                          smollm2_path, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    van, vt, summary = data["results"]["vanilla"], data["results"]["vtensor"], data["summary"]
    assert (van["block_size"], vt["block_size"]) == (128, 32)  # each engine's default on CPU
    assert len(summary["throughput_pair_ratios"]) == 2 and all(r > 0 for r in summary["throughput_pair_ratios"])
    assert len(summary["ttft_ratio_per_turn"]) == 2
    # (C): the exact peaks; the tokens' need at its peak is at most what was resident then
    assert 0 < vt["peak_needed_kv_bytes"] <= vt["peak_resident_kv_bytes"] <= vt["allocator"]["budget_bytes"]
    assert vt["sampled_peak_needed_kv_bytes"] <= vt["peak_needed_kv_bytes"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "block sizes 128 / 32" in run.stdout
