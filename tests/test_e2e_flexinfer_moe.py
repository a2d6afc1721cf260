"""`--load-format flexinfer` on a mixture of experts (a tiny random-weight Qwen 3 MoE: 6 layers of 8
experts, 2 per token, float32): below the model's size each MoE layer holds a few experts in slots of
vLLM's packed layout and reads the others from the weight store when its router picks them. Greedy
tokens equal vanilla vLLM's and logprobs match, at a budget where the dense weights stay resident
and at one where the lm_head streams too; experts were read on demand (misses), prefills that
needed more experts than a layer's slots ran in groups, a token decoded alone computed its experts in
slots while the others were read, and the slots, resident weights and stream
arena fit the budget; with `expert_prefetch`, experts read ahead for the next layer were then picked
by its router; with `packed_experts`, experts were read from a store of them packed for vLLM's kernel. Budgets below what the slots and the dense weights need, and the mmap
baseline, are refused naming the fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from test_e2e_vtensor import _shutdown

pytestmark = pytest.mark.e2e

ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0, kv_cache_memory_bytes=64 << 20,
              max_num_seqs=4)


def _run(llm):
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [10 + (i * 97 + k * 13) % 40000 for k in range(30 + 40 * i)]} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    outs += llm.generate(prompts[1:2], params, use_tqdm=False)  # alone: decode steps at batch 1
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return tokens, logprobs


@pytest.fixture(scope="module")
def moe_model():
    from vllm_vtensor.models import build_tiny_model

    return str(build_tiny_model("qwen3_moe"))


@pytest.fixture(scope="module")
def vanilla(moe_model):
    from vllm import LLM

    llm = LLM(model=moe_model, **ENGINE)
    out = _run(llm)
    _shutdown(llm)
    return out


@pytest.mark.parametrize("fraction, head_streamed, prefetch", [(0.6, False, False), (0.5, True, True)])
def test_experts_read_on_demand_give_vanillas_tokens(fraction, head_streamed, prefetch, moe_model, vanilla, tmp_path):
    packed = prefetch  # experts packed as read, or read from a store of them packed for the kernel
    from vllm import LLM

    stats_path = tmp_path / "flex.json"
    os.environ["FLEXOFFLOAD_STATS_FILE"] = str(stats_path)
    try:
        llm = LLM(model=moe_model, **ENGINE, load_format="flexinfer",
                  model_loader_extra_config={"memory_budget": fraction, "cache_dir": str(tmp_path / "store"),
                                             "expert_prefetch": prefetch, "packed_experts": packed})
        tokens, logprobs = _run(llm)
        _shutdown(llm)
    finally:
        del os.environ["FLEXOFFLOAD_STATS_FILE"]
    stats = json.loads(stats_path.read_text())
    ref_tokens, ref_logprobs = vanilla

    assert tokens == ref_tokens
    assert max(abs(a - b) for x, y in zip(logprobs, ref_logprobs) for a, b in zip(x, y)) < 1e-3
    slots = stats["expert_slots"]
    assert len(slots) == 6 and all(2 <= n < 8 for n in slots.values()), slots
    assert stats["resident_bytes"] + stats["arena_bytes"] + stats["expert_bytes"] <= stats["budget_bytes"], stats
    assert stats["head_streamed"] == head_streamed, stats
    experts = stats["experts"]
    assert experts["misses"] > 0 and experts["bytes_read"] > 0 and experts["hits"] > 0, experts
    assert experts["groups"] > 0, experts  # prefills needing more experts than a layer's slots
    assert experts["beside_reads"] > 0, experts  # a token alone: experts in slots computed while others were read
    assert experts["packed"] == packed, experts
    if prefetch:  # the next layer's router guessed from this layer's input: some guesses were then picked
        assert 0 < experts["ahead_used"] <= min(experts["ahead"], experts["misses"]), experts
    else:
        assert experts["ahead"] == experts["ahead_used"] == 0, experts


@pytest.mark.parametrize("extra, message", [
    ({"memory_budget": 0.1}, "each layer's top-k experts at once) and"),  # not even the slots fit
    ({"memory_budget": 0.21}, "MiB of expert slots (each MoE layer's top-k experts"),  # the dense minimum not
    ({"memory_budget": 0.5, "policy": "mmap"}, "use another policy for a mixture of experts"),
])
def test_budgets_and_policies_it_cannot_run_are_refused_naming_the_fix(extra, message, moe_model):
    code = textwrap.dedent(f"""
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={moe_model!r}, dtype="float32", enforce_eager=True, max_model_len=512,
                kv_cache_memory_bytes=64 << 20, load_format="flexinfer", model_loader_extra_config={extra!r})
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    out = run.stdout + run.stderr  # vLLM logs the worker's error to stdout, the traceback to stderr
    assert message in out, out[-3000:]
