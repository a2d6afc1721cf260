"""Two engines on one GPU sharing one KV pool (``VTENSOR_POOL``): vanilla vLLM's greedy tokens (vLLM's own
kernel over VTENSOR's memory, so equal exactly), preemptions when the pool runs out, never a commitment
past the pool, and an idle engine's memory handed to the busy one within 2 s.

Needs a GPU and vLLM; skipped otherwise (benchmarks/gpu_vllm.sh runs it with vLLM's Python source)."""
from __future__ import annotations

import uuid

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm", reason="needs vLLM")

from test_e2e_cuda import CHUNK, ENGINE  # noqa: E402
from test_e2e_shared_pool import a_then_b, environment, start_a_and_b  # noqa: E402


pytestmark = [pytest.mark.e2e, pytest.mark.gpu]

POOL_BYTES = 24 * CHUNK  # 24 blocks of 128 tokens; the 8 requests below need 8 x 3 = 24 and more as they grow
PROMPTS = [[(i * 7 + j * 13) % 4000 + 10 for j in range(300)] for i in range(8)]
KW = dict(ENGINE, gpu_memory_utilization=0.15, kv_cache_memory_bytes=64 * CHUNK, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def model():
    from vllm_vtensor.models import build_tiny_llama

    return str(build_tiny_llama(num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64))


def test_two_engines_share_one_pool_on_a_gpu(model):
    from vllm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    vanilla = LLM(model=model, **KW)
    want = [o.outputs[0].token_ids for o in vanilla.generate(prompts, sp)]
    del vanilla

    name = f"cuda-{uuid.uuid4().hex[:8]}"
    with environment(VTENSOR_POOL=name, VTENSOR_POOL_BYTES=str(POOL_BYTES), VTENSOR_ATTENTION="vllm"):
        a, b, ledger, slots = start_a_and_b(name, lambda: LLM(model=model, attention_backend="VTENSOR", **KW))
    try:
        assert ledger.view().device == f"cuda:{torch.cuda.current_device()}"
        a_then_b(a, b, ledger, slots, prompts, sp, want, POOL_BYTES)
    finally:
        del a, b
        ledger.path.unlink(missing_ok=True)
