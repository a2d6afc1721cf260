"""bfloat16 (the dtype of most checkpoints, and the fast one on CPUs with AMX): VTENSOR, and the
FlexInfer loader streaming half the weights, give the same greedy tokens as vanilla vLLM in
bfloat16, for a mixed batch split by chunked prefill."""
from __future__ import annotations

import json
import os

import pytest

from test_e2e_vtensor import _shutdown

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
    # The requests reach the scheduler together, whatever the machine's load: in bfloat16 a batch of other
    # requests (the engine core starting on the first before the rest arrived) can round a token another way.
    core = llm.llm_engine.engine_core
    core.call_utility("pause_scheduler", "keep", False)
    llm.enqueue_chat(CHATS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    core.call_utility("resume_scheduler")
    outs = llm.wait_for_completion(use_tqdm=False)  # in request order
    config = llm.llm_engine.vllm_config
    result = [list(o.outputs[0].token_ids) for o in outs], (config.cache_config.block_size, str(config.model_config.dtype))
    _shutdown(llm)
    return result


@pytest.fixture(scope="module")
def reference(smollm2_path):
    return _generate(smollm2_path)


def test_vtensor_in_bfloat16_matches_vanilla(smollm2_path, reference):
    out, config = _generate(smollm2_path, attention_backend="VTENSOR")
    assert (reference[1], config) == ((128, "torch.bfloat16"), (32, "torch.bfloat16"))  # each at its default block
    assert out == reference[0]


def test_flexinfer_in_bfloat16_matches_the_default_loader(smollm2_path, reference, tmp_path):
    stats_path = tmp_path / "flex.json"
    os.environ["FLEXOFFLOAD_STATS_FILE"] = str(stats_path)
    out, _ = _generate(smollm2_path, load_format="flexinfer", model_loader_extra_config={"memory_budget": "50%"})
    stats = json.loads(stats_path.read_text())
    assert out == reference[0]
    assert stats["bytes_streamed"] > 0 and stats["resident_bytes"] + stats["arena_bytes"] <= stats["budget_bytes"]
    assert stats["weight_bytes"] < 300 << 20  # bf16 weights (~270 MB), not fp32's twice as many
