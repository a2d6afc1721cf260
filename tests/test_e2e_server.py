"""The OpenAI server with `--attention-backend VTENSOR` and `--load-format flexinfer` (50% budget):
chat and completions, streaming and not, clients hanging up mid-stream,
answers equal to vanilla greedy decoding, and the allocator's and FlexInfer's figures in /metrics."""
from __future__ import annotations

import re

import pytest

from vllm_vtensor.demo import Server

pytestmark = pytest.mark.e2e

ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--kv-cache-memory-bytes", "256M",
        "--load-format", "flexinfer", "--model-loader-extra-config", '{"memory_budget": 0.5}']


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with Server(smollm2_path, [*ARGS, "--attention-backend", "VTENSOR"], log_path=str(log)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused")


def _model(client):
    return client.models.list().data[0].id


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model=_model(client), messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0.0, max_tokens=32,
    )
    assert "Paris" in reply.choices[0].message.content


def test_streaming_chat_equals_non_streaming(client):
    kw = dict(model=_model(client), messages=[{"role": "user", "content": "Name three fruits."}],
              temperature=0.0, max_tokens=24)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert len(pieces) > 3 and "".join(pieces) == whole


def test_completions_streaming_and_not(client):
    kw = dict(model=_model(client), prompt="The capital of France is", temperature=0.0, max_tokens=8)
    whole = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == whole and "Paris" in whole


def test_metrics_expose_the_allocator(server, client):
    reply = client.completions.create(model=_model(client), prompt="Once upon a time " * 60, max_tokens=4)
    prompt_tokens = reply.usage.prompt_tokens  # ~240
    text = server.metrics()
    values = _vtensor_gauges(text)
    assert values["vllm_vtensor_budget_bytes"] > 0
    block = values["vllm_vtensor_block_size_tokens"]
    assert block == 32  # VTENSOR's choice on CPU when --block-size is not given
    assert values["vllm_vtensor_chunk_bytes"] == block * 2 * 30 * 3 * 64 * 4  # all layers' K and V, fp32
    assert values["vllm_vtensor_map_operations_total"] >= -(-prompt_tokens // block)  # the prompt's blocks
    assert values["vllm_vtensor_resident_bytes"] <= values["vllm_vtensor_peak_resident_bytes"] \
        <= values["vllm_vtensor_budget_bytes"]
    assert values["vllm_vtensor_peak_live_tokens"] >= prompt_tokens
    # the worker as ps sees it: RSS from its snapshot, PSS read from its /proc at scrape time
    assert 0 < values["vllm_vtensor_worker_pss_bytes"] <= values["vllm_vtensor_worker_rss_bytes"]
    assert "vllm:" in text  # vLLM's own metrics are still there


def _flexinfer_figures(text: str) -> dict[str, float]:
    """Rank 0's FlexInfer figures in /metrics (the server runs one rank)."""
    return {k: float(v) for k, v in re.findall(r'^vllm_flexinfer_(\w+)\{tp_rank="0"\} (\S+)$', text, re.M)}


def _iterations(text: str) -> float:
    """vLLM's count of engine steps (each runs one forward pass here)."""
    return float(re.search(r"^vllm:iteration_tokens_total_count\{[^}]*\} (\S+)$", text, re.M).group(1))


def test_metrics_expose_flexinfer_streaming(server, client):
    """FlexInfer's figures in /metrics: the plan at 50% and running totals that count every forward
    pass, the last ones before the engine idles included (written by the publisher after its interval)."""
    import time

    model = _model(client)
    client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0)
    time.sleep(1.0)  # idle: the last passes' figures are written at most 0.2 s after the last snapshot
    text = server.metrics()
    before, steps_before = _flexinfer_figures(text), _iterations(text)
    client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
                              extra_body={"ignore_eos": True})
    time.sleep(1.0)
    text = server.metrics()
    after, steps = _flexinfer_figures(text), _iterations(text) - steps_before
    assert steps >= 12  # the prompt's pass and eleven more tokens'
    assert after["forwards_total"] - before["forwards_total"] == steps
    per_forward = after["streamed_bytes_per_forward"]
    assert per_forward > 0 and after["host_bytes"] == 0  # nothing on the host tier here: all from disk
    read = after["disk_read_bytes_total"] - before["disk_read_bytes_total"]
    # every pass reads the streamed weights once; reads ahead cross from one pass into the next
    assert (steps - 1) * per_forward <= read <= (steps + 1) * per_forward, (read / per_forward, steps)
    assert after["budget_bytes"] == pytest.approx(after["weight_bytes"] / 2, abs=1)
    assert after["resident_bytes"] + after["arena_bytes"] <= after["budget_bytes"]
    assert after["io_seconds_total"] > before["io_seconds_total"] and 0 <= after["overlap"] <= 1
    assert after["wait_seconds_total"] >= before["wait_seconds_total"]


def _vtensor_gauges(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^(vllm_vtensor_\w+) (\S+)$", text, re.M)}


def _settled_metrics(server, timeout=30.0):
    """The allocator's gauges once the worker has cleared finished or aborted requests."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        values = _vtensor_gauges(server.metrics())
        if values["vllm_vtensor_running_requests"] == 0 or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def test_clients_that_hang_up_mid_stream_leave_nothing_mapped(server, client):
    """Streaming clients that disconnect after a few tokens: vLLM aborts their requests, VTENSOR
    unmaps their KV, and the server answers the next request as before."""
    from concurrent.futures import ThreadPoolExecutor

    model = _model(client)

    def hang_up(i):
        stream = client.chat.completions.create(
            model=model, stream=True, max_tokens=300, temperature=0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Tell a long story about the number {i}. " * (1 + 5 * i)}])
        got = sum(1 for _, _ in zip(range(3), stream))  # three chunks, then close the connection
        stream.close()
        return got

    def generated():
        found = re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", server.metrics(), re.M)
        return float(found.group(1))

    import time

    before = generated()
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(hang_up, range(4))) == [3] * 4
    t0 = time.monotonic()
    # no further request arrives: the engine goes idle, and the memory still comes back within the
    # linger time (1 s) and a step's margin
    deadline = t0 + 30
    while True:
        values = _vtensor_gauges(server.metrics())
        settled = (values["vllm_vtensor_running_requests"] == 0 and values["vllm_vtensor_mapped_bytes"] == 0
                   and values["vllm_vtensor_lingering_bytes"] == 0)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert settled and time.monotonic() - t0 < 5, values
    assert generated() - before < 4 * 300 / 3  # vLLM aborted them: none ran on to its 300 tokens
    reply = client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content


def test_multi_engine_benchmark_counts_every_streamed_token(client):
    """benchmarks/multi_engine.py's client counts the tokens a server streams by their ids (what it gets
    from a server without a tokenizer, as on a GPU there): all of them, once."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import multi_engine

    for prompt in ([101, 2000, 3000] * 20, [7] * 5):
        r = multi_engine._request(client, _model(client), prompt, max_tokens=17)
        assert r["ok"] and r["tokens"] == 17 and 0 < r["ttft"] <= r["end"] - r["start"], r
