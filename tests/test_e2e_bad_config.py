"""Configurations VTENSOR cannot run fail at start-up with a message that names the fix: those the
configuration alone decides in the user's process, as ``LLM(...)`` makes its configuration (a
``ValueError``, before any engine process starts), the rest once the engine has measured its memory."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.e2e


def _start(model: str, extra: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={model!r}, dtype="float32", enforce_eager=True, attention_backend="VTENSOR", {extra})
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_budget_below_one_request_of_max_model_len(smollm2_path):
    run = _start(smollm2_path, "max_model_len=2048, kv_cache_memory_bytes=32 << 20")
    assert run.returncode != 0
    assert "max_model_len" in run.stderr and "KV cache" in run.stderr


def refused_at_config(model: str, **extra) -> str:
    """``LLM(...)`` with ``extra``, in this process: the ValueError it raises while making its configuration
    (an engine that got as far as starting would fail with a RuntimeError, or not at all)."""
    from vllm import LLM

    with pytest.raises(ValueError) as e:
        llm = LLM(model=model, **dict(dtype="float32", enforce_eager=True, max_model_len=512,
                                      kv_cache_memory_bytes=64 << 20) | extra)
        llm.llm_engine.engine_core.shutdown()  # not refused: stop the engine before the test fails
    return str(e.value)


def _refused(model: str, **extra) -> str:
    return refused_at_config(model, attention_backend="VTENSOR", **extra)


@pytest.fixture(scope="module")
def head48_llama_path():
    from vllm_vtensor.models import build_tiny_llama

    return str(build_tiny_llama(head_dim=48, num_heads=2, num_kv_heads=1))


def test_unsupported_head_size_is_refused(head48_llama_path):
    message = _refused(head48_llama_path)
    assert "VTENSOR cannot serve this model: head size 48 is not supported" in message
    assert "Run it without --attention-backend VTENSOR" in message


def test_fp8_kv_cache_for_vllms_kernel_on_a_cpu_without_it_is_refused(tiny_llama_path):
    from vllm_vtensor.backend import cpu_kernel_reads_fp8

    if cpu_kernel_reads_fp8():
        pytest.skip("this CPU has AVX-512 or AMX: vLLM's CPU kernel reads fp8 KV (tests/test_e2e_fp8_kv.py runs it)")
    assert "reads fp8 KV only on x86 with AVX-512 or AMX" in _refused(tiny_llama_path, kv_cache_dtype="fp8")


def test_block_size_the_cpu_kernel_cannot_take_is_refused(tiny_llama_path):
    assert "--block-size 48 is not one. Pass --block-size 64" in _refused(tiny_llama_path, block_size=48)


def test_kv_connector_is_refused(tiny_llama_path, tmp_path):
    """A KV connector would copy KV by physical block ids into VTENSOR's virtually indexed cache
    (vLLM's ExampleConnector stopped the engine that way before this refusal)."""
    connector = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)}}
    message = _refused(tiny_llama_path, kv_transfer_config=connector)
    assert "VTENSOR cannot run with KV connectors" in message
    assert "run without --kv-transfer-config / --kv-offloading-size" in message


def test_a_bad_setting_is_refused(tiny_llama_path, monkeypatch):
    monkeypatch.setenv("VTENSOR_CHUNK_LINGER_S", "soon")
    assert "VTENSOR_CHUNK_LINGER_S='soon' cannot be read" in _refused(tiny_llama_path)


def test_without_vtensor_nothing_is_refused(tiny_llama_path):
    """The same configuration without VTENSOR passes the check (vLLM's CPU backend takes --block-size 48
    only at its kernel, in the worker: the configuration itself is not VTENSOR's to refuse)."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=tiny_llama_path, dtype="float32", block_size=48, max_model_len=512).create_engine_config()
    assert config.cache_config.block_size == 48


def test_vllm_serve_refuses_before_starting_an_engine(tiny_llama_path):
    """`vllm serve` makes its configuration through the same EngineArgs: it exits with the fix before any
    engine process starts (no EngineCore log line), as it would for one of vLLM's own bad arguments."""
    from vllm_vtensor.demo import vllm_cli

    run = subprocess.run([vllm_cli(), "serve", tiny_llama_path, "--dtype", "float32", "--attention-backend", "VTENSOR",
                          "--block-size", "48", "--port", "1"], capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "--block-size 48 is not one. Pass --block-size 64" in out
    assert "EngineCore" not in out, out[-3000:]
