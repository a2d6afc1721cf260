"""VTENSOR with the engine core and worker in the caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0:
the runner patches, the KV space and its helper threads then live beside the frontend), with
requests that run until they fill max_model_len (every virtual block of their slot mapped): the
same tokens as vanilla vLLM run the same way, and nothing stays mapped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        kw = {"attention_backend": "VTENSOR"} if sys.argv[2] == "vtensor" else {}
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True, seed=0,
                  max_num_batched_tokens=64, kv_cache_memory_bytes=64 << 20, **kw)
        ids = llm.get_tokenizer()("The quick brown fox jumps over the lazy dog. " * 15)["input_ids"]
        lengths = (100, 75, 115, 10)
        outs = llm.generate([{"prompt_token_ids": ids[:n]} for n in lengths],
                            [SamplingParams(temperature=0, max_tokens=128 - n, ignore_eos=True) for n in lengths])
        llm.generate("Hi", SamplingParams(max_tokens=1))  # one more step tells the worker the others finished
        time.sleep(2)  # for the helper thread to write the worker's figures (VTENSOR_STATS_FILE)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


def _run(model, mode, stats_file):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VTENSOR_STATS_FILE": str(stats_file)}
    run = subprocess.run([sys.executable, "-c", SCRIPT, model, mode], capture_output=True, text=True,
                         timeout=600, env=env)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, (run.stdout + run.stderr)[-3000:]
    return json.loads(line[len("RESULT "):])


def test_in_process_engine_matches_vanilla(smollm2_path, tmp_path):
    stats_file = tmp_path / "stats.json"
    out = _run(smollm2_path, "vtensor", stats_file)
    assert out == _run(smollm2_path, "vanilla", tmp_path / "unused.json")
    assert [len(o) for o in out] == [28, 53, 13, 118]  # each ran to max_model_len
    stats = json.loads(stats_file.read_text())
    assert stats["maps"] > 0 and stats["peak_live_tokens"] >= 128
    assert stats["mapped_bytes"] <= stats["chunk_bytes"] and stats["running_requests"] <= 1  # at most "Hi"'s block
