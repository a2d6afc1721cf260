"""VTENSOR's CUDA attention impl (vllm_vtensor/backend_cuda.py), run on CPU under the Triton
interpreter: given vLLM's Triton-backend cache ``(blocks, H, N, 2D)`` and metadata with a 2-D block
table of consecutive virtual ids per request, its output equals attention computed by a paged
gather through the block table (independent of the kernels' base-plus-stride addressing), for a
decode-only batch and a mixed prefill/decode batch; what its kernels lack is refused naming the fix."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' @triton.jit

from vllm_vtensor.backend_cuda import VTensorTritonImpl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, HKV, D, B = 4, 2, 64, 16


def _impl(monkeypatch, kernel="triton", **kw):
    monkeypatch.setenv("VTENSOR_ATTENTION", kernel)
    args = dict(num_heads=H, head_size=D, scale=D ** -0.5, num_kv_heads=HKV, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto") | kw
    return VTensorTritonImpl(**args)


def _paged_reference(q, kv_cache, block_table, seq_lens, q_lens):
    """Each request's K/V gathered block by block through its block-table row, then causal SDPA."""
    out, start = [], 0
    for r, (seq, ql) in enumerate(zip(seq_lens, q_lens)):
        blocks = block_table[r, : -(-seq // B)].tolist()
        kv = torch.cat([kv_cache[b].transpose(0, 1) for b in blocks])[:seq]  # [seq, HKV, 2D]
        k, v = kv[..., :D], kv[..., D:]
        qr = q[start : start + ql].transpose(0, 1)  # [H, ql, D]
        k = k.transpose(0, 1).repeat_interleave(H // HKV, 0)
        v = v.transpose(0, 1).repeat_interleave(H // HKV, 0)
        pos_q = torch.arange(seq - ql, seq)[:, None]
        mask = torch.arange(seq)[None, :] <= pos_q
        out.append(F.scaled_dot_product_attention(qr, k, v, attn_mask=mask.to(qr.device), scale=D ** -0.5)
                   .transpose(0, 1))
        start += ql
    return torch.cat(out)


@pytest.mark.parametrize("q_lens, seq_lens", [
    ([1, 1, 1], [37, 5, 20]),  # decode only: the split-K decode kernel
    ([7, 1, 12], [7, 33, 40]),  # mixed: a fresh prefill, a decode row, a chunk after a cached prefix
])
def test_cuda_impl_reads_each_requests_range_through_the_block_table(monkeypatch, q_lens, seq_lens):
    gen = torch.Generator().manual_seed(0)
    slots, per_slot = 4, 4  # request r sits in slot 3 - r: first virtual blocks 12, 8, 4
    kv_cache = torch.randn(slots * per_slot, HKV, B, 2 * D, generator=gen).to(DEVICE)
    block_table = torch.stack([torch.arange(per_slot) + (3 - r) * per_slot for r in range(len(q_lens))])
    block_table = torch.cat([block_table, torch.zeros(len(q_lens), 3, dtype=torch.long)], 1).to(DEVICE, torch.int32)
    n = sum(q_lens)
    q = torch.randn(n, H * D, generator=gen).to(DEVICE)
    meta = SimpleNamespace(
        num_actual_tokens=n, max_query_len=max(q_lens), max_seq_len=max(seq_lens), causal=True,
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_table=block_table)
    out = torch.full((n + 2, H * D), float("nan"), device=DEVICE)  # padded like vLLM's output buffer
    impl = _impl(monkeypatch)
    assert impl.forward(None, q, None, None, kv_cache, meta, out) is out
    expected = _paged_reference(q.view(n, H, D), kv_cache, block_table.cpu(), seq_lens, q_lens)
    torch.testing.assert_close(out[:n].view(n, H, D), expected, atol=2e-5, rtol=2e-5)


def test_the_layers_of_a_step_share_one_copy_of_each_requests_first_block(monkeypatch):
    """Every layer of a step gets the same metadata: the first virtual blocks are copied out of the block
    table once and the other layers read that copy; the next step's metadata (its own block table) gets
    its own, with the requests in other slots."""
    gen = torch.Generator().manual_seed(1)
    kv_cache = torch.randn(16, HKV, B, 2 * D, generator=gen).to(DEVICE)
    q = torch.randn(2, H * D, generator=gen).to(DEVICE)
    impl = _impl(monkeypatch)
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",  # counting copies of block-table columns (int32, 1-D)
                        lambda t, *a, **k: (t.dtype == torch.int32 and t.dim() == 1 and copies.append(1))
                        or real(t, *a, **k))

    def step(first_blocks):
        table = torch.stack([torch.arange(4) + f for f in first_blocks]).to(DEVICE, torch.int32)
        meta = SimpleNamespace(num_actual_tokens=2, max_query_len=1, max_seq_len=40, causal=True,
                               query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE),
                               seq_lens=torch.tensor([40, 9], dtype=torch.int32, device=DEVICE), block_table=table)
        want = _paged_reference(q.view(2, H, D), kv_cache, table.cpu(), [40, 9], [1, 1])
        for _layer in range(3):
            out = torch.empty(2, H * D, device=DEVICE)
            impl.forward(None, q, None, None, kv_cache, meta, out)
            torch.testing.assert_close(out.view(2, H, D), want, atol=2e-5, rtol=2e-5)
        return meta._vtensor_kv_start[2].tolist()

    assert step([12, 0]) == [12, 0] and len(copies) == 1
    copies.clear()
    assert step([4, 8]) == [4, 8] and len(copies) == 1


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_cuda_impl_reads_an_fp8_cache_as_vllms_writer_stores_it(monkeypatch, kv_cache_dtype):
    """An fp8 KV cache: vLLM allocates it as bytes and its Triton writer stores every fp8 dtype as the
    platform's fp8 type, divided by the layer's per-tensor scales; the kernels read those bytes and give
    attention over the dequantized KV."""
    gen = torch.Generator().manual_seed(1)
    q_lens, seq_lens = [5, 1], [21, 30]
    impl = _impl(monkeypatch, kv_cache_dtype=kv_cache_dtype)
    exact = torch.randn(8, HKV, B, 2 * D, generator=gen) * 3
    k_scale, v_scale = 0.05, 0.02
    scales = torch.cat([torch.full((D,), k_scale), torch.full((D,), v_scale)])
    stored = (exact / scales).to(impl.fp8_dtype)
    kv_cache = stored.view(torch.uint8).to(DEVICE)  # as vLLM allocates it
    block_table = torch.tensor([[4, 5, 6, 7], [0, 1, 2, 3]], dtype=torch.int32, device=DEVICE)
    n = sum(q_lens)
    q = torch.randn(n, H * D, generator=gen).to(DEVICE)
    meta = SimpleNamespace(
        num_actual_tokens=n, max_query_len=max(q_lens), max_seq_len=max(seq_lens), causal=True,
        query_start_loc=torch.tensor([0, 5, 6], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_table=block_table)
    out = torch.empty(n, H * D, device=DEVICE)
    layer = SimpleNamespace(_k_scale_float=k_scale, _v_scale_float=v_scale)
    impl.forward(layer, q, None, None, kv_cache, meta, out)
    dequantized = (stored.float() * scales).to(DEVICE)
    expected = _paged_reference(q.view(n, H, D), dequantized, block_table.cpu(), seq_lens, q_lens)
    torch.testing.assert_close(out.view(n, H, D), expected, atol=2e-4, rtol=2e-4)
    far = _paged_reference(q.view(n, H, D), exact.to(DEVICE), block_table.cpu(), seq_lens, q_lens)
    error = ((out.view(n, H, D) - far).abs().mean() / far.abs().mean()).item()
    assert error < 0.08, error  # near full precision: e4m3 rounding (4.8% here), not garbage


@pytest.mark.parametrize("kw, what", [
    (dict(alibi_slopes=[0.5, 0.25, 0.125, 0.0625]), "ALiBi slopes"),
    (dict(sliding_window=64), "a sliding window"),
])
def test_what_the_kernels_lack_is_refused_naming_the_fix(monkeypatch, kw, what):
    with pytest.raises(ValueError, match=f"does not implement {what}.*VTENSOR_ATTENTION=vllm"):
        _impl(monkeypatch, **kw)
    assert _impl(monkeypatch, "vllm", **kw).kernel == "vllm"  # vLLM's kernel over the same memory takes them


@pytest.mark.parametrize("kw, fix", [
    (dict(kv_cache_dtype="fp8_per_token_head"), "use --kv-cache-dtype auto or fp8"),
    (dict(has_sliding_window=True), "has not run sliding-window models yet"),
    (dict(has_sink=True), "has not run attention sinks yet"),
])
def test_configurations_refused_at_selection_name_the_fix(kw, fix):
    """vLLM refuses VTENSOR at backend selection for what its CUDA path has not run; each reason says what to do."""
    from vllm.platforms.interface import DeviceCapability

    from vllm_vtensor.backend_cuda import VTensorCudaBackend

    args = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
                device_capability=DeviceCapability(9, 0), attn_type="decoder")
    assert VTensorCudaBackend.validate_configuration(**args) == []
    assert VTensorCudaBackend.validate_configuration(**(args | dict(kv_cache_dtype="fp8"))) == []
    reasons = VTensorCudaBackend.validate_configuration(**(args | kw))
    assert any(fix in r for r in reasons) and reasons[-1] == "or run without --attention-backend VTENSOR", reasons


def test_an_unknown_kernel_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="on CUDA: use one of triton, vllm"):
        _impl(monkeypatch, "cpu")


@pytest.fixture(scope="module")
def smollm2_shaped():
    """A random-weight llama of SmolLM2-135M's shape (GPU machines have no network to fetch SmolLM2)."""
    from vllm_vtensor.models import build_tiny_llama

    return str(build_tiny_llama(head_dim=64, num_layers=30, num_heads=9, num_kv_heads=3, hidden_size=576,
                                intermediate_size=1536))


@pytest.mark.parametrize("dtype, expected", [("bfloat16", 176), ("float32", None)])
def test_block_size_without_a_flag_fills_chunks(smollm2_shaped, dtype, expected):
    """Without --block-size vLLM asks the backend for its preferred size: VTENSOR on CUDA picks the
    smallest multiple of 16 tokens whose KV over all layers fills a 2 MiB-granular chunk to within
    10% (vLLM's default 16 would pad SmolLM2's 0.37 MB block to 2 MiB)."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from vllm_vtensor.backend_cuda import CUDA_GRANULARITY, VTensorCudaBackend
    from vllm_vtensor.policy import check_chunk_padding

    cfg = EngineArgs(model=smollm2_shaped, dtype=dtype, max_model_len=1024).create_engine_config()
    with set_current_vllm_config(cfg):
        block = VTensorCudaBackend.get_preferred_block_size(16)
    per_token = 2 * 30 * 3 * 64 * (2 if dtype == "bfloat16" else 4)  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    assert block % 16 == 0 and (expected is None or block == expected)
    check_chunk_padding(block * per_token, block, CUDA_GRANULARITY)
    with pytest.raises(ValueError):
        check_chunk_padding((block - 16) * per_token, block - 16, CUDA_GRANULARITY)
