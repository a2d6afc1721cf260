"""benchmarks/offload_cuda.py (FlexInfer inside vLLM at device budgets, against vLLM's weight offloading and all
weights resident, on a GPU) runs its whole protocol on a CPU at a tiny shape: random weights written, each engine in
its own process, FlexInfer streaming, its answers equal to the resident engine's, the JSON and plot written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def test_the_gpu_offload_benchmark_runs_its_protocol_on_a_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "offload_cuda.py"), "--shape", "tiny", "--quick",
                          "--model-dir", str(tmp_path / "model"), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    data = json.loads((tmp_path / "offload-cuda-cpu-tiny.json").read_text())
    assert (tmp_path / "offload-cuda-cpu-tiny.png").stat().st_size > 0
    assert data["command"].startswith("python benchmarks/offload_cuda.py") and data["commit"] and data["weight_bytes"] > 0
    assert set(data["rows"]) == {"resident", "flexinfer@0.8"} and "not run" in data["vllm_offload"]
    for row in data["rows"].values():
        assert "error" not in row, row.get("log_tail")
        assert [row[f"b{b}"]["tokens"] for b in (1, 16)] == [8, 128] and row["b16"]["tok_s"] > 0
    flex = data["rows"]["flexinfer@0.8"]["flexinfer"]
    assert flex["bytes_streamed"] > 0 and flex["io_engine"] == "aio" and flex["forwards"] > 0
    assert [data["summary"][f"0.8/b{b}"]["tokens_equal_resident"] for b in (1, 16)] == [True, True]
    assert data["summary"]["0.8/b1"]["host_to_device_bound_tok_s"] is None  # no GPU: no host-to-device link
