"""The real model through vLLM with the plugin installed: the answers a user sees."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_llm_chat_answers_paris(vanilla_llm):
    """The converted checkpoint is a working SmolLM2 (a test of the model files, so vanilla vLLM runs
    it; VTENSOR on this model is compared with vanilla token for token in test_e2e_vtensor.py, and
    served by the demo below)."""
    from vllm import SamplingParams

    out = vanilla_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=32),
    )
    assert "Paris" in out[0].outputs[0].text


def test_demo_serves_a_chat_completion_and_loads_the_plugin_in_every_process(tmp_path):
    """`make demo`'s job: `vllm serve` + an OpenAI chat completion.  Its server log shows the
    plugins' register() ran in the API server, the engine core and the worker."""
    log = tmp_path / "server.log"
    run = subprocess.run(
        [sys.executable, "-m", "vllm_vtensor.demo", "--log", str(log)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    answer = re.search(r"^A: (.*)$", run.stdout, re.M)
    assert answer and "Paris" in answer.group(1), run.stdout

    text = log.read_text()
    for plugin in ("vllm-vtensor", "flexoffload"):
        pids = set(re.findall(rf"{plugin} plugin registered in pid (\d+)", text))
        assert len(pids) == 3, (plugin, pids)
    procs = set(re.findall(r"vllm-vtensor plugin registered in pid \d+ \((\w+?)(?:_DP\d+|-\d+)?\)", text))
    assert procs == {"MainProcess", "EngineCore", "VllmWorker"}, procs
