"""benchmarks/gpu_e2e.py (the end-to-end comparison at a real model's shape) runs on a CPU at a tiny
shape: random weights (load_format="dummy"), requests by token ids, vanilla and VTENSOR (vLLM's
kernel over VTENSOR's memory) side by side on all workloads, and the JSON holds what the docs and
the goals read, each figure consistent with the others. A variant of the VTENSOR engine with a
setting and an engine argument of its own (no ready reserve, another block size) runs beside it, and
the two engines' figures show each got its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_vtensor.worker import DEFAULT_PRECREATE_BYTES

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
VT, VARIANT = "vtensor_vllm_kernel", "vtensor_vllm_kernel+VTENSOR_PRECREATE_BYTES=0+block_size=64"
SUMMARY_KEYS = ("throughput_ratio", "itl_ratio", "multi_turn_ttft_ratio", "long_doc_ttft_ratio",
                "kv_committed_over_need", "failed_requests")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-e2e")
    # with the per-step profile on, as benchmarks/gpu_vllm.sh runs it on a GPU
    env = dict(os.environ, VTENSOR_STEP_PROFILE=str(out / "steps"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks" / "step_profile"), str(ROOT),
                                           os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_e2e.py"), "--shape", "tiny", "--quick",
                          "--rounds-c", "1", "--settle-s", "1.5", "--out-dir", str(out),
                          "--engines", f"vanilla,{VT},{VARIANT}", "--vtensor-env", "VTENSOR_CHUNK_LINGER_S=0.5",
                          "--tag", "variants"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    path = out / "gpu-e2e-cpu-tiny-variants.json"
    return json.loads(path.read_text()), path, run.stdout


def test_every_workload_ran_on_both_engines_and_nothing_failed(result):
    data, path, stdout = result
    assert data["partial"] is False and data["engines_run"] == ["vanilla", VT, VARIANT]
    for name in (VT, VARIANT):
        assert data["engines"][name]["attention_backend"] == "VTENSOR"
        assert data["engines"][name]["prefix_caching"] is True
    assert data["engines"][VT]["vtensor_env"] == {"VTENSOR_CHUNK_LINGER_S": "0.5"}
    assert data["engines"][VARIANT]["vtensor_env"] == {"VTENSOR_CHUNK_LINGER_S": "0.5", "VTENSOR_PRECREATE_BYTES": "0"}
    assert data["engines"]["vanilla"]["vtensor_env"] is None
    assert data["engines"][VARIANT]["block_size"] == 64 != data["engines"][VT]["block_size"]
    assert data["engines"][VARIANT]["own_engine_args"] == {"block_size": 64}
    assert set(data["summaries_over_vanilla"]) == {VARIANT}
    assert data["summaries_over_vanilla"][VARIANT]["throughput_ratio"] == pytest.approx(
        data["results"]["A"][VARIANT]["output_tok_s"] / data["results"]["A"]["vanilla"]["output_tok_s"])
    w = data["workload_sizes"]
    for name in data["engines_run"]:
        a, b, c = (data["results"][k][name] for k in "ABC")
        assert a["failed"] == b["failed"] == c["failed"] == 0
        assert a["output_tok_s"] > 0 and 0 < a["itl_p50_s"] <= a["itl_p99_s"]
        assert len(b["turns"]) == w["b_turns"] and 0 < b["ttft_p50_s"] <= b["ttft_p99_s"]
        # each turn's prompts hold the whole conversation so far: system prompt, every turn's question and answer
        assert b["turns"][-1]["context_tokens_max"] >= w["b_system"] + w["b_turns"] * w["b_new"][0] + (
            w["b_turns"] - 1) * w["b_out"]
        assert c["ttft_p50_s"] > 0
    assert data["summary"]["failed_requests"] == 0
    assert path.with_suffix(".png").stat().st_size > 0
    assert "(B) TTFT p50 all turns" in stdout


def test_summary_holds_the_goal_figures_as_ratios(result):
    data, _, _ = result
    s, res = data["summary"], data["results"]
    assert all(k in s for k in SUMMARY_KEYS) and data["summary_engine"] == VT
    van, vt = res["A"]["vanilla"], res["A"][VT]
    assert s["throughput_ratio"] == pytest.approx(vt["output_tok_s"] / van["output_tok_s"])
    assert s["multi_turn_ttft_ratio"] == pytest.approx(
        res["B"][VT]["ttft_p50_s"] / res["B"]["vanilla"]["ttft_p50_s"])
    assert set(data["goals"]) >= set(SUMMARY_KEYS)
    assert data["goals"]["failed_requests"]["met"] is True
    assert data["commit"] and data["date"] and data["command"].startswith("python benchmarks/gpu_e2e.py")


def test_kv_memory_peaks_are_exact_and_given_back(result):
    """(D): VTENSOR's peak is at least what the live tokens needed (no shared prefix in A) and within its
    budget; after the load and a prefix-cache reset its memory falls to the ready reserve."""
    data, _, _ = result
    per_token = data["kv_bytes_per_token"]
    a = data["memory"]["A"][VT]
    assert 0 < a["peak_need_bytes"] <= a["peak_committed_bytes"]
    assert a["peak_need_bytes"] % per_token == 0
    vanilla = data["memory"]["A"]["vanilla"]
    assert vanilla["peak_committed_bytes"] == data["engine_kwargs"]["kv_cache_memory_bytes"]
    for wl in "ABC":
        for name in (VT, VARIANT):
            mem = data["results"][wl][name]
            mems = [r["memory"] for r in mem["rounds"]] if "rounds" in mem else [mem["memory"]]
            for m in mems:
                assert m["running_requests_after"] == 0 and m["mapped_bytes_after"] == 0
                assert m["peak_resident_bytes"] <= m["allocator"]["budget_bytes"]
                # what stays once the prefix cache is reset and the linger time passed: the ready reserve
                # (DEFAULT_PRECREATE_BYTES), nothing else; none in the variant without one
                after = m["resident_bytes_after_prefix_cache_reset"]
                chunk = m["allocator"]["chunk_bytes"]
                if name == VT:
                    assert DEFAULT_PRECREATE_BYTES - chunk < after <= DEFAULT_PRECREATE_BYTES + chunk
                else:
                    assert after <= chunk < DEFAULT_PRECREATE_BYTES


def test_the_step_profile_splits_block_updates_into_vmm_calls(result):
    """Profiled (benchmarks/step_profile/), each engine's steps are recorded; a VTENSOR engine's block
    updates are split into the VMM calls they made, which took part of that time; vanilla made none."""
    data, _, _ = result
    prof = data["step_profile"]
    assert set(prof) == set(data["engines_run"])
    assert prof["vanilla"]["block_update_calls"] == {} and prof["vanilla"]["block_update_seconds"] == 0
    for name in (VT, VARIANT):
        p = prof[name]
        calls = p["block_update_calls"]
        assert p["steps"] > 0 and calls["map_many"]["calls"] > 0 and calls["unmap"]["calls"] > 0
        assert 0 < sum(c["seconds"] for c in calls.values()) <= p["block_update_seconds"] + 1e-3
        kinds = p["by_step_kind"]  # each workload starts and finishes requests; split, the steps add up
        assert {"starting requests", "finishing requests"} <= set(kinds)
        assert sum(k["steps"] for k in kinds.values()) == p["steps"]
        assert kinds["starting requests"]["block_update_calls"]["map_many"]["calls"] > 0
    # the ready reserve is made beside the steps by the pool's thread; the variant keeps none
    assert prof[VT]["calls_beside"]["create_chunk"]["calls"] > 0
    assert "create_chunk" not in prof[VARIANT]["calls_beside"]


@pytest.mark.parametrize("args, says", [
    (["--vtensor-env", "VTENSOR_NOT_A_SETTING=1"], "not an environment setting"),
    (["--vtensor-env", "VTENSOR_CHUNK_LINGER_S=-1"], "out of range"),
    (["--vtensor-env", "VTENSOR_DEFERRED_UNMAP"], "NAME=VALUE"),
    (["--engines", "vanilla,vtensor+VTENSOR_DEFERRED_UNMAP=maybe"], "VTENSOR_DEFERRED_UNMAP='maybe'"),
    (["--engines", "vanilla,vanilla+VTENSOR_DEFERRED_UNMAP=1"], "only a VTENSOR engine"),
    (["--engines", "vanilla,vtensor+blok_size=64"], "neither a VTENSOR_ setting nor one of vLLM's engine arguments"),
    (["--engines", "vanilla,vtensor+VTENSOR_DEFERRED_UNMAP"], "+NAME=VALUE"),
    (["--engines", "vanilla,vtensr"], "an engine is one of"),
    (["--engines", "vanilla,vtensor,vtensor"], "each once"),
])
def test_an_engine_or_setting_it_cannot_use_is_a_usage_error_before_any_engine_starts(args, says):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_e2e.py"), "--shape", "tiny", "--quick",
                          *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and says in run.stderr, run.stderr[-2000:]


def test_each_engines_kv_budget_fits_the_card():
    """On an H200 the three engines at the 8B shape keep 20 GiB of KV each (the committed runs); on an H100
    two get what fits beside their weights, and three with too little room stop before any engine starts."""
    import importlib
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "benchmarks"))
    g = importlib.import_module("gpu_e2e")
    from vllm_vtensor.models import SHAPES

    weights = g.weight_bytes(SHAPES["llama-3.1-8b"], 2)
    assert weights == 8_030_261_248 * 2  # Llama-3.1-8B's parameter count, bf16
    assert g.weight_bytes(SHAPES["llama-3.2-1b"], 2) == 1_235_814_400 * 2  # tied embedding counted once
    h200, h100 = 143771 << 20, 81559 << 20
    assert g.fit_engines(h200, weights, 3) == (20 << 30, 0.28, "default")
    assert g.fit_engines(None, weights, 3)[:2] == (20 << 30, 0.28)  # card unknown: the defaults
    kv, share, why = g.fit_engines(h100, weights, 2)
    assert 16 << 30 < kv < 20 << 30 and share == 0.46 and why.startswith("fitted to the card")
    assert 2 * (weights + kv + g.ENGINE_OVERHEAD) <= g.USABLE * h100
    with pytest.raises(SystemExit, match="run fewer engines"):
        g.fit_engines(h100, weights, 5)
