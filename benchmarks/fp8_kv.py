"""fp8 KV caches with VTENSOR on CPU: KV bytes per token, and how far greedy tokens stay with full precision.

    python benchmarks/fp8_kv.py                       # SmolLM2-135M-Instruct (real weights), float32, ~3 min
    python benchmarks/fp8_kv.py --model PATH --quick  # fewer prompts and tokens

Engines, one after another in one run, float32 model, the same prompts and greedy sampling:

* ``vanilla``: vLLM's CPU backend, KV in float32 (full precision: what the others are compared with);
* ``vtensor``: VTENSOR, float32 KV;
* ``vtensor_fp8`` / ``vtensor_fp8_e5m2``: VTENSOR, fp8 KV (e4m3 / e5m2), written and read by VTENSOR's
  own attention path (``VTENSOR_ATTENTION=reference``: torch attention reading fp8, upcast) - any CPU;
* ``vanilla_fp8`` and ``vtensor_fp8_vllm_kernel``: fp8 KV through vLLM's CPU kernel, vanilla and over
  VTENSOR's memory - only on x86 CPUs with AVX-512 or AMX (vLLM's CPU kernel refuses fp8 on others).

Agreement with ``vanilla``: the share of prompts whose tokens are identical, the mean share of each
answer before the first different token, and vLLM's own test for quantized models
(``check_logprobs_close``: where two answers first differ, each one's token is among the other's
top-5 candidates). KV scales are 1.0 (the model has none; vLLM's default).
Prints a table, writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "The capital of France is",
    "Write a haiku about memory.",
    "def fibonacci(n):",
    "Explain what a KV cache is in one sentence.",
    "List three uses of a hash table:",
    "Translate to French: The weather is nice today.",
    "What is 17 times 23? Answer:",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "A short poem about the sea:",
    "import numpy as np\n# compute the mean of a list",
    "Q: Why is the sky blue?\nA:",
]

# name -> (engine keyword arguments, $VTENSOR_ATTENTION)
ENGINES = {
    "vanilla": ({}, None),
    "vtensor": ({"attention_backend": "VTENSOR"}, None),
    "vtensor_fp8": ({"attention_backend": "VTENSOR", "kv_cache_dtype": "fp8"}, "reference"),
    "vtensor_fp8_e5m2": ({"attention_backend": "VTENSOR", "kv_cache_dtype": "fp8_e5m2"}, "reference"),
    "vanilla_fp8": ({"kv_cache_dtype": "fp8"}, None),
    "vtensor_fp8_vllm_kernel": ({"attention_backend": "VTENSOR", "kv_cache_dtype": "fp8"}, "cpu"),
}
NEEDS_CPU_FP8 = ("vanilla_fp8", "vtensor_fp8_vllm_kernel")  # vLLM's CPU kernel with fp8 KV: AVX-512 or AMX
TOP_K = 5


def _settled(path: Path, timeout: float = 20.0) -> dict:
    """VTENSOR's figures once finished requests are cleared and freed memory given back (1 s linger)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = json.loads(path.read_text())
        if (stats["running_requests"] == 0 and stats["lingering_bytes"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def run_engine(name: str, model: str, prompts: list, max_tokens: int, stats_dir: Path, kv_bytes: int) -> dict:
    """Greedy answers with each step's top-5 logprobs, the time taken, and the KV bytes per token."""
    import gc

    from vllm import LLM, SamplingParams

    kw, attention = ENGINES[name]
    stats = stats_dir / f"stats-{name}.json"
    env = {"VTENSOR_STATS_FILE": str(stats), "VTENSOR_ATTENTION": attention}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():  # the engine's processes inherit them at spawn
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        llm = LLM(model=model, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=kv_bytes, **kw)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=TOP_K)
        t0 = time.perf_counter()
        out = llm.generate(prompts, sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        cfg = llm.llm_engine.vllm_config
        m = cfg.model_config
        element = 1 if "kv_cache_dtype" in kw else 4
        result = {
            "tokens": [list(o.outputs[0].token_ids) for o in out],
            "top": [[sorted(step, key=lambda t: -step[t].logprob)[:TOP_K] for step in o.outputs[0].logprobs]
                    for o in out],
            "seconds": round(seconds, 2),
            "tokens_per_s": round(sum(len(o.outputs[0].token_ids) for o in out) / seconds, 1),
            "kv_cache_dtype": kw.get("kv_cache_dtype", "auto"),
            "attention": attention or ("cpu" if "attention_backend" in kw else "vLLM CPU_ATTN"),
            "kv_bytes_per_token": m.get_num_layers(cfg.parallel_config) * m.get_total_num_kv_heads()
            * m.get_head_size() * 2 * element,
        }
        if "attention_backend" in kw:
            figures = _settled(stats)
            result |= {"vtensor_kv_bytes_per_token": figures["chunk_bytes"] / figures["block_size"],
                       "peak_resident_bytes": figures["peak_resident_bytes"],
                       "mapped_bytes_after": figures["mapped_bytes"]}
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def agreement(ref: dict, other: dict) -> dict:
    """How ``other``'s greedy answers agree with ``ref``'s (see the module's docstring)."""
    same, prefix, close = 0, [], True
    for a, b, top_a, top_b in zip(ref["tokens"], other["tokens"], ref["top"], other["top"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += a == b
        prefix.append(n / max(len(a), 1))
        if n < min(len(a), len(b)) and not (a[n] in top_b[n] and b[n] in top_a[n]):
            close = False
    return {"identical_answers": f"{same}/{len(ref['tokens'])}", "identical_share": same / len(ref["tokens"]),
            "mean_share_before_first_difference": round(sum(prefix) / len(prefix), 3),
            "logprobs_close": close}


def run(model: str, engines: list[str], prompts: list, max_tokens: int, kv_bytes: int = 64 << 20) -> dict:
    """Each engine in turn; then each one's agreement with ``vanilla`` and its KV bytes against vanilla's."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in engines:
            out[name] = run_engine(name, model, prompts, max_tokens, Path(tmp), kv_bytes)
            print(f"{name}: {out[name]['seconds']} s", flush=True)
    for name, r in out.items():
        if name != "vanilla":
            r["agreement_with_vanilla"] = agreement(out["vanilla"], r)
        r["kv_bytes_vs_vanilla"] = r.get("vtensor_kv_bytes_per_token", r["kv_bytes_per_token"]) / out["vanilla"][
            "kv_bytes_per_token"]
    return out


def engines_here() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from vllm_vtensor.backend import cpu_kernel_reads_fp8

    return [n for n in ENGINES if cpu_kernel_reads_fp8() or n not in NEEDS_CPU_FP8]


def _table(results: dict) -> str:
    rows = [f"{'engine':26} {'KV dtype':9} {'attention':14} {'KV B/token':>10} {'vs vanilla':>10} "
            f"{'identical':>9} {'before 1st diff':>15} {'logprobs close':>14} {'tok/s':>7}"]
    for name, r in results.items():
        a = r.get("agreement_with_vanilla", {})
        rows.append(f"{name:26} {r['kv_cache_dtype']:9} {r['attention']:14} "
                    f"{r.get('vtensor_kv_bytes_per_token', r['kv_bytes_per_token']):>10.0f} "
                    f"{r['kv_bytes_vs_vanilla']:>10.2f} {a.get('identical_answers', '-'):>9} "
                    f"{a.get('mean_share_before_first_difference', '-'):>15} {str(a.get('logprobs_close', '-')):>14} "
                    f"{r['tokens_per_s']:>7}")
    return "\n".join(rows)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.barh(names, [results[n].get("vtensor_kv_bytes_per_token", results[n]["kv_bytes_per_token"]) / 1024
                     for n in names])
    ax1.set_xlabel("KV KiB per token (all layers)")
    ax2.barh(names, [results[n].get("agreement_with_vanilla", {}).get("mean_share_before_first_difference", 1.0)
                     for n in names])
    ax2.set_xlabel("share of each answer equal to vanilla (float32 KV)\nbefore the first difference, mean")
    ax2.set_xlim(0, 1)
    fig.suptitle("fp8 KV on CPU, SmolLM2-135M, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, built locally)")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 16 tokens")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", help="result file (default benchmarks/results/fp8_kv-cpu-{avx512|avx2}.json)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from vllm_vtensor.backend import cpu_kernel_reads_fp8
    from vllm_vtensor.models import build_smollm2

    model = args.model or str(build_smollm2())
    isa = "avx512" if cpu_kernel_reads_fp8() else "avx2"  # whether vLLM's CPU kernel can take part
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"fp8_kv-cpu-{isa}.json")
    prompts, max_tokens = (PROMPTS[:4], 16) if args.quick else (PROMPTS, args.max_tokens)
    results = run(model, engines_here(), prompts, max_tokens)
    print(_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {**provenance("fp8_kv.py"), "model": Path(model).name, "model_dtype": "float32", "prompts": len(prompts),
           "max_tokens": max_tokens, "cpu_kernel_reads_fp8": cpu_kernel_reads_fp8(),
           "engines": {n: {k: v for k, v in r.items() if k not in ("tokens", "top")} for n, r in results.items()}}
    out.write_text(json.dumps(doc, indent=1))
    _plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
