"""Kernel benchmark: vTensor prefix-prefill / decode vs vLLM's Triton kernels on identical inputs.

    python benchmarks/kernels.py                          # CPU: correctness sweep only (interpreter)
    python benchmarks/vllm_kernels.py --copy /tmp/vk      # where vLLM is installed: copy its kernel files
    python benchmarks/kernels.py --vllm-src /tmp/vk       # CUDA: timings vs vLLM's kernels
    python benchmarks/kernels.py --roof                   # CUDA: the goal shapes vs the card's roofs and torch flash

On a CUDA GPU it times ``context_attention`` (chunks > 1) against vLLM 0.32's
``context_attention_fwd`` (prefix_prefill.py: new tokens' K/V passed apart,
the prefix read through a block table from its paged ``[blocks, H, D/x, B, x]``
/ ``[blocks, H, D, B]`` caches) and both of ours against ``unified_attention``
(triton_unified_attention.py, chunked prefill and decode, ``[blocks, B, H, D]``
through a block table).  Same lengths and values everywhere; vLLM's block tables
list each request's consecutive blocks.  Outputs are checked against the SDPA
reference before timing.  Decode cases are also timed replayed from a CUDA graph
(``graph x``), as vLLM runs decode on GPUs: eager timings of a ~10 us kernel
include the host's launch overhead.  ``--vllm-src`` is a folder holding vLLM's kernel files
(see benchmarks/vllm_kernels.py; no vLLM install needed); without it, an
installed vLLM is used if there is one, else only ours is timed.

On CPU (no timing: the interpreter's speed means nothing) it runs the
correctness sweep, vLLM's kernels included when they can be loaded.
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
from vllm_vtensor.kernels.reference import context_attention_ref  # noqa: E402

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


def ours(inp, out, launch_config=None):
    kw = {k: inp[k] for k in ("q", "k_cache", "v_cache", "seq_lens", "kv_start_block", "scale")}
    kw["launch_config"] = launch_config
    if inp["chunk"] == 1:
        return lambda: decode_attention(out=out, **kw, max_seq_len=inp["seq"])
    return lambda: context_attention(out=out, query_start_loc=inp["query_start_loc"], max_query_len=inp["chunk"], **kw)


def reference(inp, out):
    kw = {k: inp[k] for k in ("q", "k_cache", "v_cache", "seq_lens", "kv_start_block", "scale", "query_start_loc")}
    return lambda: context_attention_ref(out=out, **kw)


def vllm_unified(unified_attention, inp, out):
    """vLLM's ``unified_attention`` on the same data, through its block table.

    It serves both chunked prefill (``max_seqlen_q`` = chunk) and decode; its cache layout is
    ``[blocks, B, H, D]``, a transposed view of ours (same memory).
    """
    return lambda: unified_attention(
        q=inp["q"], k=inp["k_cache"].transpose(1, 2), v=inp["v_cache"].transpose(1, 2), out=out,
        cu_seqlens_q=inp["query_start_loc"], max_seqlen_q=inp["chunk"], seqused_k=inp["seq_lens"],
        max_seqlen_k=inp["seq"], softmax_scale=inp["scale"], causal=True, window_size=(-1, -1),
        block_table=inp["block_table"], softcap=0, q_descale=None, k_descale=None, v_descale=None)


def paged_inputs(inp):
    """``context_attention_fwd``'s inputs for the same data: the new tokens' K/V as ``[T, H, D]`` and the
    cache in its paged layouts, K ``[blocks, H, D/x, B, x]`` (x = 16 bytes of elements), V ``[blocks, H, D, B]``."""
    k, v = inp["k_cache"], inp["v_cache"]
    blocks, heads, block, dim = k.shape
    x = 16 // k.element_size()
    new_k, new_v = [], []
    for r in range(len(inp["seq_lens"])):
        seq = int(inp["seq_lens"][r])
        n = int(inp["query_start_loc"][r + 1] - inp["query_start_loc"][r])
        t = torch.arange(seq - n, seq, device=k.device)
        b = int(inp["kv_start_block"][r]) + t // block
        new_k.append(k[b, :, t % block])
        new_v.append(v[b, :, t % block])
    return dict(
        k=torch.cat(new_k), v=torch.cat(new_v),
        k_cache=k.view(blocks, heads, block, dim // x, x).permute(0, 1, 3, 2, 4).contiguous(),
        v_cache=v.permute(0, 1, 3, 2).contiguous(),
    )


def vllm_prefix_prefill(context_attention_fwd, inp, out):
    """vLLM's ``context_attention_fwd`` on the same data (prefix from its paged cache, new K/V apart)."""
    paged = paged_inputs(inp)
    one = torch.ones(1, dtype=torch.float32, device=inp["q"].device)
    return lambda: context_attention_fwd(
        q=inp["q"], k=paged["k"], v=paged["v"], o=out, kv_cache_dtype="auto", k_cache=paged["k_cache"],
        v_cache=paged["v_cache"], b_loc=inp["block_table"], b_start_loc=inp["query_start_loc"],
        b_seq_len=inp["seq_lens"], max_seq_len=inp["seq"], max_input_len=inp["chunk"], k_scale=one, v_scale=one,
        sm_scale=inp["scale"])


def vllm_runs(kernels, chunk):
    """(name, make(inp, out)) for each of vLLM's kernels that serves this chunk size: context_attention_fwd
    for chunked prefill (chunk > 1), unified_attention always."""
    if not kernels:
        return []
    context_attention_fwd, unified_attention = kernels
    runs = [("prefix_prefill", lambda i, o: vllm_prefix_prefill(context_attention_fwd, i, o))] if chunk > 1 else []
    return runs + [("unified", lambda i, o: vllm_unified(unified_attention, i, o))]


def load_vllm(src):
    """vLLM's kernels from ``src`` (see vllm_kernels.py), else from the installed vLLM's files, else None."""
    sys.path.insert(0, str(Path(__file__).parent))
    import vllm_kernels

    try:
        return vllm_kernels.load(src)
    except FileNotFoundError as e:
        raise SystemExit(f"--vllm-src: {e}") from None
    except ImportError as e:
        print(f"vLLM's kernels are not available ({e}): pass --vllm-src; timing ours only")
        return None


def bench(fn) -> float:
    """Milliseconds per call (Triton's do_bench: warm-up, L2 flushed between calls, median)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def bench_graph(fn) -> float:
    """Milliseconds per call replayed from a CUDA graph, as vLLM runs decode: the host's launch
    overhead (Python, allocations, several launches) leaves the measurement; L2 still flushed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


# Tile/launch configurations tried on a GPU for ours (the launchers' defaults are timed as well).
CONTEXT_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
]
# Hopper: K/V tiles through tensor descriptors (TMA), deeper pipelines
TMA_CONFIGS = [
    {"TMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"TMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"TMA": True, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"TMA": True, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
    {"TMA": True, "BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
]
DECODE_CONFIGS = [
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 256, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_N": 32, "num_warps": 2, "num_stages": 4},
]


def contiguous_kv(inp):
    """The same K and V laid out as ``[batch, Hkv, seq, D]`` per request (what torch's SDPA reads);
    requests are consecutive blocks in ``make_inputs``."""
    k, v, batch = inp["k_cache"], inp["v_cache"], len(inp["seq_lens"])
    blocks, heads, block, dim = k.shape
    per = blocks // batch
    lay = lambda c: c.view(batch, per, heads, block, dim).permute(0, 2, 1, 3, 4).reshape(batch, heads, per * block, dim)
    return lay(k)[:, :, :inp["seq"]].contiguous(), lay(v)[:, :, :inp["seq"]].contiguous()


def torch_sdpa(inp, out, backend=None):
    """torch's ``scaled_dot_product_attention`` on the same problem, K/V contiguous per request, the new
    tokens causal to the bottom right (after the prefix), GQA native (``enable_gqa``); ``backend``: an
    ``SDPBackend`` (FLASH_ATTENTION on GPUs: FA2 inside torch). Returns the timed call (no copy-out) and
    one that also writes ``out`` for the check."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    batch, chunk, seq = len(inp["seq_lens"]), inp["chunk"], inp["seq"]
    heads, dim = inp["q"].shape[1:]
    q = inp["q"].view(batch, chunk, heads, dim).transpose(1, 2).contiguous()
    k, v = contiguous_kv(inp)
    mask = causal_lower_right(chunk, seq)
    backend = backend or SDPBackend.FLASH_ATTENTION

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=inp["scale"], enable_gqa=True)

    def run_into_out():
        out.copy_(run().transpose(1, 2).reshape(out.shape))
    return run, run_into_out


def roofs() -> dict:
    """What this card reaches, measured in the same run: a bf16 matmul (TFLOP/s) and a device copy (TB/s,
    bytes read + written)."""
    n = 8192
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    mm = bench(lambda: a @ b)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    cp = bench(lambda: y.copy_(x))
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"matmul_bf16_tflops": 2 * n ** 3 / mm / 1e9, "copy_tbps": 2 * (1 << 30) / cp / 1e9}


# The goal's shapes: bf16, head dim 128, GQA 4 (32 query heads, 8 KV heads), batch 8, prefixes 4k-16k,
# chunks 512-2048; decode at batch 64 / 4k context, replayed from a CUDA graph.
ROOF_PREFILL = [(8, 4096, 512), (8, 4096, 2048), (8, 16384, 2048)]
ROOF_DECODE = (64, 4096)
ROOF_DECODE_CONFIGS = [None, {"BLOCK_N": 32, "num_warps": 2, "num_stages": 4},
                       {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4}, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}]


def roof_run(result: dict, out_path: Path, tol=3e-2) -> None:
    """Ours against the card's roofs and torch's flash attention, with fp8 KV decode; ``summary`` holds
    the figures the kernels' goals name. The JSON is rewritten after each step (partial results survive)."""
    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))

    result["roofs"] = roof = roofs()
    print(f"roofs: bf16 matmul {roof['matmul_bf16_tflops']:.0f} TFLOP/s, device copy {roof['copy_tbps']:.2f} TB/s",
          flush=True)
    save()
    rows = result["prefill"] = []
    print(f"{'batch':>6}{'prefix':>7}{'chunk':>6}{'config':>58}{'ms':>9}{'TFLOP/s':>9}{'of matmul':>10}")
    for batch, prefix, chunk in ROOF_PREFILL:
        inp = make_inputs(batch, prefix, chunk)
        ref = torch.empty_like(inp["q"])
        reference(inp, ref)()
        fl = flops(batch, prefix, chunk, 32, 128)
        row = {"batch": batch, "prefix": prefix, "chunk": chunk, "runs": []}
        got = torch.empty_like(ref)
        cands = [("ours default", ours(inp, got), got)] + [(f"ours {c}", ours(inp, got, c), got)
                                                            for c in TMA_CONFIGS + CONTEXT_CONFIGS[2:4]]
        try:
            flash, flash_check = torch_sdpa(inp, got)
            cands.append(("torch flash (FA2)", flash_check, got))
        except Exception as e:
            row["torch_flash_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        for name, check_fn, out in cands:
            run = {"name": name}
            try:
                out.fill_(float("nan"))
                check_fn()
                run["max_abs_err"] = max_err(out, ref)
                if not run["max_abs_err"] <= tol:
                    run["mismatch"] = True
                else:
                    run["ms"] = bench(flash if name.startswith("torch") else check_fn)
                    run["tflops"] = fl / run["ms"] / 1e9
                    run["of_matmul"] = run["tflops"] / roof["matmul_bf16_tflops"]
            except Exception as e:
                run["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["runs"].append(run)
            cell = f"{run['ms']:>9.3f}{run['tflops']:>9.0f}{run['of_matmul']:>10.2f}" if "ms" in run else \
                f"  {run.get('error', 'MISMATCH')[:60]}"
            print(f"{batch:>6}{prefix:>7}{chunk:>6}{name[:58]:>58}{cell}", flush=True)
        mine = [r for r in row["runs"] if r["name"].startswith("ours") and "ms" in r]
        theirs = next((r for r in row["runs"] if r["name"].startswith("torch") and "ms" in r), None)
        if mine:
            best = min(mine, key=lambda r: r["ms"])
            row["ours_best"] = best
            if theirs:
                row["vs_torch_flash"] = theirs["ms"] / best["ms"]
        rows.append(row)
        save()
        del inp, ref, got
        torch.cuda.empty_cache()

    batch, seq = ROOF_DECODE
    dec = result["decode"] = {"batch": batch, "context": seq, "runs": []}
    inp = make_inputs(batch, seq - 1, 1)
    kv_bytes = 2 * batch * seq * 8 * 128 * 2  # K and V, bf16
    for kv in ("bf16", "fp8_e4m3"):
        case = dict(inp)
        if kv != "bf16":
            case["k_cache"], case["v_cache"] = (c.to(torch.float8_e4m3fn) for c in (inp["k_cache"], inp["v_cache"]))
        ref = torch.empty_like(inp["q"])
        deq = {**case, "k_cache": case["k_cache"].to(torch.bfloat16), "v_cache": case["v_cache"].to(torch.bfloat16)}
        reference(deq, ref)()
        got = torch.empty_like(ref)
        for cfg in ROOF_DECODE_CONFIGS:
            run = {"kv": kv, "config": cfg or "default"}
            try:
                fn = ours(case, got, cfg)
                got.fill_(float("nan"))
                fn()
                run["max_abs_err"] = max_err(got, ref)
                if run["max_abs_err"] <= tol:
                    run["graph_ms"] = bench_graph(fn)
                    bytes_read = kv_bytes // (2 if kv != "bf16" else 1)
                    run["tbps"] = bytes_read / run["graph_ms"] / 1e9
                    run["of_copy"] = run["tbps"] / roof["copy_tbps"]
                else:
                    run["mismatch"] = True
            except Exception as e:
                run["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            dec["runs"].append(run)
            cell = f"{run['graph_ms'] * 1e3:>8.1f} us {run['tbps']:>6.2f} TB/s ({run['of_copy']:.2f} of copy)" \
                if "graph_ms" in run else run.get("error", "MISMATCH")[:80]
            print(f"decode b{batch} ctx {seq} {kv:>9} {str(cfg or 'default'):>52}: {cell}", flush=True)
        save()
    best = {kv: min((r for r in dec["runs"] if r["kv"] == kv and "graph_ms" in r), key=lambda r: r["graph_ms"],
                    default=None) for kv in ("bf16", "fp8_e4m3")}
    dec["best"] = best
    tf = [r["ours_best"]["tflops"] for r in rows if "ours_best" in r]
    vs = [r["vs_torch_flash"] for r in rows if "vs_torch_flash" in r]
    result["summary"] = {
        "prefill_tflops_best": max(tf, default=None),
        "prefill_vs_torch_flash": min(vs, default=None),  # the worst case over the goal's shapes
        "decode_tbps_b64_4k": best["bf16"] and best["bf16"]["tbps"],
        "fp8_decode_speedup": best["bf16"] and best["fp8_e4m3"] and best["bf16"]["graph_ms"] / best["fp8_e4m3"]["graph_ms"],
        "matmul_bf16_tflops": roof["matmul_bf16_tflops"], "copy_tbps": roof["copy_tbps"],
    }
    save()
    print("summary:", json.dumps(result["summary"]))
    plot_roof(result, out_path.with_suffix(".png"))


def plot_roof(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, ours_best, flash = [], [], []
    for r in result["prefill"]:
        labels.append(f"b{r['batch']} p{r['prefix'] // 1024}k c{r['chunk']}")
        ours_best.append(r.get("ours_best", {}).get("tflops", 0))
        flash.append(next((x["tflops"] for x in r["runs"] if x["name"].startswith("torch") and "tflops" in x), 0))
    x = range(len(labels))
    a.bar([i - 0.2 for i in x], ours_best, 0.4, label="ours (best config)")
    a.bar([i + 0.2 for i in x], flash, 0.4, label="torch flash (FA2)")
    a.axhline(result["roofs"]["matmul_bf16_tflops"], color="k", ls="--", label="bf16 matmul")
    a.set_xticks(list(x), labels)
    a.set_ylabel("TFLOP/s")
    a.set_title("prefix-prefill, bf16, D 128, GQA 4")
    a.legend()
    runs = [r for r in result["decode"]["runs"] if "tbps" in r]
    b.bar(range(len(runs)), [r["tbps"] for r in runs], color=["C0" if r["kv"] == "bf16" else "C2" for r in runs])
    b.axhline(result["roofs"]["copy_tbps"], color="k", ls="--", label="device copy")
    b.set_xticks(range(len(runs)), [f"{r['kv']}\n{r['config'] if isinstance(r['config'], str) else r['config'].get('BLOCK_N')}"
                                    for r in runs], fontsize=7)
    b.set_ylabel("effective TB/s (KV bytes / time)")
    b.set_title(f"decode b{result['decode']['batch']} ctx {result['decode']['context']}, CUDA graph")
    b.legend()
    fig.suptitle(f"{result.get('card', '')} - benchmarks/kernels.py --roof")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def max_err(got, ref) -> float:
    return (got.float() - ref.float()).abs().max().item()


def time_case(batch, prefix, chunk, kernels, tune: bool, tol=3e-2) -> dict:
    """One GPU case: ours (default launch, then each tuning config) and vLLM's kernels, each checked
    against the SDPA reference first; a kernel whose output differs is reported, not timed."""
    inp = make_inputs(batch, prefix, chunk)
    ref = torch.empty_like(inp["q"])
    reference(inp, ref)()
    row = {"batch": batch, "prefix": prefix, "chunk": chunk}
    fl = flops(batch, prefix, chunk, 32, 128)

    def timed(name, fn, out):
        out.fill_(float("nan"))
        fn()
        err = max_err(out, ref)
        row[f"{name}_max_abs_err"] = err
        if not err <= tol:
            row[f"{name}_mismatch"] = True
            return None
        row[f"{name}_ms"] = bench(fn)
        if chunk == 1 and name != "candidate":  # decode: also as replayed from a CUDA graph
            try:
                row[f"{name}_graph_ms"] = bench_graph(fn)
            except Exception as e:
                row[f"{name}_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return row[f"{name}_ms"]

    mine = torch.empty_like(inp["q"])
    timed("ours", ours(inp, mine), mine)
    if tune:
        tried = []
        hopper = torch.cuda.get_device_capability()[0] >= 9
        for cfg in (CONTEXT_CONFIGS + (TMA_CONFIGS if hopper else [])) if chunk > 1 else DECODE_CONFIGS:
            try:
                ms = timed("candidate", ours(inp, mine, cfg), mine)
            except Exception as e:  # e.g. out of shared memory for a big tile on this card
                tried.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            tried.append({"config": cfg, "ms": ms, "max_abs_err": row.pop("candidate_max_abs_err")})
            row.pop("candidate_ms", None), row.pop("candidate_mismatch", None)
        row["ours_configs"] = tried
        if "ours_ms" in row:  # the launcher's own default competes too
            from vllm_vtensor.kernels import attention

            q = inp["q"]
            chosen = (attention._context_defaults(batch, q.shape[1], chunk, q.dtype, q.device) if chunk > 1
                      else attention._decode_defaults(batch, inp["k_cache"].shape[1], q.device))
            tried.append({"config": "default " + str(chosen), "ms": row["ours_ms"]})
        ok = [t for t in tried if t.get("ms") is not None]
        if ok:
            best = min(ok, key=lambda t: t["ms"])
            row["ours_best_ms"], row["ours_best_config"] = best["ms"], best["config"]
    for key in ("ours", "ours_best"):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = fl / row[f"{key}_ms"] / 1e9
    for name, make in vllm_runs(kernels, chunk):
        theirs = torch.empty_like(mine)
        if timed(name, make(inp, theirs), theirs) is not None:
            row[f"{name}_tflops"] = fl / row[f"{name}_ms"] / 1e9
            for mine_key, label in (("ours_ms", ""), ("ours_best_ms", "best_")):
                if mine_key in row:
                    row[f"{label}speedup_vs_{name}"] = row[f"{name}_ms"] / row[mine_key]
            if "ours_graph_ms" in row and f"{name}_graph_ms" in row:
                row[f"graph_speedup_vs_{name}"] = row[f"{name}_graph_ms"] / row["ours_graph_ms"]
    del inp, ref, mine
    torch.cuda.empty_cache()
    return row


def correctness_sweep(kernels) -> list[dict]:
    """Max abs error of ours, and of vLLM's kernels when loaded, against the SDPA reference (fp32 for
    vLLM's: the interpreter computes bf16 wrongly, and its kernels do not cast for it as ours do)."""
    rows = []
    for batch, prefix, chunk in [(1, 0, 33), (2, 17, 16), (3, 40, 1), (2, 100, 1), (4, 5, 9)]:
        for dtype in (torch.float32, torch.bfloat16):
            inp = make_inputs(batch, prefix, chunk, heads=4, kv_heads=1, dim=64, dtype=dtype)
            ref = torch.zeros_like(inp["q"])
            reference(inp, ref)()
            row = {"batch": batch, "prefix": prefix, "chunk": chunk, "dtype": str(dtype).split(".")[-1]}
            runs = [("ours", ours)]
            if dtype == torch.float32:
                runs += [(f"vllm_{name}", make) for name, make in vllm_runs(kernels, chunk)]
            for name, make in runs:
                got = torch.zeros_like(inp["q"])
                make(inp, got)()
                row[f"{name}_max_abs_err"] = (got.float() - ref.float()).abs().max().item()
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-src", help="folder containing the vllm package source (GPU comparison)")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="GPU: two cases only (a smoke run)")
    p.add_argument("--no-tune", action="store_true", help="GPU: time the launchers' default tiles only")
    p.add_argument("--decode-only", action="store_true", help="GPU: the decode cases only")
    p.add_argument("--roof", action="store_true",
                   help="GPU: the goal's shapes against the card's roofs (bf16 matmul, device copy) and torch's "
                        "flash attention, fp8 KV decode; writes a summary and a PNG")
    args = p.parse_args(argv)
    out_path = Path(args.out or Path(__file__).parent / "results" / f"kernels-{DEVICE}.json")
    from provenance import provenance

    result = {**provenance("kernels.py", argv), "device": DEVICE}

    kernels = load_vllm(args.vllm_src)
    if not ON_GPU:
        print("No CUDA GPU: timing needs one; running the correctness sweep under the Triton interpreter.")
        rows = correctness_sweep(kernels)
        cols = ["ours", "vllm_unified", "vllm_prefix_prefill"]
        print(f"{'batch':>6}{'prefix':>8}{'chunk':>7}{'dtype':>10}" + "".join(f"{c + ' err':>24}" for c in cols))
        for r in rows:
            errs = "".join(f"{r[c + '_max_abs_err']:>24.2e}" if c + "_max_abs_err" in r else f"{'-':>24}" for c in cols)
            print(f"{r['batch']:>6}{r['prefix']:>8}{r['chunk']:>7}{r['dtype']:>10}" + errs)
        result["correctness"] = rows
    else:
        result["card"] = torch.cuda.get_device_name()
        result["triton"] = __import__("triton").__version__
        result["torch"] = torch.__version__
        if args.roof:
            roof_run(result, out_path)
            print(f"wrote {out_path}")
            return 0
        rows = result["timings"] = []
        cases = [(b, p, c) for b in (1, 8, 64) for p, c in ((0, 2048), (4096, 512), (16384, 128), (4096, 1))]
        if args.quick:
            cases = [(8, 4096, 512), (64, 4096, 1)]
        if args.decode_only:
            cases = [c for c in cases if c[2] == 1]
        print(f"{'batch':>6}{'prefix':>7}{'chunk':>6}{'ours ms':>9}{'best ms':>9}{'TFLOP/s':>9}"
              f"{'prefill ms':>11}{'speedup':>9}{'unified ms':>11}{'speedup':>9}{'graph x':>9}"
              "   (speedups: vLLM ms / our best ms; graph x: the same, decode replayed from CUDA graphs)")
        for batch, prefix, chunk in cases:
            try:
                row = time_case(batch, prefix, chunk, kernels, tune=not args.no_tune)
            except Exception as e:  # keep the other cases' numbers
                row = {"batch": batch, "prefix": prefix, "chunk": chunk, "error": f"{type(e).__name__}: {e}"}
                print(f"{batch:>6}{prefix:>7}{chunk:>6}  failed: {row['error'][:300]}", flush=True)
                torch.cuda.empty_cache()
            else:
                cell = lambda k, f: format(row[k], f) if k in row else ("MISMATCH" if k.endswith("_ms") and
                                                                        k[:-3] + "_mismatch" in row else "-")
                sp = lambda n: cell(f"best_speedup_vs_{n}" if f"best_speedup_vs_{n}" in row else f"speedup_vs_{n}", ".2f")
                print(f"{batch:>6}{prefix:>7}{chunk:>6}{cell('ours_ms', '.3f'):>9}{cell('ours_best_ms', '.3f'):>9}"
                      f"{cell('ours_best_tflops' if 'ours_best_tflops' in row else 'ours_tflops', '.1f'):>9}{cell('prefix_prefill_ms', '.3f'):>11}{sp('prefix_prefill'):>9}"
                      f"{cell('unified_ms', '.3f'):>11}{sp('unified'):>9}"
                      f"{cell('graph_speedup_vs_unified', '.2f'):>9}", flush=True)
            rows.append(row)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=2))  # partial results survive a timeout
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
