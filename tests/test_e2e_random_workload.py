"""A random workload, the same for both engines: waves of prompts cut from a few shared prefixes
(prefix-cache hits at every length, including mid-block), random output lengths, prefill split into
small chunks and a KV budget so small that requests are preempted.  VTENSOR's greedy tokens equal
vanilla vLLM's, and every mapping is undone at the end."""
from __future__ import annotations

import json
import random

import pytest

from test_e2e_vtensor import _engine, _shutdown, _stats

pytestmark = pytest.mark.e2e

SEED = 1
WORDS = "alpha beta gamma delta river mountain ocean city forest stone light shadow music paper".split()
BLOCK, KV_BYTES_PER_TOKEN = 32, 2 * 30 * 3 * 64 * 4  # SmolLM2 in float32: K and V, 30 layers, 3 KV heads, dim 64


def _waves(tokenizer, rng):
    def text(lo, hi):
        return tokenizer(" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))))["input_ids"]

    prefixes = [text(60, 250) for _ in range(3)]
    for _ in range(3):
        wave = []
        for _ in range(rng.randint(6, 14)):
            prefix = rng.choice(prefixes)
            prompt = (prefix[: rng.randint(len(prefix) // 2, len(prefix))] + text(1, 60))[:400]
            wave.append((prompt, rng.randint(1, 80)))
        yield wave


def _run(model, stats_file, **kw):
    from vllm import SamplingParams

    llm = _engine(model, stats_file, max_model_len=512, block_size=BLOCK, max_num_batched_tokens=48, max_num_seqs=16,
                  kv_cache_memory_bytes=24 * BLOCK * KV_BYTES_PER_TOKEN, **kw)  # 24 blocks: 1.5 requests of 512
    rng = random.Random(SEED)
    out = []
    for wave in _waves(llm.get_tokenizer(), rng):
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in wave],
                            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in wave],
                            use_tqdm=False)
        out.append([list(o.outputs[0].token_ids) for o in outs])
    stats = _stats(stats_file) if kw else {}
    _shutdown(llm)
    return out, stats


def test_random_workload_matches_vanilla(smollm2_path, tmp_path):
    ref, _ = _run(smollm2_path, tmp_path / "unused.json")
    out, stats = _run(smollm2_path, tmp_path / "stats.json", attention_backend="VTENSOR")
    assert out == ref
    assert stats["preemptions"] > 0 and stats["prefix_hit_bytes"] > 0, json.dumps(stats)  # what it is meant to cover
    assert stats["mapped_bytes"] == 0 and stats["running_requests"] == 0
    assert stats["resident_bytes"] == stats["cached_bytes"] + stats["reserve_bytes"] <= stats["budget_bytes"]
