"""fp8 KV caches with VTENSOR on CPU, against vanilla vLLM at full precision (float32 KV).

VTENSOR's own path (``VTENSOR_ATTENTION=reference``: VTENSOR writes fp8, torch attention reads it
upcast) runs on any CPU: KV bytes per token are a quarter of float32's, and greedy answers pass
vLLM's own closeness test for quantized models (where an answer first differs from full
precision, each side's token is among the other's top-5). On CPUs with AVX-512 or AMX, vLLM's
CPU kernel over VTENSOR's memory gives vanilla vLLM's fp8 answers token for token. SmolLM2
(real weights) and a tiny random-weight Qwen 3 (QK-norm); mapped bytes back to zero after each.
Measured agreement: docs/benchmarks/fp8-kv-cpu.md."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fp8_kv  # noqa: E402

PROMPTS = fp8_kv.PROMPTS[:6]


@pytest.mark.parametrize("which", ["smollm2", "qwen3"])
def test_fp8_kv_quarter_the_bytes_and_stay_close_to_full_precision(which, smollm2_path):
    from vllm_vtensor.backend import cpu_kernel_reads_fp8
    from vllm_vtensor.models import build_tiny_model

    model = smollm2_path if which == "smollm2" else str(build_tiny_model("qwen3"))
    engines = ["vanilla", "vtensor_fp8"]
    if which == "smollm2":
        engines.append("vtensor_fp8_e5m2")
        if cpu_kernel_reads_fp8():
            engines += ["vanilla_fp8", "vtensor_fp8_vllm_kernel"]
    results = fp8_kv.run(model, engines, PROMPTS, max_tokens=24)
    for name in engines[1:]:
        r = results[name]
        print(name, r["agreement_with_vanilla"])
        assert r["kv_bytes_vs_vanilla"] == 0.25, (name, r)  # float32 -> one byte, no padding at these shapes
        assert r["agreement_with_vanilla"]["logprobs_close"], (name, r["agreement_with_vanilla"])
        if "mapped_bytes_after" in r:
            assert r["mapped_bytes_after"] == 0, name
    if "vanilla_fp8" in results:
        assert results["vtensor_fp8_vllm_kernel"]["tokens"] == results["vanilla_fp8"]["tokens"]
