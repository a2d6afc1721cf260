"""VTENSOR on tiny random-weight models of real architectures besides llama, token for token against
vanilla vLLM: Gemma 2 (sliding-window and full layers alternating: two KV cache groups; attention
logit soft-capping passed to vLLM's CPU kernel), Gemma 3 (five sliding layers to one full, QK-norm),
Qwen 3 (full attention, QK-norm) and gpt-oss (sliding and full layers alternating, attention sinks,
a mixture of experts). Prompts several windows long, chunked prefill forced, a prefix
hit; mapped bytes back to zero."""
from __future__ import annotations

import os

import pytest

from test_e2e_vtensor import _shutdown, _stats

pytestmark = pytest.mark.e2e

ENGINE = dict(dtype="float32", max_model_len=1024, enforce_eager=True, seed=0, max_num_batched_tokens=64,
              kv_cache_memory_bytes=64 << 20)


def _run(llm):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = [[100 + (i * 37 + k * 11) % 3000 for k in range(n)] for i, n in enumerate((17, 80, 150, 300))]
    shared = [500 + k % 900 for k in range(200)]
    out = llm.generate([{"prompt_token_ids": p} for p in prompts + [shared + [7, 8, 9]]], sp, use_tqdm=False)
    hit = llm.generate([{"prompt_token_ids": shared + [10, 11]}], sp, use_tqdm=False)  # hits the shared prefix
    return [list(o.outputs[0].token_ids) for o in out + hit]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen3", "gpt_oss"])
def test_architecture_tokens_equal_vanilla(arch, tmp_path):
    from vllm import LLM

    from vllm_vtensor.models import build_tiny_model

    model = str(build_tiny_model(arch))
    vanilla = LLM(model=model, **ENGINE)
    ref = _run(vanilla)
    _shutdown(vanilla)
    stats = tmp_path / "stats.json"
    os.environ["VTENSOR_STATS_FILE"] = str(stats)
    llm = LLM(model=model, attention_backend="VTENSOR", **ENGINE)
    out = _run(llm)
    after = _stats(stats)
    _shutdown(llm)
    assert out == ref
    assert after["mapped_bytes"] == 0 and after["running_requests"] == 0
    assert after["prefix_hit_bytes"] > 0  # the shared prefix was mapped, not recomputed
