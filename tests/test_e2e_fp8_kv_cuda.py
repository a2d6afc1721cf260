"""`--kv-cache-dtype fp8` with `attention_backend="VTENSOR"` on a CUDA GPU, against vanilla vLLM's
Triton backend with the same fp8 cache: vLLM's Triton writer stores the per-tensor-scaled fp8 bytes into
VTENSOR's ranges; vLLM's kernel over them gives vanilla's outputs exactly (same kernel, same bytes),
this project's kernels (reading the bytes, upcast in registers) the same up to numerical ties; a chunk
holds four times float32's tokens.

Needs a GPU of compute capability 8.9 or more (vLLM's Triton fp8) and vLLM; run there through
benchmarks/gpu_vllm.sh with ``E2E_TESTS=tests/test_e2e_fp8_kv_cuda.py``.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("vLLM's Triton backend stores fp8 KV on compute capability 8.9 or more", allow_module_level=True)
pytest.importorskip("vllm", reason="needs vLLM")

from test_e2e_cuda import (BLOCK, CHUNK, _assert_kernel_matches, _engine, _shutdown, _stats,  # noqa: E402
                           _vtensor, _workloads, model)

pytestmark = [pytest.mark.e2e, pytest.mark.gpu]
__all__ = ["model"]  # the fixture, shared with test_e2e_cuda

# a quarter of float32's bytes per token: 4 x 128 tokens fill one 2 MiB chunk
FP8 = dict(kv_cache_dtype="fp8", block_size=4 * BLOCK, kv_cache_memory_bytes=256 << 20)


@pytest.fixture(scope="module")
def fp8_reference(model, tmp_path_factory):
    llm = _engine(model, tmp_path_factory.mktemp("vanilla-fp8") / "unused.json", attention_backend="TRITON_ATTN", **FP8)
    out = _workloads(llm)
    _shutdown(llm)
    return out


@pytest.mark.parametrize("kernel", ["vllm", "triton"])
def test_fp8_kv_cache_on_cuda(model, tmp_path, fp8_reference, kernel):
    stats = tmp_path / "stats.json"
    llm = _vtensor(model, stats, kernel, **FP8)
    out = _workloads(llm)
    after = _stats(stats)
    _shutdown(llm)
    _assert_kernel_matches(kernel, fp8_reference, out)
    assert after["chunk_bytes"] == CHUNK and after["block_size"] == 4 * BLOCK
    assert after["mapped_bytes"] == 0 and after["maps"] > 0
