"""Vanilla vLLM vs `attention_backend="VTENSOR"`, same model and workload, side by side.

    python benchmarks/serve_compare.py                 # SmolLM2-135M, float32, CPU
    python benchmarks/serve_compare.py --quick         # smaller workload (smoke test)

Both engines live in this one process (each with its own engine-core process) and take
turns on every measurement, in alternating order (vanilla first, then VTENSOR first, ...).
Each ratio is the median of the paired ratios: this VM's speed drifts by several percent
between processes and over minutes, and pairing measurements seconds apart cancels that.

(A) offline throughput: 32 prompts of ~100 tokens, 128 output tokens each, ``--batches``
    pairs of batches (the first pair, in which VTENSOR also makes its KV memory, is also
    reported apart);
(B) multi-turn chat: 8 conversations x 4 turns, time to first token per turn (each turn's
    8 requests as one batch, max_tokens=1, prefix caching on), ``--rounds`` rounds of
    fresh conversations;
(C) KV memory: peak resident KV bytes against the bytes the live tokens need, sampled
    from the allocator during VTENSOR's first batch (vanilla preallocates its whole
    space).  The peak over all batches is reported apart: VTENSOR then also holds the
    earlier batches' full blocks for vLLM's prefix cache until vLLM evicts them.

Prints a table, writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TOPICS = ["the ocean", "mountains", "a library", "trains", "the moon", "bread", "rivers", "clocks"]
MODES = ("vanilla", "vtensor")


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


def _block_size(llm) -> int:
    # the engine core reports the block size it settled on (the backend's preference included)
    return llm.llm_engine.vllm_config.cache_config.block_size


def _order(i: int) -> tuple[str, ...]:
    return MODES if i % 2 == 0 else MODES[::-1]


def run(args) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_vtensor import stats
    from vllm_vtensor.models import build_smollm2

    stats.ensure_stats_path()
    model = args.model or str(build_smollm2())
    kw = dict(dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=args.kv_bytes) | json.loads(args.engine_json)
    backends = {"vanilla": args.vanilla_backend, "vtensor": "VTENSOR"}
    blocks = {"vanilla": args.vanilla_block_size or args.block_size, "vtensor": args.vtensor_block_size or args.block_size}
    llms = {}
    for mode in MODES:
        t0 = time.perf_counter()
        llms[mode] = LLM(model=model, **kw, **({"attention_backend": backends[mode]} if backends[mode] else {}),
                         **({"block_size": blocks[mode]} if blocks[mode] else {}))  # None: the engine's default
        print(f"{mode} engine started in {time.perf_counter() - t0:.1f} s, block size "
              f"{_block_size(llms[mode])}", flush=True)
    cfg = llms["vanilla"].llm_engine.vllm_config.model_config.hf_config
    itemsize = llms["vanilla"].llm_engine.vllm_config.model_config.dtype.itemsize
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize
    prompts = _prompts(args.num_prompts)
    for llm in llms.values():
        llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up

    # (A) throughput, in pairs of batches; VTENSOR's allocator sampled for (C)
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    tok_s = {m: [] for m in MODES}
    samples, first_batch_samples = [], None
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_stats, args=(os.environ["VTENSOR_STATS_FILE"], stop, samples))
    sampler.start()
    for i in range(args.batches):
        for mode in _order(i):
            t0 = time.perf_counter()
            outs = llms[mode].generate(prompts, sp, use_tqdm=False)
            tok_s[mode].append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
            if mode == "vtensor" and first_batch_samples is None:
                first_batch_samples = len(samples)
        print(f"(A) pair {i + 1}: vanilla {tok_s['vanilla'][-1]:.1f}, vtensor {tok_s['vtensor'][-1]:.1f} tok/s", flush=True)
    stop.set()
    sampler.join()

    # (B) multi-turn TTFT: each turn's call made by both engines back to back, order alternating
    ttft = {m: [[] for _ in range(args.turns)] for m in MODES}  # [turn][round]
    for rnd in range(args.rounds):
        convs = {m: [[{"role": "user", "content": f"Round {rnd + 1}. Tell me about {TOPICS[i % len(TOPICS)]}."}]
                     for i in range(args.conversations)] for m in MODES}
        for turn in range(args.turns):
            for mode in _order(rnd + turn):
                t0 = time.perf_counter()
                llms[mode].chat(convs[mode], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
                ttft[mode][turn].append(time.perf_counter() - t0)
                answers = llms[mode].chat(convs[mode], SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
                for conv, ans in zip(convs[mode], answers):
                    conv += [{"role": "assistant", "content": ans.outputs[0].text},
                             {"role": "user", "content": f"Tell me more, part {turn + 2}."}]
        print(f"(B) round {rnd + 1}: TTFT vtensor/vanilla "
              + " ".join(f"{b[-1] / a[-1]:.2f}" for a, b in zip(ttft["vanilla"], ttft["vtensor"])), flush=True)

    # (C) from VTENSOR's first batch; the peak over all batches apart
    first = samples[:first_batch_samples] or samples
    top = max(samples, key=lambda s: s["resident_bytes"])
    allocator = stats.read()
    for llm in llms.values():
        llm.llm_engine.engine_core.shutdown()

    med = statistics.median
    pair = lambda a, b: [y / x for x, y in zip(a, b)]  # noqa: E731  (vtensor / vanilla, pair by pair)
    results = {
        m: {"throughput_tok_s": med(tok_s[m]), "first_batch_tok_s": tok_s[m][0], "batch_tok_s": tok_s[m],
            "ttft_s": [med(t) for t in ttft[m]], "ttft_rounds_s": ttft[m], "block_size": _block_size(llms[m])}
        for m in MODES
    }
    results["vanilla"]["peak_resident_kv_bytes"] = args.kv_bytes  # preallocated (and touched) at start-up
    results["vtensor"].update({
        "peak_resident_kv_bytes": max(s["resident_bytes"] for s in first),
        "peak_needed_kv_bytes": max(s["live_tokens"] for s in first) * bytes_per_token,
        "peak_resident_all_batches_bytes": top["resident_bytes"],
        "prefix_cache_bytes_at_that_peak": top["cached_bytes"],
        "allocator": allocator,
    })
    van, vt = results["vanilla"], results["vtensor"]
    summary = {
        "throughput_ratio": med(pair(tok_s["vanilla"], tok_s["vtensor"])),
        "throughput_pair_ratios": pair(tok_s["vanilla"], tok_s["vtensor"]),
        "first_batch_throughput_ratio": vt["first_batch_tok_s"] / van["first_batch_tok_s"],
        "ttft_ratio_per_turn": [med(pair(a, b)) for a, b in zip(ttft["vanilla"], ttft["vtensor"])],
        "ttft_pair_ratios": [r for a, b in zip(ttft["vanilla"], ttft["vtensor"]) for r in pair(a, b)],
        "vtensor_peak_resident_over_needed": vt["peak_resident_kv_bytes"] / vt["peak_needed_kv_bytes"],
        "vanilla_resident_over_vtensor_needed": van["peak_resident_kv_bytes"] / vt["peak_needed_kv_bytes"],
        "kv_bytes_per_token": bytes_per_token,
    }
    summary["ttft_ratio_all_turns"] = med(summary["ttft_pair_ratios"])
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    dtype = str(llms["vanilla"].llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
    return {"results": results, "summary": summary, "device": device, "dtype": dtype}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    label = {m: f"{m}, block {results[m]['block_size']}" if "block_size" in results[m] else m for m in modes}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar([label[m] for m in modes], [results[m]["throughput_tok_s"] for m in modes], color=["#888", "#2a7"])
    axes[0].set_title("(A) decode throughput, tok/s")
    for m in modes:
        axes[1].plot(range(1, len(results[m]["ttft_s"]) + 1), [t * 1e3 for t in results[m]["ttft_s"]], marker="o",
                     label=label[m])
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
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, built locally)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="rounds of fresh conversations for (B)")
    p.add_argument("--batches", type=int, default=6, help="pairs of throughput batches for (A)")
    p.add_argument("--kv-bytes", type=int, default=512 << 20)
    p.add_argument("--block-size", type=int, default=None,
                   help="both engines' block size (default: each engine's own default; on CPU vanilla's is 128, "
                   "VTENSOR's 32)")
    p.add_argument("--vanilla-block-size", type=int, default=None, help="vanilla's block size (overrides --block-size)")
    p.add_argument("--vtensor-block-size", type=int, default=None, help="VTENSOR's block size (overrides --block-size)")
    p.add_argument("--engine-json", default="{}", help="more LLM(...) arguments for both engines, as JSON "
                   "(e.g. a GPU run's dtype and compilation_config); they override the defaults")
    p.add_argument("--vanilla-backend", default=None, help="vanilla's attention backend (default: vLLM's choice; "
                   "TRITON_ATTN on a GPU compares like with like)")
    p.add_argument("--quick", action="store_true", help="8 prompts x 32 tokens, 4 conversations x 2 turns, 2 pairs")
    p.add_argument("--out", default=str(RESULTS / "serve_compare-cpu.json"))
    args = p.parse_args(argv)
    if args.quick:
        (args.num_prompts, args.output_len, args.conversations, args.turns, args.rounds,
         args.batches) = 8, 32, 4, 2, 2, 2
    data = run(args)
    results, summary = data["results"], data["summary"]
    van, vt = results["vanilla"], results["vtensor"]
    mib = 1 << 20
    print(f"\nvanilla vLLM vs VTENSOR on {data['device']}, {data['dtype']}, block sizes {van['block_size']} / "
          f"{vt['block_size']} (ratios: medians of paired measurements)")
    print(f"{'':34}{'vanilla':>12}{'vtensor':>12}{'ratio':>9}")
    print(f"{'(A) throughput, tok/s':34}{van['throughput_tok_s']:>12.1f}{vt['throughput_tok_s']:>12.1f}"
          f"{summary['throughput_ratio']:>8.2f}x")
    print(f"{'(A) first batch (makes KV memory)':34}{van['first_batch_tok_s']:>12.1f}{vt['first_batch_tok_s']:>12.1f}"
          f"{summary['first_batch_throughput_ratio']:>8.2f}x")
    for i, (a, b) in enumerate(zip(van["ttft_s"], vt["ttft_s"])):
        print(f"{f'(B) TTFT turn {i + 1}, ms':34}{a * 1e3:>12.1f}{b * 1e3:>12.1f}{summary['ttft_ratio_per_turn'][i]:>8.2f}x")
    print(f"{'(B) TTFT, all turns':34}{'':>24}{summary['ttft_ratio_all_turns']:>8.2f}x")
    print(f"{'(C) peak resident KV, MiB':34}{van['peak_resident_kv_bytes'] / mib:>12.1f}"
          f"{vt['peak_resident_kv_bytes'] / mib:>12.1f}")
    print(f"{'(C) live tokens need, MiB':34}{'':>12}{vt['peak_needed_kv_bytes'] / mib:>12.1f}"
          f"{summary['vtensor_peak_resident_over_needed']:>8.2f}x")
    print(f"{'(C) all batches, incl. prefix cache':34}{'':>12}{vt['peak_resident_all_batches_bytes'] / mib:>12.1f}"
          "   (earlier batches' full blocks kept for the prefix cache)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/serve_compare.py " + " ".join(argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "device": data["device"], "dtype": data["dtype"],
        "results": results, "summary": summary,
    }, indent=2))
    png = out.with_suffix(".png")
    _plot(results, png)
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
