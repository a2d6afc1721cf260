"""Tensor parallel 2 (each rank holds its own KV space for its heads): greedy tokens and top-5
logprobs equal vanilla vLLM at TP=2, under vLLM's ``mp`` executor and under its Ray executor on a
local Ray cluster the test starts (``ray start --head``). Uses the tiny llama (4 heads; SmolLM2's 9 do
not split)."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        kw = json.loads(sys.argv[2])
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=64 << 20, tensor_parallel_size=2, **kw)
        prompts = [[1, 500 + i, 900, 33 * i] * (3 + 5 * i) for i in range(4)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=16, logprobs=5))
        print("RESULT " + json.dumps([
            {"tokens": list(o.outputs[0].token_ids),
             "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
            for o in outs]))
""")


def _run(model, env=None, **kw):
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", **(env or {})}  # one core per rank
    run = subprocess.run([sys.executable, "-c", SCRIPT, model, json.dumps(kw)], capture_output=True, text=True,
                         timeout=900, env=env)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, (run.stdout + run.stderr)[-3000:]
    return json.loads(line[len("RESULT "):]), run.stdout + run.stderr


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        for gs, ws in zip(g["logprobs"], w["logprobs"], strict=True):
            assert gs.keys() == ws.keys()
            assert all(abs(gs[t] - ws[t]) < 1e-3 for t in ws), (gs, ws)


@pytest.fixture(scope="module")
def vanilla_tp2(tiny_llama_path):
    return _run(tiny_llama_path)[0]


def test_tp2_vtensor_matches_vanilla(tiny_llama_path, vanilla_tp2):
    _assert_same(_run(tiny_llama_path, attention_backend="VTENSOR")[0], vanilla_tp2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster, as `ray start --head` makes one on each node of a deployment, with
    token authentication (Ray's default for `ray start`); yields the environment a client needs: its
    address (the node's IP, which Ray picks) and the token. Ray comes from PyPI (the test extra)."""
    pytest.importorskip("ray", reason="Ray is in the test extra: pip install -e '.[test]'")
    ray_bin = Path(sys.executable).with_name("ray")
    # a short folder: Ray's session sockets live inside it, and a Unix socket's path has at most 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # a node started from a plain shell: this project's settings, which earlier tests may have left in
    # this process's environment, and the suite's core for this worker's engines (tests/conftest.py) would
    # win over the driver's in every worker (vLLM fills in only what a node does not set)
    node_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("VTENSOR_", "FLEXOFFLOAD_")) and k != "VLLM_CPU_OMP_THREADS_BIND"}
    head = None
    try:
        # the ports are chosen free, then released for Ray to bind: another process may take one meanwhile
        # (GCS then fails to start), so a head that exits before giving its address is started again
        for attempt in range(3):
            log = temp / f"head-{attempt}.log"
            with open(log, "w") as out:
                head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={_free_port()}",
                                         f"--ray-client-server-port={_free_port()}",
                                         f"--dashboard-agent-listen-port={_free_port()}",
                                         "--num-cpus=2", f"--object-store-memory={100 << 20}",
                                         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                                        stdout=out, stderr=subprocess.STDOUT, env={**node_env, **env})
            deadline, address = time.monotonic() + 120, None
            while address is None and head.poll() is None:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                found = re.search(r"--address='([^']+)'", log.read_text())
                address = found and found.group(1)
                time.sleep(1)
            if address is not None:
                break
        assert address is not None, log.read_text()[-3000:]
        yield {**env, "RAY_ADDRESS": address}
    finally:
        if head is not None:
            head.terminate()  # --block: stopping the command stops the node it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # VTENSOR at TP 2 runs in test_tp2_vtensor_matches_vanilla, the Ray executor in the FlexInfer test below
def test_ray_tp2_vtensor_matches_vanilla(tiny_llama_path, vanilla_tp2, ray_cluster):
    got, log = _run(tiny_llama_path, env=ray_cluster, attention_backend="VTENSOR",
                    distributed_executor_backend="ray")
    assert "CpuRayWorkerProc" in log, "the workers did not run as Ray actors"
    _assert_same(got, vanilla_tp2)


def test_ray_tp2_flexinfer_matches_vanilla(tiny_llama_path, vanilla_tp2, ray_cluster, tmp_path):
    """FlexInfer under Ray at TP 2: each rank streams its own shard (layers and the tied embedding/lm_head,
    whose rows are read for this rank's part of the vocabulary) from its own weight store."""
    stats = tmp_path / "flex.json"
    got, log = _run(tiny_llama_path, env={**ray_cluster, "FLEXOFFLOAD_STATS_FILE": str(stats)},
                    distributed_executor_backend="ray", load_format="flexinfer",
                    model_loader_extra_config={"memory_budget": 0.9, "cache_dir": str(tmp_path / "cache")})
    assert "CpuRayWorkerProc" in log, "the workers did not run as Ray actors"
    _assert_same(got, vanilla_tp2)
    ranks = [json.loads(p.read_text()) for p in (stats, tmp_path / "flex.tp1of2.json")]
    assert len({r["store_path"] for r in ranks}) == 2, "each rank reads its own shard's store"
    from flexoffload.metrics import snapshots

    assert snapshots(str(stats)) == {"0": ranks[0], "1": ranks[1]}  # what /metrics reports, per tp_rank
    for r in ranks:
        assert r["head_streamed"] and r["forwards"] > 0 and r["bytes_streamed"] > 0
        assert r["resident_bytes"] + r["arena_bytes"] <= r["budget_bytes"] < r["weight_bytes"]
