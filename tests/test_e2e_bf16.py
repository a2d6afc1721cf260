"""VTENSOR in bfloat16 (the dtype of most checkpoints, and the fast one on CPUs with AMX): greedy tokens
equal vanilla vLLM's in bfloat16, for a mixed batch split by chunked prefill."""
from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.e2e

CHATS = [[{"role": "user", "content": q}] for q in [
    "What is the capital of France?",
    "Write two sentences about the sea. " * 8,
    "Name three fruits.",
    "Explain what a compiler does. " * 20,
]]


def _generate(model, **kw):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", max_model_len=1024, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=128 << 20, max_num_batched_tokens=64, **kw)
    outs = llm.chat(CHATS, SamplingParams(temperature=0, max_tokens=24))
    cache = llm.llm_engine.vllm_config.cache_config
    result = [list(o.outputs[0].token_ids) for o in outs], (cache.block_size, str(llm.llm_engine.vllm_config.model_config.dtype))
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def test_bfloat16_matches_vanilla_token_for_token(smollm2_path):
    ref, ref_cfg = _generate(smollm2_path)
    out, cfg = _generate(smollm2_path, attention_backend="VTENSOR")
    assert (ref_cfg, cfg) == ((128, "torch.bfloat16"), (32, "torch.bfloat16"))  # bf16 chunks: 32 tokens pad little too
    assert out == ref
