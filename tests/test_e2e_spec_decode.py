"""Speculative decoding (vLLM's n-gram drafter) with VTENSOR: each step writes KV for draft tokens
that may be rejected, so a request's KV grows by several tokens and its valid length falls back
within the blocks it was given.  Greedy tokens equal vanilla vLLM's with the same drafter, drafts
were both accepted and rejected, and the KV memory is given back at the end."""
from __future__ import annotations

import os

import pytest

from test_e2e_vtensor import _shutdown, _stats

pytestmark = pytest.mark.e2e

PROMPTS = [  # repetitive text, so the n-gram drafter finds matches (some right, some wrong)
    "Repeat after me exactly: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over "
    "the lazy dog. The quick brown fox",
    "List the numbers 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3",
    "Write the alphabet twice: a b c d e f g h i j k l m n o p q r s t u v w x y z, a b c",
    "Hello!",
]
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def _generate(model, stats_file, **kw):
    from vllm import LLM, SamplingParams

    os.environ["VTENSOR_STATS_FILE"] = str(stats_file)
    llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0, disable_log_stats=False,
              kv_cache_memory_bytes=64 << 20, speculative_config=SPEC, **kw)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48))
    metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    stats = _stats(stats_file) if kw else {}
    _shutdown(llm)
    stats["full_blocks"] = sum((len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1) // block_size for o in outs)
    return [list(o.outputs[0].token_ids) for o in outs], metrics, block_size, stats


def test_ngram_speculative_decoding_matches_vanilla(smollm2_path, tmp_path):
    ref, ref_metrics, ref_block, _ = _generate(smollm2_path, tmp_path / "unused.json")
    out, metrics, block, stats = _generate(smollm2_path, tmp_path / "stats.json", attention_backend="VTENSOR")
    assert (ref_block, block) == (128, 32)  # each engine at its default block size
    assert out == ref
    drafted, accepted = metrics["vllm:spec_decode_num_draft_tokens"], metrics["vllm:spec_decode_num_accepted_tokens"]
    assert 0 < accepted < drafted  # drafts were accepted and rejected
    assert (drafted, accepted) == (ref_metrics["vllm:spec_decode_num_draft_tokens"],
                                   ref_metrics["vllm:spec_decode_num_accepted_tokens"])
    assert stats["mapped_bytes"] == 0 and stats["peak_live_tokens"] > 0
    # kept for the prefix cache: no more than the blocks full of tokens vLLM computed (the last token
    # of each request has no KV: it was never fed back); test_kv_space checks rejected drafts directly
    assert 0 < stats["cached_bytes"] <= stats["full_blocks"] * stats["chunk_bytes"]
    assert stats["lingering_bytes"] == 0 and stats["resident_bytes"] == stats["cached_bytes"] + stats["reserve_bytes"]


def test_a_draft_model_beside_flexinfer_is_loaded_whole(smollm2_path, tiny_llama_path, tmp_path):
    """A draft model (a tiny llama with SmolLM2's vocabulary) beside SmolLM2 streamed by FlexInfer at 50%:
    the draft is loaded whole by vLLM's loader (streamed, it would read its weights on each of its
    forward passes), the stats snapshot describes the target, and the tokens and acceptance figures
    equal vanilla vLLM's with the same draft."""
    import json

    from vllm import LLM, SamplingParams

    spec = {"method": "draft_model", "model": tiny_llama_path, "num_speculative_tokens": 3}

    def run(**kw):
        llm = LLM(model=smollm2_path, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  disable_log_stats=False, kv_cache_memory_bytes=64 << 20, speculative_config=spec, **kw)
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        _shutdown(llm)
        return [list(o.outputs[0].token_ids) for o in outs], metrics["vllm:spec_decode_num_accepted_tokens"]

    ref, ref_accepted = run()
    stats_path = tmp_path / "flex.json"
    os.environ["FLEXOFFLOAD_STATS_FILE"] = str(stats_path)
    out, accepted = run(load_format="flexinfer", model_loader_extra_config={"memory_budget": 0.5})
    stats = json.loads(stats_path.read_text())
    assert out == ref and accepted == ref_accepted
    assert stats["weight_bytes"] > 500 << 20 and stats["forwards"] > 0 and stats["bytes_streamed"] > 0, stats
