"""The OpenAI server under memory pressure: 24 concurrent requests of four kinds (chat with a shared
system prompt, completions with logprobs, echo with a stop string, streaming chat), twice, against
a KV space of 16 blocks, so that vLLM preempts.  VTENSOR's server gives vanilla's server's greedy
answers, and preempts through vLLM's own scheduler."""
from __future__ import annotations

import concurrent.futures as cf
import re
import urllib.request

import pytest

from test_e2e_server import _vtensor_gauges
from vllm_vtensor.demo import Server

pytestmark = pytest.mark.e2e

# 24 MB of KV: 16 blocks of 32 tokens of SmolLM2 in float32, one max_model_len request and no more
ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--kv-cache-memory-bytes", "24M",
        "--max-num-batched-tokens", "96", "--block-size", "32"]
SYSTEM = "You are a careful assistant. Answer in one sentence. " * 10


def _jobs(client, model):
    def chat(i):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me fact number {i} about rivers."}]
        return client.chat.completions.create(model=model, messages=messages, temperature=0,
                                              max_tokens=40).choices[0].message.content

    def scored(i):
        choice = client.completions.create(model=model, prompt=f"Story {i}: once upon a time", temperature=0,
                                           max_tokens=30, logprobs=2).choices[0]
        return choice.text, choice.logprobs.tokens

    def echoed(i):
        return client.completions.create(model=model, prompt=SYSTEM + f" Q{i}: name a color.", temperature=0,
                                         max_tokens=25, echo=True, stop=["."]).choices[0].text

    def streamed(i):
        stream = client.chat.completions.create(model=model, temperature=0, max_tokens=50, stream=True,
                                                messages=[{"role": "user", "content": f"Count to {i % 7 + 3} in words."}])
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    kinds = (chat, scored, echoed, streamed)
    return [(kinds[i % 4], i) for i in range(24)]


def _serve(model, extra, log):
    from openai import OpenAI

    with Server(model, ARGS + extra, log_path=str(log)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        name = client.models.list().data[0].id
        answers = []
        with cf.ThreadPoolExecutor(12) as pool:
            for _ in range(2):
                answers.append([f.result() for f in [pool.submit(job, i) for job, i in _jobs(client, name)]])
        metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    preemptions = float(re.search(r"^vllm:num_preemptions_total\{[^}]*\} (\S+)$", metrics, re.M).group(1))
    return answers, preemptions, metrics


def test_concurrent_requests_under_memory_pressure_match_vanilla(smollm2_path, tmp_path):
    ref, ref_preemptions, _ = _serve(smollm2_path, [], tmp_path / "vanilla.log")
    out, preemptions, metrics = _serve(smollm2_path, ["--attention-backend", "VTENSOR"], tmp_path / "vtensor.log")
    assert out == ref
    assert preemptions > 0 and ref_preemptions > 0  # both engines ran out of KV and preempted
    assert _vtensor_gauges(metrics)["vllm_vtensor_preemptions_total"] == preemptions
