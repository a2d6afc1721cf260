"""VTENSOR's start-up checks name what it cannot serve and the fix (no engine needed)."""
from __future__ import annotations

import pytest
import torch

from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.selector import AttentionSelectorConfig

from vllm_vtensor.backend import check_supported


def cfg(**kw):
    base = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=128)
    return AttentionSelectorConfig(**{**base, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", [32, 64, 128])
def test_supported_configs_pass(dtype, head_size):
    check_supported(cfg(dtype=dtype, head_size=head_size))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(head_size=48), "head size 48 is not supported"),
        (dict(dtype=torch.float64), "dtype float64 is not supported"),
        (dict(kv_cache_dtype="fp8_per_token_head"), "kv_cache_dtype='fp8_per_token_head' is not supported"),
        (dict(use_mla=True), "MLA and sparse attention models are not supported"),
        (dict(attn_type=AttentionType.ENCODER_ONLY), "only decoder self-attention"),
    ],
)
def test_unsupported_configs_name_the_problem_and_the_fix(kw, message):
    with pytest.raises(ValueError, match="VTENSOR cannot serve this model") as e:
        check_supported(cfg(**kw))
    assert message in str(e.value) and "Run it without --attention-backend VTENSOR" in str(e.value)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_caches_pass(kv_cache_dtype):
    check_supported(cfg(kv_cache_dtype=kv_cache_dtype))


def test_fp8_for_vllms_cpu_kernel_without_avx512_names_vtensors_own_path(monkeypatch):
    from vllm_vtensor import backend

    monkeypatch.setattr(backend, "cpu_kernel_reads_fp8", lambda: False)
    with pytest.raises(ValueError, match="AVX-512 or AMX.*VTENSOR_ATTENTION=reference.*--kv-cache-dtype auto"):
        backend.check_fp8_kernel("fp8_e5m2", "cpu")
    for ok in (("fp8", "reference"), ("fp8", "triton"), ("auto", "cpu")):
        backend.check_fp8_kernel(*ok)
    monkeypatch.setattr(backend, "cpu_kernel_reads_fp8", lambda: True)
    backend.check_fp8_kernel("fp8", "cpu")
    assert backend.own_fp8("fp8", "reference") and not backend.own_fp8("fp8", "cpu")
    assert not backend.own_fp8("auto", "reference")


@pytest.mark.parametrize("block_size, fits", [(48, 64), (16, 32), (100, 128)])
def test_a_block_size_the_cpu_kernel_cannot_take_names_one_it_can(block_size, fits):
    with pytest.raises(ValueError, match=f"--block-size {block_size} is not one. Pass --block-size {fits} "):
        check_supported(cfg(block_size=block_size))


def test_the_cpu_block_multiple_is_what_vllms_cpu_backend_declares():
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from vllm_vtensor.backend import CPU_BLOCK_MULTIPLE

    assert CPUAttentionBackend.get_supported_kernel_block_sizes() == [MultipleOf(CPU_BLOCK_MULTIPLE)]
