"""Kernel benchmark: vTensor prefix-prefill / decode vs vLLM's Triton kernels on identical inputs.

    python benchmarks/kernels.py                          # CPU: correctness sweep only (interpreter)
    python benchmarks/kernels.py --vllm-src /path/to/src  # CUDA: timings vs vLLM's kernels

On a CUDA GPU it times ``context_attention`` (chunks > 1) and
``decode_attention`` (chunk 1) against vLLM 0.32's ``unified_attention``
(triton_unified_attention.py), same lengths and data: vLLM's kernel reads the
same KV through a block table whose rows are the requests' consecutive blocks.
(A comparison with ``context_attention_fwd`` is not written yet: it takes the
new tokens' K/V apart from a differently laid out paged cache.)  The GPU path
has not been run yet; no GPU numbers are committed.  ``--vllm-src`` is a folder holding the ``vllm``
package source (a checkout, or the installed package copied over); without it
only the SDPA reference is timed.  Outputs are compared before timing.
Prints a table and writes JSON to benchmarks/results/kernels-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_vtensor.kernels.attention import context_attention, decode_attention  # noqa: E402
from vllm_vtensor.kernels.reference import context_attention_ref, decode_attention_ref  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def make_inputs(batch, prefix, chunk, heads=32, kv_heads=8, dim=128, block=16, dtype=torch.bfloat16, seed=0):
    """Each request's KV is consecutive blocks (its slot); q holds ``chunk`` new tokens per request."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    seq = prefix + chunk
    per_req = -(-seq // block)
    blocks = batch * per_req
    k = torch.randn(blocks, kv_heads, block, dim, generator=g, device=DEVICE, dtype=dtype)
    v = torch.randn(blocks, kv_heads, block, dim, generator=g, device=DEVICE, dtype=dtype)
    q = torch.randn(batch * chunk, heads, dim, generator=g, device=DEVICE, dtype=dtype)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return dict(
        q=q, k_cache=k, v_cache=v,
        query_start_loc=torch.arange(0, batch * chunk + 1, chunk, **i32),
        seq_lens=torch.full((batch,), seq, **i32),
        kv_start_block=torch.arange(0, blocks, per_req, **i32),
        block_table=torch.arange(blocks, **i32).view(batch, per_req),
        scale=dim ** -0.5, chunk=chunk, seq=seq,
    )


def flops(batch, prefix, chunk, heads, dim):
    # QK^T and PV over the causal region: new tokens see the prefix plus the earlier new tokens
    pairs = batch * (chunk * prefix + chunk * (chunk + 1) / 2)
    return 4 * pairs * heads * dim


def ours(inp, out):
    kw = {k: inp[k] for k in ("q", "k_cache", "v_cache", "seq_lens", "kv_start_block", "scale")}
    if inp["chunk"] == 1:
        return lambda: decode_attention(out=out, **kw, max_seq_len=inp["seq"])
    return lambda: context_attention(out=out, query_start_loc=inp["query_start_loc"], max_query_len=inp["chunk"], **kw)


def reference(inp, out):
    kw = {k: inp[k] for k in ("q", "k_cache", "v_cache", "seq_lens", "kv_start_block", "scale", "query_start_loc")}
    return lambda: context_attention_ref(out=out, **kw)


def vllm_kernel(inp, out):
    """vLLM's ``unified_attention`` on the same data, through its block table (needs --vllm-src on a GPU).

    It serves both chunked prefill (``max_seqlen_q`` = chunk) and decode; its cache layout is
    ``[blocks, B, H, D]``, a transposed view of ours (same memory).
    """
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    return lambda: unified_attention(
        q=inp["q"], k=inp["k_cache"].transpose(1, 2), v=inp["v_cache"].transpose(1, 2), out=out,
        cu_seqlens_q=inp["query_start_loc"], max_seqlen_q=inp["chunk"], seqused_k=inp["seq_lens"],
        max_seqlen_k=inp["seq"], softmax_scale=inp["scale"], causal=True, window_size=(-1, -1),
        block_table=inp["block_table"], softcap=0, q_descale=None, k_descale=None, v_descale=None)


def bench(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def correctness_sweep() -> list[dict]:
    rows = []
    for batch, prefix, chunk in [(1, 0, 33), (2, 17, 16), (3, 40, 1), (2, 100, 1), (4, 5, 9)]:
        for dtype in (torch.float32, torch.bfloat16):
            inp = make_inputs(batch, prefix, chunk, heads=4, kv_heads=1, dim=64, dtype=dtype)
            a, b = torch.zeros_like(inp["q"]), torch.zeros_like(inp["q"])
            ours(inp, a)()
            reference(inp, b)()
            err = (a.float() - b.float()).abs().max().item()
            rows.append({"batch": batch, "prefix": prefix, "chunk": chunk, "dtype": str(dtype).split(".")[-1],
                         "max_abs_err": err})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-src", help="folder containing the vllm package source (GPU comparison)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out_path = Path(args.out or Path(__file__).parent / "results" / f"kernels-{DEVICE}.json")
    result = {"command": "python benchmarks/kernels.py " + " ".join(argv or sys.argv[1:]), "device": DEVICE}

    if not ON_GPU:
        print("No CUDA GPU: timing needs one; running the correctness sweep under the Triton interpreter.")
        rows = correctness_sweep()
        print(f"{'batch':>6}{'prefix':>8}{'chunk':>7}{'dtype':>10}{'max abs err':>14}")
        for r in rows:
            print(f"{r['batch']:>6}{r['prefix']:>8}{r['chunk']:>7}{r['dtype']:>10}{r['max_abs_err']:>14.2e}")
        result["correctness"] = rows
    else:
        if args.vllm_src:
            sys.path.insert(0, args.vllm_src)
        result["card"] = torch.cuda.get_device_name()
        rows = []
        cases = [(b, p, c) for b in (1, 8, 64) for p, c in ((0, 2048), (4096, 512), (16384, 128), (4096, 1))]
        for batch, prefix, chunk in cases:
            inp = make_inputs(batch, prefix, chunk)
            mine, ref = torch.empty_like(inp["q"]), torch.empty_like(inp["q"])
            ours(inp, mine)()
            reference(inp, ref)()
            torch.testing.assert_close(mine.float(), ref.float(), atol=3e-2, rtol=3e-2)
            row = {"batch": batch, "prefix": prefix, "chunk": chunk, "ours_ms": bench(ours(inp, mine))}
            row["ours_tflops"] = flops(batch, prefix, chunk, 32, 128) / row["ours_ms"] / 1e9
            if args.vllm_src:
                theirs = torch.empty_like(mine)
                vllm_kernel(inp, theirs)()
                torch.testing.assert_close(theirs.float(), ref.float(), atol=3e-2, rtol=3e-2)
                row["vllm_ms"] = bench(vllm_kernel(inp, theirs))
                row["speedup"] = row["vllm_ms"] / row["ours_ms"]
            rows.append(row)
            print(row)
        result["timings"] = rows
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
