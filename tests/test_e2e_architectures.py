"""VTENSOR on tiny random-weight models of real architectures besides llama, token for token against
vanilla vLLM: Gemma 2 (sliding-window and full layers alternating: two KV cache groups; attention
logit soft-capping passed to vLLM's CPU kernel), Gemma 3 (five sliding layers to one full, QK-norm),
Qwen 3 (full attention, QK-norm) and gpt-oss (sliding and full layers alternating, attention sinks,
a mixture of experts). Prompts several windows long, chunked prefill forced; VTENSOR with prefix
caching on (a prefix hit mapped, not recomputed) and off under a budget that forces preemption;
mapped bytes back to zero. FlexInfer (`--load-format flexinfer`) on the dense ones, with layers and the
lm_head streamed and with the lm_head resident (Gemma 2 computes its logits with the embedding table
itself), and on gpt-oss with 2 of each layer's 4 experts in slots (the others read when routed to),
against the same tokens."""
from __future__ import annotations

import json
import os

import pytest

from test_e2e_vtensor import _shutdown, _stats

pytestmark = pytest.mark.e2e

ENGINE = dict(dtype="float32", max_model_len=384, enforce_eager=True, seed=0, max_num_batched_tokens=64)
KV_BYTES_PER_TOKEN = 6 * 2 * 64 * 2 * 4  # every tiny model: 6 layers x 2 KV heads x 64, K and V, float32


def _mixed(llm):
    """Prompts of 17-300 tokens (several windows), chunked prefill, then one that hits a shared prefix."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = [[100 + (i * 37 + k * 11) % 3000 for k in range(n)] for i, n in enumerate((17, 80, 150, 300))]
    shared = [500 + k % 900 for k in range(200)]
    out = llm.generate([{"prompt_token_ids": p} for p in prompts + [shared + [7, 8, 9]]], sp, use_tqdm=False)
    hit = llm.generate([{"prompt_token_ids": shared + [10, 11]}], sp, use_tqdm=False)  # hits the shared prefix
    return [list(o.outputs[0].token_ids) for o in out + hit]


def _pressure(llm):
    """Six short prompts that all start at once and each grow by 300 tokens: under a budget of 512
    tokens' KV the running requests outgrow it, whatever the model's KV cache groups, and vLLM preempts."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    prompts = [[200 + (i * 53 + k * 7) % 2000 for k in range(20)] for i in range(6)]
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                                use_tqdm=False)]


def _vtensor(model, stats, workload, **kw):
    from vllm import LLM

    os.environ["VTENSOR_STATS_FILE"] = str(stats)  # the engine's processes inherit it at spawn
    llm = LLM(model=model, attention_backend="VTENSOR", **ENGINE, **kw)
    out = workload(llm)
    after = _stats(stats)
    _shutdown(llm)
    return out, after


# gemma2 (sliding windows beside full layers, soft-capping) runs in `make test`; the others, minutes each on
# 2 cores, in `make test-all` (qwen3's QK-norm also runs in test_e2e_fp8_kv)
@pytest.mark.parametrize("arch", ["gemma2", *(pytest.param(a, marks=pytest.mark.slow) for a in ("gemma3", "qwen3", "gpt_oss"))])
def test_architecture_tokens_equal_vanilla(arch, tmp_path):
    from vllm import LLM

    from vllm_vtensor.models import build_tiny_model

    model = str(build_tiny_model(arch))
    vanilla = LLM(model=model, kv_cache_memory_bytes=64 << 20, **ENGINE)
    ref_mixed, ref_pressure = _mixed(vanilla), _pressure(vanilla)
    _shutdown(vanilla)

    out, after = _vtensor(model, tmp_path / "cached.json", _mixed, kv_cache_memory_bytes=64 << 20)
    assert out == ref_mixed
    assert after["mapped_bytes"] == 0 and after["running_requests"] == 0
    assert after["prefix_hit_bytes"] > 0  # the shared prefix was mapped, not recomputed

    out, after = _vtensor(model, tmp_path / "tight.json", _pressure, kv_cache_memory_bytes=512 * KV_BYTES_PER_TOKEN,
                          enable_prefix_caching=False)
    assert out == ref_pressure
    assert after["preemptions"] > 0 and after["mapped_bytes"] == 0

    if arch == "gpt_oss":  # a mixture of experts: FlexInfer keeps 2 of each layer's 4 experts in slots
        out, flex = _flexinfer(model, tmp_path / "flex-moe.json", 0.9)
        assert out == ref_mixed
        assert set(flex["expert_slots"].values()) == {2} and flex["experts"]["misses"] > 0, flex
        assert flex["experts"]["ahead_used"] > 0, flex  # its router (in the MoE block, not beside the experts) found
        assert flex["experts"]["packed"], flex  # read packed for the kernel, the biases filled beside
        return
    # FlexInfer at half the weights (layers and the lm_head streamed, the head in runs of rows) and at 95%
    # (the lm_head resident, packed for oneDNN from the store, layers streamed)
    for fraction, head_streamed in ((0.5, True), (0.95, False)):
        out, flex = _flexinfer(model, tmp_path / f"flex{fraction}.json", fraction)
        assert out == ref_mixed, fraction
        assert flex["head_streamed"] == head_streamed and flex["forwards"] > 0 and flex["bytes_streamed"] > 0
        assert (flex["head_runs"] > 0) == head_streamed and flex["head_packed"] == (not head_streamed), flex


def _flexinfer(model, stats, fraction):
    from vllm import LLM

    os.environ["FLEXOFFLOAD_STATS_FILE"] = str(stats)
    llm = LLM(model=model, **ENGINE, kv_cache_memory_bytes=64 << 20, load_format="flexinfer",
              model_loader_extra_config={"memory_budget": fraction, "cache_dir": str(stats.parent / "store")})
    out = _mixed(llm)
    _shutdown(llm)
    return out, json.loads(stats.read_text())
