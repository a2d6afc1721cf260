"""A random workload, the same for both engines: waves of prompts cut from a few shared prefixes
(prefix-cache hits at every length, including mid-block), random output lengths, prefill split into
small chunks and a KV budget so small that requests are preempted.  VTENSOR's greedy tokens equal
vanilla vLLM's, and every mapping is undone at the end.  A second workload has the requests arrive
one by one while others run, with random priorities under vLLM's priority scheduling."""
from __future__ import annotations

import json
import random

import pytest

from test_e2e_vtensor import _engine, _shutdown, _stats

pytestmark = pytest.mark.e2e

SEED = 1
WORDS = "alpha beta gamma delta river mountain ocean city forest stone light shadow music paper".split()
BLOCK, KV_BYTES_PER_TOKEN = 32, 2 * 30 * 3 * 64 * 4  # SmolLM2 in float32: K and V, 30 layers, 3 KV heads, dim 64


def _prompts(tokenizer, rng):
    """Three shared prefixes drawn now, and a function drawing a prompt (token ids) cut from one."""
    def text(lo, hi):
        return tokenizer(" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))))["input_ids"]

    prefixes = [text(40, 150) for _ in range(3)]

    def prompt():
        prefix = rng.choice(prefixes)
        return (prefix[: rng.randint(len(prefix) // 2, len(prefix))] + text(1, 40))[:300]
    return prompt


def _waves(llm, rng):
    """Three waves of 6-14 requests, each wave sent at once and run to the end."""
    from vllm import SamplingParams

    prompt = _prompts(llm.get_tokenizer(), rng)
    out = []
    for _ in range(3):
        wave = [(prompt(), rng.randint(1, 80)) for _ in range(rng.randint(6, 14))]
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in wave],
                            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in wave],
                            use_tqdm=False)
        out.append([list(o.outputs[0].token_ids) for o in outs])
    return out


def _arrivals(llm, rng):
    """30 requests with random priorities, each added 0-6 engine steps after the one before, so they
    arrive while others are prefilling or decoding."""
    from vllm import SamplingParams

    prompt = _prompts(llm.get_tokenizer(), rng)
    step, pending = 0, []
    for i in range(30):
        step += rng.randint(0, 6)
        pending.append((step, f"r{i}", prompt(), rng.randint(1, 60), rng.randint(0, 3)))
    engine, out, step = llm.llm_engine, {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and not engine.has_unfinished_requests():
            step = max(step, pending[0][0])  # a step with nothing to run would wait for output forever
        while pending and pending[0][0] <= step:
            _, req_id, ids, n, priority = pending.pop(0)
            engine.add_request(req_id, {"prompt_token_ids": ids},
                               SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), priority=priority)
        out.update((o.request_id, list(o.outputs[0].token_ids)) for o in engine.step() if o.finished)
        step += 1
    return out


def _run(model, stats_file, workload=_waves, **kw):
    llm = _engine(model, stats_file, max_model_len=512, block_size=BLOCK, max_num_batched_tokens=48, max_num_seqs=16,
                  kv_cache_memory_bytes=24 * BLOCK * KV_BYTES_PER_TOKEN, **kw)  # 24 blocks: 1.5 requests of 512
    out = workload(llm, random.Random(SEED))
    stats = _stats(stats_file) if "attention_backend" in kw else {}
    _shutdown(llm)
    return out, stats


@pytest.fixture(scope="module")
def vanilla_waves(smollm2_path, tmp_path_factory):
    return _run(smollm2_path, tmp_path_factory.mktemp("vanilla") / "unused.json")[0]


@pytest.mark.parametrize("map_ahead", [False, True], ids=["map-in-step", "map-ahead"])
def test_random_workload_matches_vanilla(smollm2_path, tmp_path, vanilla_waves, monkeypatch, map_ahead):
    """Also with ``VTENSOR_MAP_AHEAD=1``: decoding requests' next chunks mapped by a helper thread, taken by
    the step that gets the block (or given back: preemption, a step short of memory)."""
    if map_ahead:
        monkeypatch.setenv("VTENSOR_MAP_AHEAD", "1")  # the engine's processes inherit it at spawn
    out, stats = _run(smollm2_path, tmp_path / "stats.json", attention_backend="VTENSOR")
    assert out == vanilla_waves
    assert stats["preemptions"] > 0 and stats["prefix_hit_bytes"] > 0, json.dumps(stats)  # what it is meant to cover
    assert (stats["mapped_ahead"] > 0) == map_ahead, json.dumps(stats)
    assert stats["mapped_bytes"] == 0 and stats["running_requests"] == 0
    assert stats["resident_bytes"] == stats["cached_bytes"] + stats["reserve_bytes"] <= stats["budget_bytes"]


@pytest.mark.slow  # preemption and prefix hits under a random workload also run in the test above
def test_random_arrivals_with_priorities_match_vanilla(smollm2_path, tmp_path):
    """vLLM's priority scheduling: a request that cannot grow preempts the lowest-priority one running
    (which may be the one that just arrived), and waiting requests are admitted by priority."""
    kw = dict(workload=_arrivals, scheduling_policy="priority")
    ref, _ = _run(smollm2_path, tmp_path / "unused.json", **kw)
    out, stats = _run(smollm2_path, tmp_path / "stats.json", attention_backend="VTENSOR", **kw)
    assert len(ref) == 30 and out == ref
    assert stats["preemptions"] > 0 and stats["prefix_hit_bytes"] > 0, json.dumps(stats)
    assert stats["mapped_bytes"] == 0 and stats["running_requests"] == 0
