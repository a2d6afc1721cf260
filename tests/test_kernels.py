"""Triton prefix-prefill and decode kernels equal the SDPA reference: prefixes of 0, 1 and
non-multiples of the tile sizes, 1-token chunks, mixed decode/prefill batches, empty entries,
GQA 1/3/4, head dims 64/128, fp32/fp16/bf16, and strided (non-packed) KV layouts.
On CPU they run under the Triton interpreter (small shapes); on a GPU, compiled."""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' @triton.jit

from vllm_vtensor.kernels.attention import context_attention, decode_attention  # noqa: E402
from vllm_vtensor.kernels.reference import context_attention_ref, decode_attention_ref  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_cache(num_blocks, kv_heads, block, dim, dtype, layout, gen):
    """K and V caches ``[blocks, H, B, D]`` (views, strides kept on every device) in one of three physical layouts."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if layout == "packed":
        return rand(num_blocks, kv_heads, block, dim), rand(num_blocks, kv_heads, block, dim)
    if layout == "vllm_cpu":  # vLLM's CPU cache ("vec" ISA): per block and head, K as [D, B], then V as [B, D]
        kv = rand(num_blocks, kv_heads, 2 * block * dim)
        k = kv[:, :, : block * dim].unflatten(2, (dim, block)).transpose(2, 3)  # head dim strided by B
        return k, kv[:, :, block * dim :].unflatten(2, (block, dim))
    # "all_layers": a block holds every layer's page; this is layer 1 of 3
    kv = rand(num_blocks, 3, kv_heads, 2 * block, dim)
    return kv[:, 1, :, :block], kv[:, 1, :, block:]


def make_batch(q_lens, seq_lens, heads, kv_heads, dim, block, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    starts, nxt = [], 1  # leave block 0 unused and gaps between requests: slots, not packing
    for s in seq_lens:
        starts.append(nxt)
        nxt += -(-max(s, 1) // block) + 1
    k, v = make_cache(nxt, kv_heads, block, dim, dtype, layout, gen)
    q = torch.randn(sum(q_lens), heads, dim, generator=gen).to(DEVICE, dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return dict(q=q, k_cache=k, v_cache=v, query_start_loc=qsl,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                kv_start_block=torch.tensor(starts, dtype=torch.int32, device=DEVICE), scale=dim ** -0.5)


def check(fn, ref, batch, dtype, **kw):
    out = torch.full_like(batch["q"], float("nan"))
    expected = torch.zeros_like(batch["q"])
    fn(out=out, **batch, **kw)
    ref(out=expected, **batch, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


# q_lens / seq_lens: prefill from 0, a 1-token prefix, a decode row, an empty entry, odd sizes
MIXED = ([5, 1, 0, 17, 40], [5, 40, 12, 18, 77])


@pytest.mark.parametrize(
    "heads, kv_heads, dim, dtype, layout, block",
    [
        (4, 4, 64, torch.float32, "packed", 16),
        (3, 1, 64, torch.float32, "vllm_cpu", 32),
        (4, 1, 128, torch.float32, "all_layers", 16),
        (4, 2, 64, torch.float16, "vllm_cpu", 16),
        (4, 1, 64, torch.bfloat16, "all_layers", 32),
        (2, 2, 128, torch.bfloat16, "packed", 128),
    ],
)
def test_context_attention_matches_reference(heads, kv_heads, dim, dtype, layout, block):
    batch = make_batch(*MIXED, heads, kv_heads, dim, block, dtype, layout)
    check(context_attention, context_attention_ref, batch, dtype)


def test_context_attention_one_token_chunks_and_prefix_of_one():
    batch = make_batch([1, 1, 2], [1, 2, 3], 4, 2, 64, 16, torch.float32, "packed")
    check(context_attention, context_attention_ref, batch, torch.float32)


def test_context_attention_sliding_window():
    batch = make_batch([20, 1, 33], [60, 70, 33], 4, 2, 64, 16, torch.float32, "vllm_cpu")
    check(context_attention, context_attention_ref, batch, torch.float32, sliding_window=24)


def test_launch_config_overrides_tiles_and_rejects_unknown_keys():
    batch = make_batch(*MIXED, 4, 2, 64, 16, torch.float32, "packed")
    check(context_attention, context_attention_ref, batch, torch.float32,
          launch_config={"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2})
    dec = _decode_batch([3, 70], 4, 2, 64, 16, torch.float32, "packed")
    check(decode_attention, decode_attention_ref, dec, torch.float32, num_splits=2,
          launch_config={"BLOCK_N": 16, "num_warps": 2})
    with pytest.raises(ValueError, match="unknown launch_config keys"):
        context_attention(out=torch.empty_like(batch["q"]), **batch, launch_config={"BLOCK_K": 32})


@pytest.mark.gpu
def test_tiles_too_big_for_shared_memory_fall_back_to_smaller_ones():
    """fp32, head dim 128, 128x128 tiles in 4 stages exceed an H100's shared memory: the launcher
    retries with fewer stages and smaller tiles instead of failing."""
    batch = make_batch(*MIXED, 4, 1, 128, 16, torch.float32, "packed")
    check(context_attention, context_attention_ref, batch, torch.float32,
          launch_config={"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4})


def test_shared_memory_fallback_order():
    from triton.runtime.errors import OutOfResources

    from vllm_vtensor.kernels import attention

    class Kernel:  # stands in for a JIT function whose launch fails while the tiles are too big
        def __init__(self):
            self.launched = []

        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["BLOCK_N"] * kw["num_stages"] > 32:
                    raise OutOfResources(kw["BLOCK_N"] * kw["num_stages"] * 1024, 32 * 1024, "shared memory")
                self.launched.append((grid, kw))
            return launch

    k = Kernel()
    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
    for _ in range(2):
        attention._launch(k, lambda c: (c["BLOCK_M"],), (), cfg, {"X": 1})
    assert [kw for _, kw in k.launched] == [{"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "X": 1}] * 2
    assert attention._shrink({"BLOCK_M": 16, "BLOCK_N": 16, "num_stages": 1}) is None


def test_empty_batch_leaves_output_untouched():
    batch = make_batch([], [], 4, 2, 64, 16, torch.float32, "packed")
    out = torch.empty(0, 4, 64, device=DEVICE)
    assert context_attention(out=out, **batch) is out


def _decode_batch(seq_lens, heads, kv_heads, dim, block, dtype, layout):
    batch = make_batch([1] * len(seq_lens), seq_lens, heads, kv_heads, dim, block, dtype, layout)
    batch.pop("query_start_loc")
    return batch


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "heads, kv_heads, dim, dtype, layout",
    [
        (4, 1, 64, torch.float32, "vllm_cpu"),
        (3, 3, 128, torch.float32, "all_layers"),
        (4, 2, 64, torch.bfloat16, "packed"),
    ],
)
def test_decode_matches_reference(num_splits, heads, kv_heads, dim, dtype, layout):
    batch = _decode_batch([1, 37, 100, 64], heads, kv_heads, dim, 16, dtype, layout)
    check(decode_attention, decode_attention_ref, batch, dtype, num_splits=num_splits)


def test_decode_sliding_window_with_splits():
    batch = _decode_batch([90, 10, 65], 4, 1, 64, 32, torch.float32, "packed")
    check(decode_attention, decode_attention_ref, batch, torch.float32, num_splits=2, sliding_window=40)


def test_decode_equals_context_attention_with_one_token_queries():
    """The two kernels agree with each other on a decode batch (same addressing)."""
    batch = _decode_batch([17, 50], 4, 2, 64, 16, torch.float32, "vllm_cpu")
    a, b = torch.empty_like(batch["q"]), torch.empty_like(batch["q"])
    decode_attention(out=a, **batch, num_splits=2)
    qsl = torch.arange(3, dtype=torch.int32, device=DEVICE)
    context_attention(out=b, query_start_loc=qsl, **batch)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_benchmark_feeds_vllm_kernels_the_same_data(tmp_path):
    """benchmarks/kernels.py's adapters (block tables, vLLM's paged x-layout for context_attention_fwd,
    the new tokens' K/V apart) give vLLM's own Triton kernels the same attention problem as ours: both
    match the SDPA reference under the interpreter, loaded from the installed vLLM's kernel files the
    way a GPU machine without vLLM loads them.  (A subprocess: the loader needs one without vllm imported.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "k.json"
    subprocess.run([sys.executable, str(root / "benchmarks/kernels.py"), "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["correctness"]
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    assert fp32 and all("vllm_unified_max_abs_err" in r for r in fp32)
    assert any("vllm_prefix_prefill_max_abs_err" in r for r in fp32)
    for r in rows:
        for key, err in r.items():
            if key.endswith("_max_abs_err"):
                assert err < (2e-5 if r["dtype"] == "float32" else 3e-2), (key, r)


@pytest.mark.parametrize("kernel", ["context", "decode"])
def test_a_strided_column_of_first_blocks_is_refused(kernel):
    """The kernels read kv_start_block[r] as a plain array. A block table's first column
    (``block_table[:, 0]``) is a strided view: read as an array it would hand request r the range of
    request 0 shifted by r blocks (an early CUDA backend did this). It is refused,
    naming the fix, and its .contiguous() copy gives the reference's result."""
    batch = _decode_batch([17, 50, 9], 4, 2, 64, 16, torch.float32, "packed")
    table = torch.stack([batch["kv_start_block"] + j for j in range(5)], dim=1)  # rows of consecutive ids
    fn, ref = (decode_attention, decode_attention_ref) if kernel == "decode" else (context_attention, context_attention_ref)
    if kernel == "context":
        batch["query_start_loc"] = torch.arange(4, dtype=torch.int32, device=DEVICE)
    batch["kv_start_block"] = table[:, 0]
    with pytest.raises(ValueError, match=r"contiguous.*block_table\[:, 0\]"):
        fn(out=torch.empty_like(batch["q"]), **batch)
    batch["kv_start_block"] = table[:, 0].contiguous()
    check(fn, ref, batch, torch.float32)


def _to_fp8(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``t / scale`` in ``dtype``, same strides (the whole storage converted: layouts stay as they are)."""
    store = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
    return (store / scale).to(dtype).as_strided(t.size(), t.stride(), t.storage_offset())


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype, layout", [(torch.float32, "vllm_cpu"), (torch.bfloat16, "all_layers")])
def test_fp8_caches_are_read_upcast_and_scaled(fp8, dtype, layout):
    """fp8 K/V (stored divided by their scales, as vLLM stores them): both kernels equal the reference
    over the same bytes, and the reference is the full-precision attention within fp8's rounding."""
    batch = make_batch(*MIXED, 4, 2, 64, 16, dtype, layout)
    full = torch.zeros_like(batch["q"])
    context_attention_ref(out=full, **batch)
    scales = dict(k_scale=0.5, v_scale=0.25)
    batch |= {"k_cache": _to_fp8(batch["k_cache"], 0.5, fp8), "v_cache": _to_fp8(batch["v_cache"], 0.25, fp8)}
    check(context_attention, context_attention_ref, batch, dtype, **scales)
    expected = torch.zeros_like(batch["q"])
    context_attention_ref(out=expected, **batch, **scales)
    rel = ((expected.float() - full.float()).norm() / full.float().norm()).item()
    assert 0 < rel < (0.05 if fp8 == torch.float8_e4m3fn else 0.1), rel  # fp8's rounding, not a wrong scale

    dec = _decode_batch([1, 37, 100, 64], 4, 2, 64, 16, dtype, layout)
    dec |= {"k_cache": _to_fp8(dec["k_cache"], 0.5, fp8), "v_cache": _to_fp8(dec["v_cache"], 0.25, fp8)}
    check(decode_attention, decode_attention_ref, dec, dtype, num_splits=2, **scales)


def test_an_unviewed_byte_cache_is_refused():
    batch = make_batch([3], [3], 2, 2, 64, 16, torch.float32, "packed")
    batch |= {"k_cache": batch["k_cache"].to(torch.uint8), "v_cache": batch["v_cache"].to(torch.uint8)}
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.float8_e5m2"):
        context_attention(out=torch.empty_like(batch["q"]), **batch)


@pytest.mark.parametrize(
    "heads, kv_heads, dim, dtype, layout, block, tiles",
    [
        (4, 1, 64, torch.float32, "packed", 16, {"BLOCK_M": 16, "BLOCK_N": 32}),  # two blocks per key tile
        (4, 2, 64, torch.bfloat16, "all_layers", 32, {"BLOCK_M": 32, "BLOCK_N": 16}),  # two key tiles per block
        (2, 2, 128, torch.float16, "packed", 16, {"BLOCK_M": 16, "BLOCK_N": 16}),
    ],
)
def test_context_attention_through_tensor_descriptors(heads, kv_heads, dim, dtype, layout, block, tiles):
    """The prefix-prefill kernel that loads K and V tiles through tensor descriptors (TMA on Hopper)
    equals the reference, whole blocks per tile or tiles within a block; the memory past each
    context holds NaN (zeroed before use, never reaching the output)."""
    batch = make_batch(*MIXED, heads, kv_heads, dim, block, dtype, layout)
    poison(batch, block)
    check(context_attention, context_attention_ref, batch, dtype, launch_config={**tiles, "TMA": True})


def poison(batch, block):
    """NaN in every cache row past each request's context, within its slot's blocks and the gap after."""
    for c in (batch["k_cache"], batch["v_cache"]):
        for start, seq in zip(batch["kv_start_block"].tolist(), batch["seq_lens"].tolist()):
            last, within = start + seq // block, seq % block
            c[last, :, within:] = float("nan")
            c[last + 1:last + 2] = float("nan")


def test_tensor_descriptor_kernel_refuses_what_it_cannot_read():
    batch = make_batch(*MIXED, 4, 1, 64, 48, torch.float32, "packed")  # a block of 48 straddles 32-key tiles
    with pytest.raises(ValueError, match="block size 48"):
        context_attention(out=torch.empty_like(batch["q"]), **batch, launch_config={"BLOCK_N": 32, "TMA": True})
    batch = make_batch(*MIXED, 4, 1, 64, 16, torch.float32, "vllm_cpu")  # keys stored [D, B]
    with pytest.raises(ValueError, match="head dimension of the cache must be contiguous"):
        context_attention(out=torch.empty_like(batch["q"]), **batch, launch_config={"TMA": True})


def test_benchmark_torch_flash_baseline_solves_the_same_problem():
    """benchmarks/kernels.py times torch's SDPA (flash on GPUs) on the same data laid out contiguously per
    request, new tokens causal after the prefix: with the math backend it equals the SDPA reference."""
    import importlib.util
    from pathlib import Path

    from torch.nn.attention import SDPBackend

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("kernels_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for batch, prefix, chunk in [(2, 40, 9), (3, 0, 16), (1, 17, 1)]:
        inp = bench.make_inputs(batch, prefix, chunk, heads=4, kv_heads=1, dim=64, dtype=torch.float32)
        ref, got = torch.zeros_like(inp["q"]), torch.full_like(inp["q"], float("nan"))
        bench.reference(inp, ref)()
        bench.torch_sdpa(inp, got, SDPBackend.MATH)[1]()
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_tensor_descriptor_kernel_with_a_sliding_window():
    batch = make_batch(*MIXED, 4, 2, 64, 16, torch.float32, "packed")
    batch["kv_start_block"] = batch["kv_start_block"].long()  # as VTENSOR may pass them
    poison(batch, 16)
    check(context_attention, context_attention_ref, batch, torch.float32, sliding_window=24,
          launch_config={"BLOCK_M": 16, "BLOCK_N": 16, "TMA": True})
