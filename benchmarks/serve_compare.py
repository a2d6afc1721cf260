"""Vanilla vLLM vs `attention_backend="VTENSOR"`, same model and workload, one run.

    python benchmarks/serve_compare.py                 # SmolLM2-135M, float32, CPU
    python benchmarks/serve_compare.py --quick         # smaller workload (smoke test)

(A) offline throughput: 32 prompts of ~100 tokens, 128 output tokens each, ``--batches``
    batches in a row per engine run (median; the first batch, which also makes the KV
    memory, is reported apart);
(B) multi-turn chat: 8 conversations x 4 turns, time to first token per turn
    (each turn's 8 requests as one batch, max_tokens=1, prefix caching on),
    the median over 3 rounds of fresh conversations;
(C) KV memory: peak resident KV bytes against the bytes the live tokens need
    (sampled from the allocator during A's first batch; vanilla preallocates its whole
    space).  Later batches are reported apart: VTENSOR then also holds the earlier
    batches' full blocks for vLLM's prefix cache until vLLM evicts them.

Each engine runs in its own process, one after the other, alternating vanilla
and VTENSOR ``--repeats`` times (default 2); the figures are medians.  Prints a table,
writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TOPICS = ["the ocean", "mountains", "a library", "trains", "the moon", "bread", "rivers", "clocks"]


def _prompts(n: int) -> list[str]:
    # ~100 tokens each, all different so the prefix cache does not help (A measures raw decode)
    return [
        f"Request {i}. Describe {TOPICS[i % len(TOPICS)]} in detail, covering history, uses, and curiosities. "
        + "Be thorough and specific. " * 12
        for i in range(n)
    ]


def _sample_stats(path: str, stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        try:
            samples.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)


def run_engine(mode: str, args) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_vtensor.models import build_smollm2

    model = args.model or str(build_smollm2())
    kw = dict(dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=args.kv_bytes, block_size=args.block_size)
    if mode == "vtensor":
        kw["attention_backend"] = "VTENSOR"
    t0 = time.perf_counter()
    llm = LLM(model=model, **kw)
    startup = time.perf_counter() - t0
    cfg = llm.llm_engine.vllm_config.model_config.hf_config
    bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4

    # (A) throughput, with the allocator sampled for (C): --batches batches of the same prompts in a row.
    # The first batch also pays for making the KV memory (VTENSOR creates chunks as requests grow;
    # vanilla cleared its whole space at start-up): it is reported apart from the median over all.
    prompts = _prompts(args.num_prompts)
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_stats, args=(os.environ["VTENSOR_STATS_FILE"], stop, samples))
    sampler.start()
    batch_tok_s, first_batch_samples = [], 0
    for _ in range(args.batches):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        elapsed = time.perf_counter() - t0
        gen_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        batch_tok_s.append(gen_tokens / elapsed)
        first_batch_samples = first_batch_samples or len(samples)
    stop.set()
    sampler.join()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)

    # (B) multi-turn TTFT: several rounds of fresh conversations; per turn, the median over rounds
    rounds = []
    for rnd in range(args.rounds):
        convs = [[{"role": "user", "content": f"Round {rnd + 1}. Tell me about {TOPICS[i % len(TOPICS)]}."}]
                 for i in range(args.conversations)]
        ttft = []
        for turn in range(args.turns):
            t0 = time.perf_counter()
            llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=1))
            ttft.append(time.perf_counter() - t0)
            answers = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=32))
            for conv, ans in zip(convs, answers):
                conv += [{"role": "assistant", "content": ans.outputs[0].text},
                         {"role": "user", "content": f"Tell me more, part {turn + 2}."}]
        rounds.append(ttft)
    ttft = [statistics.median(r[t] for r in rounds) for t in range(args.turns)]

    # (C) over the first batch (a fresh engine).  In later batches, VTENSOR also holds the earlier
    # batches' full blocks for vLLM's prefix cache (until vLLM evicts them): reported apart.
    peak_all = cached_at_peak_all = None
    if mode == "vtensor" and samples:
        first = samples[:first_batch_samples] or samples
        peak_resident = max(s["resident_bytes"] for s in first)
        peak_needed = max(s["live_tokens"] for s in first) * bytes_per_token
        top = max(samples, key=lambda s: s["resident_bytes"])
        peak_all, cached_at_peak_all = top["resident_bytes"], top["cached_bytes"]
    else:
        peak_resident = args.kv_bytes  # vanilla preallocates (and touches) its whole KV space
        peak_needed = None
    allocator = None
    if mode == "vtensor":  # the allocator's totals: chunks created, time spent mapping before steps
        try:
            allocator = json.loads(Path(os.environ["VTENSOR_STATS_FILE"]).read_text())
        except (OSError, ValueError):
            pass
    llm.llm_engine.engine_core.shutdown()
    return {
        "mode": mode, "startup_s": startup, "throughput_tok_s": statistics.median(batch_tok_s),
        "first_batch_tok_s": batch_tok_s[0], "batch_tok_s": batch_tok_s,
        "generated_tokens": gen_tokens, "prompt_tokens": prompt_tokens, "ttft_s": ttft, "ttft_rounds_s": rounds,
        "peak_resident_kv_bytes": peak_resident, "peak_needed_kv_bytes": peak_needed,
        "peak_resident_all_batches_bytes": peak_all, "prefix_cache_bytes_at_that_peak": cached_at_peak_all,
        "kv_bytes_per_token": bytes_per_token, "allocator": allocator,
    }


def _child(mode: str, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VTENSOR_STATS_FILE": os.path.join(tmp, "stats.json")}
        out = os.path.join(tmp, "result.json")
        subprocess.run([sys.executable, __file__, *argv, "--engine", mode, "--result", out], env=env, check=True)
        return json.loads(Path(out).read_text())


def _merge(runs: list[dict]) -> dict:
    """One engine's figures over its repeated runs: medians of throughput (each run's median batch, and
    each run's first batch) and of each turn's TTFT
    (over every round of every run), the highest peak memory; the runs themselves are kept."""
    med = statistics.median
    first = runs[0]
    ttft_rounds = [r for run in runs for r in run["ttft_rounds_s"]]
    return {
        **first,
        "throughput_tok_s": med(r["throughput_tok_s"] for r in runs),
        "first_batch_tok_s": med(r["first_batch_tok_s"] for r in runs),
        "ttft_s": [med(r[t] for r in ttft_rounds) for t in range(len(first["ttft_s"]))],
        "ttft_rounds_s": ttft_rounds,
        "peak_resident_kv_bytes": max(r["peak_resident_kv_bytes"] for r in runs),
        "peak_needed_kv_bytes": None if first["peak_needed_kv_bytes"] is None
        else max(r["peak_needed_kv_bytes"] for r in runs),
        "peak_resident_all_batches_bytes": None if first.get("peak_resident_all_batches_bytes") is None
        else max(r["peak_resident_all_batches_bytes"] for r in runs),
        "runs": runs,
    }


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(modes, [results[m]["throughput_tok_s"] for m in modes], color=["#888", "#2a7"])
    axes[0].set_title("(A) decode throughput, tok/s")
    for m in modes:
        axes[1].plot(range(1, len(results[m]["ttft_s"]) + 1), [t * 1e3 for t in results[m]["ttft_s"]], marker="o", label=m)
    axes[1].set_title("(B) multi-turn TTFT per turn, ms")
    axes[1].set_xlabel("turn")
    axes[1].legend()
    mib = 1 << 20
    vt = results.get("vtensor", {})
    bars = {"vanilla resident": results["vanilla"]["peak_resident_kv_bytes"] / mib,
            "vtensor resident": vt.get("peak_resident_kv_bytes", 0) / mib,
            "live tokens need": (vt.get("peak_needed_kv_bytes") or 0) / mib}
    axes[2].bar(list(bars), list(bars.values()), color=["#888", "#2a7", "#46c"])
    axes[2].set_title("(C) peak KV memory (first batch), MiB")
    axes[2].tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, built locally)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds of fresh conversations; TTFT is the median")
    p.add_argument("--batches", type=int, default=3, help="throughput batches per engine run; the median counts")
    p.add_argument("--repeats", type=int, default=2, help="engine runs of each, alternating; medians over them")
    p.add_argument("--kv-bytes", type=int, default=512 << 20)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="8 prompts x 32 tokens, 4 conversations x 2 turns, 1 round, 1 run each")
    p.add_argument("--out", default=str(RESULTS / "serve_compare-cpu.json"))
    p.add_argument("--engine", choices=["vanilla", "vtensor"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        (args.num_prompts, args.output_len, args.conversations, args.turns, args.rounds, args.repeats,
         args.batches) = 8, 32, 4, 2, 1, 1, 1

    if args.engine:  # child process: one engine
        Path(args.result).write_text(json.dumps(run_engine(args.engine, args)))
        return 0

    child_argv = argv  # a child parses --quick the same way
    # Engines alternate (vanilla, vtensor, vanilla, vtensor, ...): this VM's speed drifts between
    # processes by several percent, so one run of each would compare the drift, not the engines.
    runs = {"vanilla": [], "vtensor": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(_child(mode, child_argv))
    results = {mode: _merge(rs) for mode, rs in runs.items()}
    van, vt = results["vanilla"], results["vtensor"]
    mib = 1 << 20
    summary = {
        "throughput_ratio": vt["throughput_tok_s"] / van["throughput_tok_s"],
        "first_batch_throughput_ratio": vt["first_batch_tok_s"] / van["first_batch_tok_s"],
        "ttft_ratio_per_turn": [b / a for a, b in zip(van["ttft_s"], vt["ttft_s"])],
        "vtensor_peak_resident_over_needed": vt["peak_resident_kv_bytes"] / vt["peak_needed_kv_bytes"],
        "vanilla_resident_over_vtensor_needed": van["peak_resident_kv_bytes"] / vt["peak_needed_kv_bytes"],
    }
    print(f"\nvanilla vLLM vs VTENSOR on {platform.processor() or 'cpu'}, float32, block size {args.block_size}")
    print(f"{'':34}{'vanilla':>12}{'vtensor':>12}{'ratio':>9}")
    print(f"{'(A) throughput, tok/s':34}{van['throughput_tok_s']:>12.1f}{vt['throughput_tok_s']:>12.1f}"
          f"{summary['throughput_ratio']:>8.2f}x")
    print(f"{'(A) first batch (makes KV memory)':34}{van['first_batch_tok_s']:>12.1f}{vt['first_batch_tok_s']:>12.1f}"
          f"{summary['first_batch_throughput_ratio']:>8.2f}x")
    for i, (a, b) in enumerate(zip(van["ttft_s"], vt["ttft_s"])):
        print(f"{f'(B) TTFT turn {i + 1}, ms':34}{a * 1e3:>12.1f}{b * 1e3:>12.1f}{b / a:>8.2f}x")
    print(f"{'(C) peak resident KV, MiB':34}{van['peak_resident_kv_bytes'] / mib:>12.1f}"
          f"{vt['peak_resident_kv_bytes'] / mib:>12.1f}")
    print(f"{'(C) live tokens need, MiB':34}{'':>12}{vt['peak_needed_kv_bytes'] / mib:>12.1f}"
          f"{summary['vtensor_peak_resident_over_needed']:>8.2f}x")
    if vt.get("peak_resident_all_batches_bytes"):
        print(f"{'(C) all batches, incl. prefix cache':34}{'':>12}{vt['peak_resident_all_batches_bytes'] / mib:>12.1f}"
              "   (earlier batches' full blocks kept for the prefix cache)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/serve_compare.py " + " ".join(argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "results": results, "summary": summary,
    }, indent=2))
    png = out.with_suffix(".png")
    _plot(results, png)
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
