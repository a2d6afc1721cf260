"""VTENSOR with this project's attention kernels inside vLLM ($VTENSOR_ATTENTION): the Triton
kernels (under Triton's interpreter on this CPU) and their torch reference, addressed by each
request's first virtual block and strides only.  Greedy tokens must equal vanilla vLLM's, with
chunked prefill forced, requests of several blocks, decode-only and mixed steps, and prefix-cache
hits (a cached prefix + new tokens); the chosen tokens' logprobs must match too.  Tiny llama: the
interpreter is slow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent("""
    import collections, json, os, sys
    from vllm import LLM, SamplingParams
    calls = collections.Counter()
    kernel = os.environ.get("VTENSOR_ATTENTION")
    if kernel:  # count the kernel calls (the engine runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0)
        if kernel == "triton":
            from vllm_vtensor.kernels import attention as module
            names = ("context_attention", "decode_attention")
        else:
            from vllm_vtensor.kernels import reference as module
            names = ("context_attention_ref", "decode_attention_ref")
        for kind, name in zip(("context", "decode"), names):
            def counted(*a, _f=getattr(module, name), _kind=kind, **k):
                calls[_kind] += 1
                return _f(*a, **k)
            setattr(module, name, counted)
    if __name__ == "__main__":
        kw = {"attention_backend": "VTENSOR"} if sys.argv[2] == "vtensor" else {}
        llm = LLM(model=sys.argv[1], dtype=sys.argv[3], max_model_len=512, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=32 << 20, block_size=32, max_num_batched_tokens=64,
                  enable_chunked_prefill=True, **kw)
        sp = SamplingParams(temperature=0, max_tokens=12, logprobs=0)  # the chosen token's logprob
        prompts = [[1, 500 + i, 900, 33 * i + 7] * n for i, n in enumerate((3, 10, 24, 33))]  # 12-132 tokens
        first = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        # the same prompts grown by their answers and more: their leading full blocks are cache hits
        again = [p + list(o.outputs[0].token_ids) + [2, 3, 4] for p, o in zip(prompts, first)]
        second = llm.generate([{"prompt_token_ids": p} for p in again], sp, use_tqdm=False)
        hits = None
        if kw:
            from vllm_vtensor import stats
            hits = (stats.read() or {}).get("prefix_hit_bytes")
        outs = first + second
        logprobs = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                    for o in outs]
        print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                      "logprobs": logprobs, "prefix_hit_bytes": hits, "calls": calls}))
""")


def _run(model, mode, kernel=None, dtype="float32"):
    env = dict(os.environ)
    env.pop("VTENSOR_ATTENTION", None)
    if kernel:
        env["VTENSOR_ATTENTION"] = kernel
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in the script's process: kernel calls are counted
        if kernel == "triton":
            env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", SCRIPT, model, mode, dtype], capture_output=True, text=True,
                         timeout=1200, env=env)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, (run.stdout + run.stderr)[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def vanilla(tiny_llama_path):
    return _run(tiny_llama_path, "vanilla")


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_vtensor_with_project_kernels_matches_vanilla(tiny_llama_path, vanilla, kernel):
    got = _run(tiny_llama_path, "vtensor", kernel)
    assert got["tokens"] == vanilla["tokens"]
    # the random-weight model's argmax barely depends on attention: its logprobs must match too
    diffs = [abs(a - b) for xs, ys in zip(got["logprobs"], vanilla["logprobs"]) for a, b in zip(xs, ys)]
    assert len(diffs) == 8 * 12 and max(diffs) < 1e-3, max(diffs)
    assert got["calls"]["context"] > 0 and got["calls"]["decode"] > 0  # prefill/mixed steps, decode-only steps
    assert got["prefix_hit_bytes"] > 0  # the second round's prefixes were mapped from the cache


def test_bf16_with_the_reference_kernel_matches_vanilla(tiny_llama_path):
    """bf16: on a CPU with AMX vLLM's bf16 kernel ("amx") keeps each block in tiles, which this project's
    kernels cannot address by strides; with them VTENSOR has vLLM write its strided "vec" layout instead
    (elsewhere vLLM picks "vec" itself). Vanilla runs its own choice."""
    vanilla = _run(tiny_llama_path, "vanilla", dtype="bfloat16")
    got = _run(tiny_llama_path, "vtensor", "reference", dtype="bfloat16")
    assert got["tokens"] == vanilla["tokens"]
    diffs = [abs(a - b) for xs, ys in zip(got["logprobs"], vanilla["logprobs"]) for a, b in zip(xs, ys)]
    assert len(diffs) == 8 * 12 and max(diffs) < 0.05, max(diffs)
    assert got["calls"]["context"] > 0 and got["calls"]["decode"] > 0 and got["prefix_hit_bytes"] > 0


def test_unknown_attention_kernel_is_refused_naming_the_choices(monkeypatch):
    from vllm_vtensor.backend import attention_kernel

    monkeypatch.setenv("VTENSOR_ATTENTION", "flash")
    with pytest.raises(ValueError, match="use one of cpu, triton, reference"):
        attention_kernel()
    monkeypatch.setenv("VTENSOR_ATTENTION", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        attention_kernel()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_kernel() == "triton"
    monkeypatch.delenv("VTENSOR_ATTENTION")
    assert attention_kernel() == "cpu"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_views_read_what_vllms_cpu_kernel_wrote(dtype):
    import torch
    from vllm import _custom_ops as ops

    from vllm_vtensor.backend import _kv_views, block_layout

    dtype = getattr(torch, dtype)
    blocks, heads, block, dim, tokens = 5, 2, 32, 64, 70
    cache = torch.zeros(blocks, heads, block, 2 * dim, dtype=dtype)
    k_cache, v_cache = cache.view(blocks, heads, 2 * block, dim).chunk(2, dim=2)
    key, value = torch.randn(tokens, heads, dim).to(dtype), torch.randn(tokens, heads, dim).to(dtype)
    slots = torch.arange(tokens, dtype=torch.int64) + block  # from block 1 on
    ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slots, "vec", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    k, v = _kv_views(cache, block_layout("vec", block, dim, dtype))
    t = torch.arange(tokens)
    assert torch.equal(k[1 + t // block, :, t % block], key) and torch.equal(v[1 + t // block, :, t % block], value)
    assert block_layout("vec", block, dim, dtype) == ((1, block), (dim, 1))  # K transposed, V by rows


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_fp8_writes_land_where_the_kernels_read_them(name):
    """write_fp8 stores key/value divided by the scales at the slots' blocks and offsets (padding
    slots skipped, out-of-range values saturated), in the views the kernels read: nothing else changes."""
    import torch

    from vllm_vtensor.backend import FP8_KV_DTYPES, _kv_views, write_fp8

    fp8 = FP8_KV_DTYPES[name]
    blocks, heads, block, dim, tokens = 4, 2, 32, 64, 40
    cache = torch.zeros(blocks, heads, block, 2 * dim, dtype=torch.uint8)  # as vLLM allocates an fp8 cache
    k, v = _kv_views(cache.view(fp8), layout=None)
    key, value = torch.randn(tokens, heads, dim), torch.randn(tokens, heads, dim)
    key[0, 0, 0] = 1e6  # beyond either fp8 type's range
    slots = torch.arange(tokens, dtype=torch.int64) + block + 5
    slots[3] = -1  # padding
    write_fp8(key, value, k, v, slots, k_scale=0.5, v_scale=2.0)
    t = torch.arange(tokens)[slots >= 0]
    at = (1 + (t + 5) // block, slice(None), (t + 5) % block)
    expected = key.clone()
    expected[0, 0, 0] = torch.finfo(fp8).max * 0.5
    torch.testing.assert_close(k[at].float() * 0.5, expected[t], rtol=0.13, atol=0.01)
    torch.testing.assert_close(v[at].float() * 2.0, value[t], rtol=0.13, atol=0.02)
    assert k[1, 0, 5, 0].float() == torch.finfo(fp8).max
    written = torch.zeros_like(cache, dtype=torch.bool)
    written.view(blocks, heads, 2, block, dim)[1 + (t + 5) // block, :, :, (t + 5) % block] = True
    assert (cache[~written] == 0).all()
    assert (k[1, :, 8].view(torch.uint8) == 0).all() and (v[1, :, 8].view(torch.uint8) == 0).all()  # slot 3: padding
