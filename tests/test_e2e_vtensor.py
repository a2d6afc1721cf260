"""`attention_backend="VTENSOR"` inside vLLM: greedy outputs equal vanilla vLLM token for token
(mixed-length batches, forced chunked prefill, prefix caching on and off, forced preemption), and so
do vLLM's other ways of running requests (parallel sampling, prompt logprobs, beam search, requests
aborted mid-flight); mapped bytes return to zero when requests finish; a cached prefix is mapped,
never copied."""
from __future__ import annotations

import gc
import json
import os
import time

import pytest

pytestmark = pytest.mark.e2e

SYSTEM = (
    "You are a meticulous assistant for a geography quiz. Always answer in one short sentence, "
    "name the country first, and never add trivia. " * 12
)
QUESTIONS = [
    "What is the capital of France?",
    "Name a large river in Egypt.",
    "What is the tallest mountain on Earth? Answer briefly, please, and explain nothing else at all.",
    "Which ocean lies west of Portugal?",
]
MIXED = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write two sentences about the sea. " * 12}],
    [{"role": "user", "content": "Count from one to ten in words."}],
    [{"role": "user", "content": "Explain what a compiler does. " * 25}],
    [{"role": "user", "content": "Name three fruits."}],
]
SHARED = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
ENGINE = dict(dtype="float32", max_model_len=1024, enforce_eager=True, seed=0, max_num_batched_tokens=64)
MAX_TOKENS = 24


def _params():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


def _ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def _sampling_features(llm):
    """What vLLM does besides plain generation, each a different pattern of KV use: parallel samples
    of one prompt (siblings sharing its cached blocks), prompt logprobs (every prompt position read),
    beam search (each step forks beams as new requests whose prompts hit the cache), and requests
    aborted mid-flight (their memory freed without finishing)."""
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    # all six samples' prompts fit one step: vLLM 0.32's CPU runner fails a seeded request whose
    # prefill is split into chunks ("CPU Generator does not use offset"), with or without VTENSOR
    sampled = llm.generate(["Write a short poem about the sea.", "Tell me a joke."],
                           SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=16))
    scored = llm.generate(["The capital of France is"], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2))
    beams = llm.beam_search([{"prompt": "The best way to learn a language is"}],
                            BeamSearchParams(beam_width=3, max_tokens=8))
    engine = llm.llm_engine
    for i, repeats in enumerate((1, 3, 12)):  # aborted mid-decode, and the last mid-prefill
        engine.add_request(f"aborted-{i}", "Count slowly from one to one hundred in words. " * repeats,
                           SamplingParams(max_tokens=200, temperature=0))
    for _ in range(2):  # 64-token steps: the first two have decoded a token, the last is half prefilled
        engine.step()
    engine.abort_request([f"aborted-{i}" for i in range(3)])
    while engine.has_unfinished_requests():
        engine.step()
    return {
        "parallel_samples": [[list(c.token_ids) for c in r.outputs] for r in sampled],
        "prompt_logprob_tokens": [[pos and sorted(pos) for pos in r.prompt_logprobs] for r in scored],
        "prompt_logprobs": [[pos and [pos[t].logprob for t in sorted(pos)] for pos in r.prompt_logprobs]
                            for r in scored],
        "beam_search": [[beam.tokens for beam in r.sequences] for r in beams],
    }


def _same_step_hit(llm):
    """Two prompts sharing 290 tokens, sent together: the first's prefill runs in 64-token chunks and
    the second is scheduled beside its last chunk, hitting a block that chunk fills in the same step
    (VTENSOR at block 32: tokens 256-287)."""
    from vllm import SamplingParams

    ids = llm.get_tokenizer()("The quick brown fox jumps over the lazy dog. " * 40)["input_ids"][:300]
    outs = llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": ids[:290]}],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def _run_workloads(llm):
    first = _ids(llm.chat(SHARED[:1], _params()))  # fills the prefix cache
    rest = _ids(llm.chat(SHARED[1:], _params()))  # each hits the cached system prompt
    turn1 = llm.chat(MIXED[1], _params())[0].outputs[0].text
    turn2 = MIXED[1] + [{"role": "assistant", "content": turn1}, {"role": "user", "content": "And of Spain?"}]
    return {
        "mixed": _ids(llm.chat(MIXED, _params())),
        "shared": first + rest,
        "multi_turn": _ids(llm.chat([turn2], _params())),
        **_sampling_features(llm),
        "same_step_hit": _same_step_hit(llm),
    }


def _shutdown(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _engine(model, stats_file, **kw):
    from vllm import LLM

    os.environ["VTENSOR_STATS_FILE"] = str(stats_file)  # the engine's processes inherit it at spawn
    return LLM(model=model, **{**ENGINE, **kw})


def _stats(path, timeout=20.0, until=None):
    """The worker's figures once it has cleared finished requests and given freed memory back.

    vLLM tells the worker about finished requests in one more engine step after
    the outputs are returned; freed chunks then linger for reuse for
    ``VTENSOR_CHUNK_LINGER_S`` (1 s) before the reaper gives them back and
    republishes, so the snapshot settles shortly afterwards.
    """
    deadline = time.monotonic() + timeout
    while True:
        stats = json.loads(path.read_text())
        settled = stats["running_requests"] == 0 and stats["lingering_bytes"] == 0
        if (until(stats) if until else settled) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(smollm2_path, tmp_path_factory):
    llm = _engine(smollm2_path, tmp_path_factory.mktemp("vanilla") / "unused.json", kv_cache_memory_bytes=256 << 20)
    out = _run_workloads(llm)
    preempt_out = _ids(llm.chat(MIXED, _params()))
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    _shutdown(llm)
    return out, preempt_out, block_size


@pytest.fixture(scope="module")
def vtensor_run(smollm2_path, tmp_path_factory, reference):
    stats = tmp_path_factory.mktemp("vt") / "stats.json"
    os.environ["VTENSOR_ASYNC_MAPPING"] = "1"  # mapping beside the compute (opt-in); the other runs map inline
    try:
        llm = _engine(smollm2_path, stats, attention_backend="VTENSOR", kv_cache_memory_bytes=256 << 20)
    finally:
        del os.environ["VTENSOR_ASYNC_MAPPING"]
    out = _run_workloads(llm)
    after = _stats(stats)
    after["frontend_block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
    # vLLM's prefix-cache reset reaches the worker, which gives the cached blocks' memory back
    assert llm.reset_prefix_cache()
    after["reset"] = _stats(stats, until=lambda s: s["cached_bytes"] == 0 and s["lingering_bytes"] == 0)
    out["after_reset"] = _ids(llm.chat(SHARED[:1], _params()))  # recomputed from scratch: same tokens
    after["reset"]["prefix_hit_bytes_after"] = _stats(stats)["prefix_hit_bytes"]
    _shutdown(llm)
    return out, after


def test_without_block_size_vtensor_takes_the_cpu_kernels_finest_block(reference, vtensor_run):
    """No --block-size: the CPU platform's default is 128 (the reference engine runs with it), VTENSOR
    asks for 32, and the engine core, the worker's KV space and the frontend all use it."""
    _, stats = vtensor_run
    assert reference[2] == 128
    assert stats["block_size"] == stats["frontend_block_size"] == 32
    assert stats["chunk_bytes"] == 32 * 2 * 30 * 3 * 64 * 4  # tokens x K,V x layers x KV heads x head dim x fp32


def test_vtensor_matches_vanilla_token_for_token(reference, vtensor_run):
    (ref, _, _), (out, stats) = reference, vtensor_run
    assert out["after_reset"] == ref["shared"][:1]
    for workload in ref:
        if workload == "prompt_logprobs":  # floats (the engines run at different block sizes)
            flat = [lp for r in ref[workload] for pos in r if pos for lp in pos]
            assert [lp for r in out[workload] for pos in r if pos for lp in pos] == pytest.approx(flat, abs=1e-3)
        else:
            assert out[workload] == ref[workload], workload
    # this run's maps and unmaps ran in a helper thread while each forward pass started
    # (VTENSOR_ASYNC_MAPPING=1); the equal tokens above say KV was only touched once they had run
    assert stats["deferred_ops"] >= stats["maps"] + stats["unmaps"] > 0


def test_mapped_bytes_return_to_zero_after_requests_finish(vtensor_run):
    _, stats = vtensor_run
    assert stats["running_requests"] == 0
    assert stats["mapped_bytes"] == 0
    # prefix caching is on: only full blocks vLLM may hand out again stay resident
    # (plus the small reserve of ready chunks, VTENSOR_PRECREATE_BYTES)
    assert stats["resident_bytes"] == stats["cached_bytes"] + stats["reserve_bytes"] <= stats["budget_bytes"]
    assert stats["reserve_bytes"] <= max(4 << 20, stats["chunk_bytes"])
    # what stays mapped is in parked slots (finished requests' full blocks, kept for the next turn)
    assert stats["maps"] - stats["unmaps"] == stats["parked_bytes"] // stats["chunk_bytes"]
    assert stats["unmaps"] > 0 and stats["parked_bytes"] > 0  # (mappings: one cached chunk may be in several)


def test_resetting_the_prefix_cache_gives_its_memory_back(vtensor_run):
    """`LLM.reset_prefix_cache()` (or `POST /reset_prefix_cache`): vLLM forgets its cached blocks,
    and VTENSOR, told by the engine core, gives their memory back (parked slots let go too); the
    next request computes its prefix anew (no hit) and gets the same tokens (the test above)."""
    _, stats = vtensor_run
    assert stats["cached_bytes"] > 0  # before: the prefix cache kept blocks
    reset = stats["reset"]
    assert reset["cached_bytes"] == reset["parked_bytes"] == reset["mapped_bytes"] == 0
    assert reset["resident_bytes"] == reset["reserve_bytes"] <= max(4 << 20, reset["chunk_bytes"])
    assert reset["prefix_hit_bytes_after"] == reset["prefix_hit_bytes"]  # nothing left to hit


def test_cached_prefix_is_mapped_not_copied(vtensor_run):
    _, stats = vtensor_run
    # 3 later requests reuse the 2+ full blocks of the shared system prompt, plus the multi-turn reuse
    assert stats["prefix_hit_bytes"] >= 3 * 2 * stats["chunk_bytes"]
    assert stats["copied_bytes"] == 0
    assert stats["slot_reuse_bytes"] > 0  # later turns found their prefix already mapped in a parked slot


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["caching-off", "caching-on"])
def test_preemption_under_a_small_budget(smollm2_path, tmp_path, reference, prefix_caching):
    """A budget of 5 blocks of 128 tokens (the minimum for max_model_len 512 is 4) for 6 requests
    that need about 8 forces preemption; outputs still match.  With prefix caching off every byte of
    physical memory is given back at the end; with it on (vLLM's default), a second round of the same
    chats is preempted too, hits the blocks the first left cached, and maps them."""
    _, ref, _ = reference
    stats = tmp_path / "stats.json"
    llm = _engine(
        smollm2_path, stats, attention_backend="VTENSOR",
        max_model_len=512, block_size=128, kv_cache_memory_bytes=5 * 30 * 128 * 3 * 128 * 4,
        enable_prefix_caching=prefix_caching,
    )
    rounds = [_ids(llm.chat(MIXED, _params())) for _ in range(1 + prefix_caching)]
    after = _stats(stats)
    _shutdown(llm)
    assert rounds == [ref] * len(rounds)
    assert after["preemptions"] >= len(rounds)
    assert after["block_size"] == 128  # an explicit --block-size wins over VTENSOR's preference
    assert after["mapped_bytes"] == 0
    if prefix_caching:
        assert after["prefix_hit_bytes"] > 0 and after["copied_bytes"] == 0
        assert after["resident_bytes"] == after["cached_bytes"] + after["reserve_bytes"] <= after["budget_bytes"]
    else:
        assert after["resident_bytes"] == after["reserve_bytes"] <= 4 << 20


def test_an_idle_engine_gives_its_prefix_cache_memory_back(smollm2_path, tmp_path, reference):
    """`VTENSOR_IDLE_RELEASE_S`: while requests come the prefix cache keeps its blocks (later requests hit
    them); once the engine has had none for that long, the cache is reset in the engine's thread and the
    worker holds only its reserve. Work re-arms it: after the next requests (computed anew, no hit,
    vanilla's tokens) and another idle period, their cached blocks go back too."""
    ref = reference[0]["shared"]
    stats = tmp_path / "stats.json"
    os.environ["VTENSOR_IDLE_RELEASE_S"] = "3"
    try:
        llm = _engine(smollm2_path, stats, attention_backend="VTENSOR", kv_cache_memory_bytes=256 << 20)
    finally:
        del os.environ["VTENSOR_IDLE_RELEASE_S"]

    def released():
        return _stats(stats, timeout=15, until=lambda s: s["cached_bytes"] == 0 and s["lingering_bytes"] == 0)

    rounds = []
    for _ in range(2):
        out = _ids(llm.chat(SHARED[:1], _params()))
        alone = _stats(stats)  # its figures, before the other questions
        out += _ids(llm.chat(SHARED[1:], _params()))
        idle_from = time.monotonic()
        kept = _stats(stats)  # settled (finished requests' memory lingered 1 s and went back)
        gone = released()
        rounds.append(dict(out=out, alone=alone, kept=kept, gone=gone, seconds=time.monotonic() - idle_from))
    _shutdown(llm)
    for r in rounds:
        assert r["out"] == ref
        assert r["kept"]["cached_bytes"] > 0  # kept while the engine was idle less than 3 s
        assert r["kept"]["prefix_hit_bytes"] > r["alone"]["prefix_hit_bytes"]  # the later questions hit it
        gone = r["gone"]
        assert gone["cached_bytes"] == gone["parked_bytes"] == gone["mapped_bytes"] == 0
        assert gone["resident_bytes"] == gone["reserve_bytes"] <= max(4 << 20, gone["chunk_bytes"])
        assert 3 <= r["seconds"] <= 3 + 3, r["seconds"]  # the idle time, then one poll of the watcher and the reset
    # after the reset the first question found nothing cached: computed anew, no hit
    assert rounds[1]["alone"]["prefix_hit_bytes"] == rounds[0]["gone"]["prefix_hit_bytes"]
