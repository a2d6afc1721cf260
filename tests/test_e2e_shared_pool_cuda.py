"""Two engines on one GPU sharing one KV pool (``VTENSOR_POOL``): vanilla vLLM's greedy tokens (vLLM's own
kernel over VTENSOR's memory, so equal exactly), preemptions when the pool runs out, never a commitment
past the pool, and an idle engine's memory handed to the busy one within 2 s.

Needs a GPU and vLLM; skipped otherwise (benchmarks/gpu_vllm.sh runs it with vLLM's Python source)."""
from __future__ import annotations

import os
import time
import uuid

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm", reason="needs vLLM")

from test_e2e_cuda import BLOCK, CHUNK, ENGINE  # noqa: E402
from test_e2e_shared_pool import Sampler  # noqa: E402

from vllm_vtensor.ledger import open_pool  # noqa: E402

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
    saved = {k: os.environ.get(k) for k in ("VTENSOR_POOL", "VTENSOR_POOL_BYTES", "VTENSOR_ATTENTION")}
    os.environ.update(VTENSOR_POOL=name, VTENSOR_POOL_BYTES=str(POOL_BYTES), VTENSOR_ATTENTION="vllm")
    try:
        a = LLM(model=model, attention_backend="VTENSOR", **KW)
        b = LLM(model=model, attention_backend="VTENSOR", **KW)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    ledger = open_pool(name, None, None)
    try:
        assert ledger.view().device == f"cuda:{torch.cuda.current_device()}"
        slot_a, slot_b = (e.slot for e in sorted(ledger.view().engines, key=lambda e: e.engine_pid))
        sampler = Sampler(ledger)
        got_a = [o.outputs[0].token_ids for o in a.generate(prompts, sp)]
        time.sleep(0.3)
        started_b = time.monotonic()
        got_b = [o.outputs[0].token_ids for o in b.generate(prompts, sp)]
        time.sleep(0.3)
        samples = sampler.stop()
        assert got_a == want and got_b == want
        engines = {e.slot: e for e in ledger.view().engines}
        assert engines[slot_a].preemptions > 0 and engines[slot_b].preemptions > 0
        assert max(total for _, _, total in samples) <= POOL_BYTES
        peak_a = max(s[1][slot_a].committed for s in samples if slot_a in s[1])
        low = [t for t, e, _ in samples if t >= started_b and slot_a in e and e[slot_a].committed <= 0.05 * peak_a]
        assert low and low[0] - started_b <= 2.0
    finally:
        del a, b
        ledger.path.unlink(missing_ok=True)
