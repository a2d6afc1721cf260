"""VTENSOR on sliding-window models: every layer the same 64-token window (Mistral-style, one KV cache
group), and a hybrid with sliding-window and full layers alternating (Gemma-style, two groups over
one memory). Greedy tokens equal vanilla vLLM's for prompts several windows long, with prefix
caching on and off, chunked prefill forced and preemption forced; the blocks a request's window
leaves behind are unmapped as it moves on, so a long generation on the sliding layers holds a
window's worth of KV, not its history."""
from __future__ import annotations

import os

import pytest

from test_e2e_vtensor import _shutdown, _stats

pytestmark = pytest.mark.e2e

WINDOW = 64
ENGINE = dict(dtype="float32", max_model_len=1024, enforce_eager=True, seed=0, max_num_batched_tokens=64)
WORDS = "river stone cloud harbour lantern meadow violin copper thunder orchard".split()


@pytest.fixture(scope="module", params=[1, 2], ids=["every-layer", "hybrid"])
def model(request):
    from vllm_vtensor.models import build_tiny_llama

    return str(build_tiny_llama(sliding_window=WINDOW, sliding_every=request.param))


def _prompts(llm):
    tok = llm.get_tokenizer()
    texts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)) for i, n in enumerate((20, 90, 150, 260))]
    shared = " ".join(WORDS) * 12  # ~120 tokens shared by two prompts: a prefix-cache hit beyond the window
    return [{"prompt_token_ids": tok(t)["input_ids"]} for t in texts + [shared + " first", shared + " second"]]


def _run(llm):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = _prompts(llm)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts[:5], sp, use_tqdm=False)]
    out += [list(o.outputs[0].token_ids) for o in llm.generate(prompts[5:], sp, use_tqdm=False)]  # hits prompt 5
    return out


def _engine(model, stats_file, **kw):
    from vllm import LLM

    os.environ["VTENSOR_STATS_FILE"] = str(stats_file)
    return LLM(model=model, **{**ENGINE, **kw})


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    llm = _engine(model, tmp_path_factory.mktemp("vanilla") / "unused.json", kv_cache_memory_bytes=64 << 20)
    out = _run(llm)
    _shutdown(llm)
    return out


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_sliding_window_tokens_equal_vanilla(model, tmp_path, reference, prefix_caching):
    stats = tmp_path / "stats.json"
    llm = _engine(model, stats, attention_backend="VTENSOR", kv_cache_memory_bytes=64 << 20,
                  enable_prefix_caching=prefix_caching)
    out = _run(llm)
    after = _stats(stats)
    _shutdown(llm)
    assert out == reference
    assert after["mapped_bytes"] == 0 and after["running_requests"] == 0
    if not prefix_caching:
        assert after["resident_bytes"] == after["reserve_bytes"]


def test_sliding_window_under_preemption_equals_vanilla(model, tmp_path, reference):
    """A budget a few requests' worth for six requests of up to 300 tokens, so vLLM preempts: 12 blocks of
    32 tokens when every layer slides (a request holds only its window's blocks), 18 for the hybrid (its
    full layers hold the whole history), whose blocks hold 2 of the 4 layers each."""
    stats = tmp_path / "stats.json"
    page = 32 * 2 * 2 * 64 * 4  # a layer's K and V for one block: 32 tokens x 2 KV heads x 64, float32
    budget, max_len = (12 * 4 * page, 512) if "-every1" in model else (18 * 2 * page, 320)
    llm = _engine(model, stats, attention_backend="VTENSOR", kv_cache_memory_bytes=budget,
                  enable_prefix_caching=False, max_model_len=max_len)
    out = _run(llm)
    after = _stats(stats)
    _shutdown(llm)
    assert out == reference
    assert after["preemptions"] > 0  # the budget did bind
    assert after["mapped_bytes"] == 0


def test_a_long_generation_holds_a_windows_worth_of_kv(model, tmp_path):
    """One request generating 700 tokens past a 64-token window, prefix caching off: the blocks its
    window leaves behind are unmapped as it moves on, so its range never maps more than the window's
    blocks and the one being filled, and the memory held stays at that too (sampled from the worker's
    figures while it generates; the peak of memory held is exact)."""
    import json
    import threading
    import time

    from vllm import SamplingParams

    if "-every1" not in model:
        pytest.skip("a hybrid model's full-attention layers keep the whole history, by design")

    stats = tmp_path / "stats.json"
    os.environ["VTENSOR_PRECREATE_BYTES"] = "0"  # no ready reserve: the peak is the blocks held
    try:
        llm = _engine(model, stats, attention_backend="VTENSOR", kv_cache_memory_bytes=64 << 20,
                      enable_prefix_caching=False, max_model_len=1024)
    finally:
        del os.environ["VTENSOR_PRECREATE_BYTES"]
    mapped, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                s = json.loads(stats.read_text())
                mapped.append((s["live_tokens"], s["mapped_bytes"]))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    llm.generate([{"prompt_token_ids": list(range(100, 140))}],
                 SamplingParams(temperature=0.0, max_tokens=700, ignore_eos=True), use_tqdm=False)
    stop.set()
    sampler.join()
    after = _stats(stats)
    _shutdown(llm)
    block, chunk = after["block_size"], after["chunk_bytes"]
    window_blocks = -(-WINDOW // block) + 1  # the window straddles one more block
    assert after["peak_live_tokens"] >= 700  # the request did run that long (740 tokens: 24 blocks)
    late = [m for tokens, m in mapped if tokens > 400]
    assert late and max(late) <= (window_blocks + 1) * chunk, ([m / chunk for m in late], window_blocks)
    assert after["peak_resident_bytes"] <= (window_blocks + 1) * chunk
