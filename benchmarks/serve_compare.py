"""Vanilla vLLM vs `attention_backend="VTENSOR"`, same model and workload, side by side.

    python benchmarks/serve_compare.py                 # SmolLM2-135M, float32, CPU
    python benchmarks/serve_compare.py --quick         # smaller workload (smoke test)

Both engines live in this one process (each with its own engine-core process) and take
turns on every measurement, in alternating order (vanilla first, then VTENSOR first, ...).
Each ratio is the median of the paired ratios: a virtual machine's speed can drift by several percent
between processes and over minutes, and pairing measurements seconds apart cancels that.

(A) offline throughput: 32 prompts of ~100 tokens, 128 output tokens each, ``--batches``
    pairs of batches (the first pair, in which VTENSOR also makes its KV memory, is also
    reported apart);
(B) multi-turn chat: 8 conversations x 4 turns, time to first token per turn (each turn's
    8 requests as one batch, max_tokens=1, prefix caching on), ``--rounds`` rounds of
    fresh conversations;
(C) KV memory: peak resident KV bytes against the peak bytes the live tokens need, in
    VTENSOR's first batch, as the worker tracks them exactly (resident memory at every
    chunk creation, live tokens at every step; vanilla preallocates its whole space).
    The peak over all batches is reported apart (sampled): VTENSOR then also holds the
    earlier batches' full blocks for vLLM's prefix cache until vLLM evicts them.

With ``--vanilla-at-vtensor-block`` a third engine, vanilla vLLM at VTENSOR's block size, takes
its turn in the same rotation: the engines' default block sizes differ on CPU (128 and 32), and
this separates what the block size does from what VTENSOR does.

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
SAME = "vanilla_same_block"  # optional third engine: vanilla vLLM at VTENSOR's block size


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


def _order(modes: list[str], i: int) -> list[str]:
    # rotate who goes first (with two engines: alternate)
    k = i % len(modes)
    return modes[k:] + modes[:k]


def _paired(tok_s: dict, ttft: dict, a: str, b: str) -> dict:
    """Engine ``b`` over engine ``a``: medians of the ratios of measurements taken back to back."""
    med = statistics.median

    def pair(x, y):
        return [q / p for p, q in zip(x, y)]

    ttft_pairs = [r for x, y in zip(ttft[a], ttft[b]) for r in pair(x, y)]
    return {
        "throughput_ratio": med(pair(tok_s[a], tok_s[b])),
        "throughput_pair_ratios": pair(tok_s[a], tok_s[b]),
        "first_batch_throughput_ratio": tok_s[b][0] / tok_s[a][0],
        "ttft_ratio_per_turn": [med(pair(x, y)) for x, y in zip(ttft[a], ttft[b])],
        "ttft_pair_ratios": ttft_pairs,
        "ttft_ratio_all_turns": med(ttft_pairs),
    }


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
    modes = list(MODES) + ([SAME] if args.vanilla_at_vtensor_block else [])
    for mode in modes:
        if mode == SAME:
            backends[mode], blocks[mode] = backends["vanilla"], _block_size(llms["vtensor"])
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
    tok_s = {m: [] for m in modes}
    samples, vt_starts = [], []  # allocator snapshots; where each of VTENSOR's batches began in them
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_stats, args=(os.environ["VTENSOR_STATS_FILE"], stop, samples))
    sampler.start()
    for i in range(args.batches):
        for mode in _order(modes, i):
            if mode == "vtensor":
                vt_starts.append(len(samples))
            t0 = time.perf_counter()
            outs = llms[mode].generate(prompts, sp, use_tqdm=False)
            tok_s[mode].append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
        print(f"(A) round {i + 1}: " + ", ".join(f"{m} {tok_s[m][-1]:.1f}" for m in modes) + " tok/s", flush=True)
    stop.set()
    sampler.join()

    # (B) multi-turn TTFT: each turn's call made by both engines back to back, order alternating
    ttft = {m: [[] for _ in range(args.turns)] for m in modes}  # [turn][round]
    for rnd in range(args.rounds):
        convs = {m: [[{"role": "user", "content": f"Round {rnd + 1}. Tell me about {TOPICS[i % len(TOPICS)]}."}]
                     for i in range(args.conversations)] for m in modes}
        for turn in range(args.turns):
            for mode in _order(modes, rnd + turn):
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
    # the first batch's peaks: the worker tracks them exactly (resident at every chunk creation, live tokens
    # at every step) and they only grow, so the last snapshot before VTENSOR's second batch holds them
    first = samples[:vt_starts[1]] if len(vt_starts) > 1 else samples
    top = max(samples, key=lambda s: s["resident_bytes"])
    allocator = stats.read()
    for llm in llms.values():
        llm.llm_engine.engine_core.shutdown()

    med = statistics.median
    results = {
        m: {"throughput_tok_s": med(tok_s[m]), "first_batch_tok_s": tok_s[m][0], "batch_tok_s": tok_s[m],
            "ttft_s": [med(t) for t in ttft[m]], "ttft_rounds_s": ttft[m], "block_size": _block_size(llms[m])}
        for m in modes
    }
    for m in modes:
        if m != "vtensor":
            results[m]["peak_resident_kv_bytes"] = args.kv_bytes  # preallocated (and touched) at start-up
    results["vtensor"].update({
        "peak_resident_kv_bytes": max(s["peak_resident_bytes"] for s in first),
        "peak_needed_kv_bytes": max(s["peak_live_tokens"] for s in first) * bytes_per_token,
        # the same from snapshots sampled every 50 ms (published at most every 0.2 s): they miss the last steps
        "sampled_peak_resident_kv_bytes": max(s["resident_bytes"] for s in first),
        "sampled_peak_needed_kv_bytes": max(s["live_tokens"] for s in first) * bytes_per_token,
        "peak_resident_all_batches_bytes": top["resident_bytes"],
        "prefix_cache_bytes_at_that_peak": top["cached_bytes"],
        "allocator": allocator,
    })
    van, vt = results["vanilla"], results["vtensor"]
    summary = _paired(tok_s, ttft, "vanilla", "vtensor") | {
        "vtensor_peak_resident_over_needed": vt["peak_resident_kv_bytes"] / vt["peak_needed_kv_bytes"],
        "vanilla_resident_over_vtensor_needed": van["peak_resident_kv_bytes"] / vt["peak_needed_kv_bytes"],
        "kv_bytes_per_token": bytes_per_token,
    }
    if SAME in modes:  # the same ratios against vanilla at VTENSOR's block size, and what that block size does to vanilla
        summary["vs_vanilla_same_block"] = _paired(tok_s, ttft, SAME, "vtensor")
        summary["vanilla_same_block_vs_vanilla"] = _paired(tok_s, ttft, "vanilla", SAME)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    dtype = str(llms["vanilla"].llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
    return {"results": results, "summary": summary, "device": device, "dtype": dtype}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    label = {m: f"{m.split('_')[0]}, block {results[m]['block_size']}" if "block_size" in results[m] else m
             for m in modes}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar([label[m].replace(", ", "\n") for m in modes], [results[m]["throughput_tok_s"] for m in modes],
                color=["#888", "#2a7", "#bbb"][:len(modes)])
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
    p.add_argument("--vanilla-at-vtensor-block", action="store_true",
                   help="a third engine: vanilla vLLM at VTENSOR's block size, measured in the same rotation (shows what "
                   "the block size alone does when the engines' defaults differ)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 4 prompts x 32 tokens in 2 pairs of batches, 4 conversations x 2 turns in 1 round")
    p.add_argument("--out", default=str(RESULTS / "serve_compare-cpu.json"))
    args = p.parse_args(argv)
    if args.quick:
        (args.num_prompts, args.output_len, args.conversations, args.turns, args.rounds,
         args.batches) = 4, 32, 4, 2, 1, 2
    data = run(args)
    results, summary = data["results"], data["summary"]
    van, vt = results["vanilla"], results["vtensor"]
    same = results.get(SAME)
    mib = 1 << 20
    print(f"\nvanilla vLLM vs VTENSOR on {data['device']}, {data['dtype']}, block sizes {van['block_size']} / "
          f"{vt['block_size']} (ratios: medians of paired measurements)")
    cols = [van, vt] + ([same] if same else [])
    head = ["vanilla", "vtensor"] + ([f"vanilla@{same['block_size']}"] if same else [])
    print(f"{'':34}" + "".join(f"{h:>12}" for h in head) + f"{'vt/van':>9}" + (f"{'vt/van@' + str(same['block_size']):>11}" if same else ""))

    def row(label, values, fmt, ratio, ratio_same=None):
        extra = f"{ratio_same:>10.2f}x" if ratio_same is not None else ""
        print(f"{label:34}" + "".join(f"{v:>12{fmt}}" for v in values) + f"{ratio:>8.2f}x" + extra)

    sb = summary.get("vs_vanilla_same_block")
    row("(A) throughput, tok/s", [c["throughput_tok_s"] for c in cols], ".1f", summary["throughput_ratio"],
        sb and sb["throughput_ratio"])
    row("(A) first batch (makes KV memory)", [c["first_batch_tok_s"] for c in cols], ".1f",
        summary["first_batch_throughput_ratio"], sb and sb["first_batch_throughput_ratio"])
    for i in range(len(van["ttft_s"])):
        row(f"(B) TTFT turn {i + 1}, ms", [c["ttft_s"][i] * 1e3 for c in cols], ".1f", summary["ttft_ratio_per_turn"][i],
            sb and sb["ttft_ratio_per_turn"][i])
    print(f"{'(B) TTFT, all turns':34}{'':>{12 * len(cols)}}{summary['ttft_ratio_all_turns']:>8.2f}x"
          + (f"{sb['ttft_ratio_all_turns']:>10.2f}x" if sb else ""))
    print(f"{'(C) peak resident KV, MiB':34}{van['peak_resident_kv_bytes'] / mib:>12.1f}"
          f"{vt['peak_resident_kv_bytes'] / mib:>12.1f}")
    print(f"{'(C) live tokens need, MiB':34}{'':>12}{vt['peak_needed_kv_bytes'] / mib:>12.1f}"
          f"{summary['vtensor_peak_resident_over_needed']:>8.2f}x")
    print(f"{'(C) all batches, incl. prefix cache':34}{'':>12}{vt['peak_resident_all_batches_bytes'] / mib:>12.1f}"
          "   (earlier batches' full blocks kept for the prefix cache)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance

    out.write_text(json.dumps({
        **provenance("serve_compare.py", argv), "device": data["device"], "dtype": data["dtype"],
        "results": results, "summary": summary,
    }, indent=2))
    png = out.with_suffix(".png")
    _plot(results, png)
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
