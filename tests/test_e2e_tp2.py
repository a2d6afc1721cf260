"""Tensor parallel 2 with VTENSOR (each rank holds its own KV space for its heads): greedy
tokens equal vanilla vLLM at TP=2.  Uses the tiny llama (4 heads; SmolLM2's 9 do not split)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        kw = {"attention_backend": "VTENSOR"} if sys.argv[2] == "vtensor" else {}
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=64 << 20, tensor_parallel_size=2, **kw)
        prompts = [[1, 500 + i, 900, 33 * i] * (3 + 5 * i) for i in range(4)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=16))
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


def _run(model, mode):
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank
    run = subprocess.run([sys.executable, "-c", SCRIPT, model, mode], capture_output=True, text=True,
                         timeout=900, env=env)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, (run.stdout + run.stderr)[-3000:]
    return json.loads(line[len("RESULT "):])


def test_tp2_vtensor_matches_vanilla(tiny_llama_path):
    assert _run(tiny_llama_path, "vtensor") == _run(tiny_llama_path, "vanilla")
