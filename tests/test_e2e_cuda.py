"""`attention_backend="VTENSOR"` inside vLLM on a CUDA GPU, against vanilla vLLM's Triton backend:
with vLLM's own kernel over VTENSOR's memory (VTENSOR_ATTENTION=vllm) greedy outputs are identical
and logprobs equal to 1e-5 (mixed batches with forced chunked prefill, shared prefixes, preemption with prefix
caching off, CUDA graphs of decode steps); with this project's Triton kernels (the default) they
are the same up to numerical ties; mapped bytes return to zero; a cached prefix is mapped, never
copied.

Needs a GPU and vLLM; skipped otherwise.  GPU machines here have no vLLM: benchmarks/gpu_vllm.sh
runs this file there with vLLM's Python source and none of its compiled CUDA ops, so both engines
then use vLLM's native (torch) layers and Triton kernels alike (see ENGINE below).
"""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm", reason="needs vLLM")

from test_e2e_vtensor import MAX_TOKENS, MIXED, SHARED, _shutdown, _stats  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.gpu]

# fp32 tiny llama: 8 layers x 4 KV heads x 64 x (K, V) x 4 B = 16 KiB per token, so a block of 128
# tokens is one 2 MiB chunk (the CUDA VMM granularity) with no padding
BLOCK = 128
ENGINE = dict(dtype="float32", max_model_len=1024, seed=0, max_num_batched_tokens=64, block_size=BLOCK,
              max_num_seqs=16, enforce_eager=True)
if os.environ.get("VTENSOR_NO_VLLM_OPS") == "1":  # vLLM's compiled CUDA ops absent (benchmarks/gpu_vllm.sh)
    ENGINE |= dict(compilation_config={"custom_ops": ["none"]},
                   kernel_config={"ir_op_priority": {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}})
CHUNK = 2 << 20


@pytest.fixture(scope="module")
def model():
    from vllm_vtensor.models import build_tiny_llama

    return str(build_tiny_llama(num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64))


def _engine(model, stats_file, **kw):
    from vllm import LLM

    os.environ["VTENSOR_STATS_FILE"] = str(stats_file)
    return LLM(model=model, **{**ENGINE, **kw})


LP_TOL = 2e-2  # chosen-token logprobs of two attention kernels (vLLM's Triton kernel uses TF32 dots for fp32)
TIE_TOL = 5e-2  # a greedy choice may differ only where the top two are this close


def _gen(llm, convs):
    """Greedy outputs with each step's top-2 logprobs: [(token ids, [{token: logprob}, ...]), ...]."""
    from vllm import SamplingParams

    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


def _workloads(llm):
    return {"mixed": _gen(llm, MIXED), "shared": _gen(llm, SHARED[:1]) + _gen(llm, SHARED[1:])}


def _tokens(run):
    return {name: [ids for ids, _ in outs] for name, outs in run.items()}


def _assert_same_up_to_ties(ref, out):
    """Same tokens with close logprobs, except that from a step where the reference's top two were
    within TIE_TOL (a numerical tie) the two may go different ways."""
    for name in ref:
        for (ids_a, lps_a), (ids_b, lps_b) in zip(ref[name], out[name], strict=True):
            for step, (a, b) in enumerate(zip(ids_a, ids_b)):
                if a != b:
                    top = sorted(lps_a[step].values(), reverse=True)
                    assert len(top) > 1 and top[0] - top[1] < TIE_TOL, (name, step, lps_a[step], lps_b[step])
                    break
                assert abs(lps_a[step][a] - lps_b[step][b]) < LP_TOL, (name, step, lps_a[step], lps_b[step])
            else:
                assert len(ids_a) == len(ids_b), name


def _assert_identical(ref, out, tol=1e-5):
    """Same tokens and the same top-2 logprobs (to ``tol``: the same kernel on the same values)."""
    assert _tokens(out) == _tokens(ref)
    for name in ref:
        for (_, lps_a), (_, lps_b) in zip(ref[name], out[name], strict=True):
            for a, b in zip(lps_a, lps_b, strict=True):
                assert a.keys() == b.keys() and all(abs(a[t] - b[t]) <= tol for t in a), (name, a, b)


def _assert_kernel_matches(kernel, ref, out):
    """vLLM's kernel over VTENSOR's memory: identical to the reference; this project's: up to ties."""
    if kernel == "vllm":
        _assert_identical(ref, out)
    else:
        _assert_same_up_to_ties(ref, out)


def _vtensor(model, stats_file, kernel, **kw):
    """A VTENSOR engine whose worker runs ``kernel`` ($VTENSOR_ATTENTION, read when the worker starts)."""
    os.environ["VTENSOR_ATTENTION"] = kernel
    try:
        return _engine(model, stats_file, attention_backend="VTENSOR", **kw)
    finally:
        del os.environ["VTENSOR_ATTENTION"]


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    llm = _engine(model, tmp_path_factory.mktemp("vanilla") / "unused.json", attention_backend="TRITON_ATTN",
                  kv_cache_memory_bytes=256 << 20)
    out = _workloads(llm)
    _shutdown(llm)
    return out


@pytest.fixture(scope="module")
def vtensor_run(model, tmp_path_factory, reference):
    """VTENSOR with vLLM's own Triton kernel: only the KV memory differs from the reference."""
    stats = tmp_path_factory.mktemp("vt") / "stats.json"
    llm = _vtensor(model, stats, "vllm", kv_cache_memory_bytes=256 << 20)
    out = _workloads(llm)
    after = _stats(stats)
    _shutdown(llm)
    return out, after


def test_vtensor_kv_memory_matches_vanilla_exactly_on_cuda(reference, vtensor_run):
    """Same kernel over VTENSOR's CUDA VMM ranges (virtual block ids, mapped chunks, prefix hits
    mapped into several ranges): the same tokens and the same logprobs."""
    out, stats = vtensor_run
    _assert_identical(reference, out)
    assert stats["chunk_bytes"] == CHUNK
    assert stats["maps"] > 0 and stats["unmaps"] > 0


def test_mapped_bytes_return_to_zero_on_cuda(vtensor_run):
    _, stats = vtensor_run
    assert stats["running_requests"] == 0
    assert stats["mapped_bytes"] == 0
    assert stats["resident_bytes"] == stats["cached_bytes"] + stats["reserve_bytes"] <= stats["budget_bytes"]


def test_cached_prefix_is_mapped_not_copied_on_cuda(vtensor_run):
    _, stats = vtensor_run
    assert stats["prefix_hit_bytes"] >= 3 * 2 * CHUNK  # 3 later requests reuse 2+ blocks of the system prompt
    assert stats["copied_bytes"] == 0


def test_vtensor_triton_kernels_match_vanilla_on_cuda(model, tmp_path, reference):
    """This project's Triton kernels (the CUDA default) in place of vLLM's: same tokens up to
    numerical ties, chosen-token logprobs within LP_TOL (forced chunked prefill: prefix + new
    tokens in the context kernel; decode-only steps in the split-K decode kernel)."""
    llm = _vtensor(model, tmp_path / "stats.json", "triton", kv_cache_memory_bytes=256 << 20)
    out = _workloads(llm)
    _shutdown(llm)
    _assert_same_up_to_ties(reference, out)


def test_preemption_on_cuda(model, tmp_path, reference):
    """5 blocks of 128 tokens (max_model_len 512 needs 4) for 6 requests: preemption, same tokens."""
    stats = tmp_path / "stats.json"
    llm = _vtensor(model, stats, "vllm", max_model_len=512, kv_cache_memory_bytes=5 * CHUNK,
                   enable_prefix_caching=False)
    out = _gen(llm, MIXED)
    after = _stats(stats)
    _shutdown(llm)
    assert [ids for ids, _ in out] == _tokens(reference)["mixed"]
    assert after["preemptions"] > 0
    assert after["mapped_bytes"] == 0 and after["resident_bytes"] == after["reserve_bytes"]


@pytest.mark.parametrize("kernel", ["vllm", "triton"])
def test_cuda_graphs_of_decode_steps(model, tmp_path, reference, kernel):
    """Decode steps replayed from full CUDA graphs captured at start-up, before any request had
    memory mapped: the graphs read KV mapped later into the same virtual addresses."""
    cfg = dict(ENGINE.get("compilation_config", {}), mode=0, cudagraph_mode="FULL_DECODE_ONLY")
    llm = _vtensor(model, tmp_path / "stats.json", kernel, kv_cache_memory_bytes=256 << 20, enforce_eager=False,
                   compilation_config=cfg)
    out = _workloads(llm)
    _shutdown(llm)
    _assert_kernel_matches(kernel, reference, out)


def test_deferred_unmaps_with_cuda_graphs_and_preemption(model, tmp_path, reference, monkeypatch):
    """VTENSOR_DEFERRED_UNMAP=1: finished and preempted requests' ranges are unmapped by a helper thread once
    the device has passed the work that may read them, while decode steps replay CUDA graphs captured at
    start-up and a budget of 5 blocks forces preemption: vanilla's tokens exactly (vLLM's kernel), and every
    range is unmapped in the end."""
    import time

    monkeypatch.setenv("VTENSOR_DEFERRED_UNMAP", "1")
    stats = tmp_path / "stats.json"
    cfg = dict(ENGINE.get("compilation_config", {}), mode=0, cudagraph_mode="FULL_DECODE_ONLY")
    llm = _vtensor(model, stats, "vllm", max_model_len=512, kv_cache_memory_bytes=5 * CHUNK, enforce_eager=False,
                   compilation_config=cfg)
    out = _gen(llm, MIXED)
    deadline = time.monotonic() + 10
    while (after := _stats(stats))["mapped_bytes"] and time.monotonic() < deadline:  # the helper's last unmaps
        time.sleep(0.1)
    _shutdown(llm)
    assert [ids for ids, _ in out] == _tokens(reference)["mixed"]
    assert after["preemptions"] > 0 and after["running_requests"] == 0 and after["mapped_bytes"] == 0
