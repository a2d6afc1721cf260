"""A long generation on a sliding-window model: how much KV memory does it hold?

    python benchmarks/sliding_window.py            # 4608 tokens past a 1024-token window, CPU
    python benchmarks/sliding_window.py --quick    # 600 tokens past a 64-token window

A random-weight llama with the same window on every layer (Mistral-style; built locally), float32.
One request (a 512-token prompt, then ``--tokens`` generated) runs on vanilla vLLM and on VTENSOR
with prefix caching off and on. VTENSOR's figures are sampled from its worker every 50 ms:
resident KV bytes (memory held), mapped bytes (what the request's range maps), and the part held
only for vLLM's prefix cache. Vanilla vLLM holds its whole KV budget from start-up (its scheduler
frees the blocks the window leaves behind for other requests, in memory already committed).
Prints a table, writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def _sample(path: str, stop: threading.Event, out: list, t0: float) -> None:
    while not stop.is_set():
        try:
            s = json.loads(Path(path).read_text())
            out.append((round(time.perf_counter() - t0, 2), s["live_tokens"], s["resident_bytes"], s["mapped_bytes"],
                        s["cached_bytes"], s["reserve_bytes"]))
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)


def run(name: str, model: str, args, out_dir: Path) -> dict:
    from vllm import LLM, SamplingParams

    vt = name.startswith("vtensor")
    stats = out_dir / f"stats-{name}.json"
    os.environ["VTENSOR_STATS_FILE"] = str(stats)
    kw = dict(dtype="float32", enforce_eager=True, seed=0, max_model_len=args.prompt + args.tokens + 64,
              kv_cache_memory_bytes=args.kv_bytes, enable_prefix_caching=name != "vtensor_no_prefix_cache")
    llm = LLM(model=model, **kw, **({"attention_backend": "VTENSOR"} if vt else {}))
    cfg = llm.llm_engine.vllm_config
    samples, stop = [], threading.Event()
    t0 = time.perf_counter()
    sampler = threading.Thread(target=_sample, args=(str(stats), stop, samples, t0)) if vt else None
    if sampler:
        sampler.start()
    out = llm.generate([{"prompt_token_ids": [100 + i % 900 for i in range(args.prompt)]}],
                       SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - t0
    time.sleep(0.5)
    if sampler:
        stop.set()
        sampler.join()
    final = json.loads(stats.read_text()) if vt else {}
    llm.llm_engine.engine_core.shutdown()
    return {"block_size": cfg.cache_config.block_size, "prefix_caching": kw["enable_prefix_caching"],
            "tokens": len(out[0].outputs[0].token_ids), "seconds": round(seconds, 1),
            "tok_s": len(out[0].outputs[0].token_ids) / seconds,
            "kv_budget_bytes": args.kv_bytes, "samples": samples,
            **({"peak_resident_bytes": final["peak_resident_bytes"], "chunk_bytes": final["chunk_bytes"],
                "peak_mapped_bytes": max((s[3] for s in samples), default=0)} if vt else {})}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4608, help="tokens generated (past the window)")
    p.add_argument("--kv-bytes", type=int, default=256 << 20)
    p.add_argument("--quick", action="store_true", help="a 64-token window, 600 tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sliding_window-cpu.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.window, args.prompt, args.tokens, args.kv_bytes = 64, 100, 600, 64 << 20
    from vllm_vtensor import stats
    from vllm_vtensor.models import build_tiny_llama

    stats.ensure_stats_path()
    model = str(build_tiny_llama(sliding_window=args.window, sliding_every=1,
                                 max_position_embeddings=max(4096, args.prompt + args.tokens + 64)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import transformers

    hf = transformers.AutoConfig.from_pretrained(model)
    per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * hf.head_dim * 4
    data = {**provenance("sliding_window.py", argv), "window_tokens": args.window, "prompt_tokens": args.prompt,
            "generated_tokens": args.tokens, "kv_bytes_per_token": per_token, "window_bytes": args.window * per_token,
            "engines": {}}
    scratch = Path(tempfile.mkdtemp(prefix="vllm-vtensor-sliding-"))  # the engines' snapshot files
    for name in ("vanilla", "vtensor_no_prefix_cache", "vtensor"):
        data["engines"][name] = run(name, model, args, scratch)
        print(f"{name}: {data['engines'][name]['tok_s']:.1f} tok/s", flush=True)
    w = data["window_bytes"]
    for name in ("vtensor_no_prefix_cache", "vtensor"):
        e = data["engines"][name]
        e["peak_resident_over_window"] = e["peak_resident_bytes"] / w
        e["peak_mapped_over_window"] = e["peak_mapped_bytes"] / w
    mib = 1 << 20
    print(f"\nwindow {args.window} tokens = {w / mib:.2f} MiB of KV; {args.prompt} + {args.tokens} tokens")
    print(f"{'engine':26}{'KV committed, MiB':>20}{'x window':>10}{'mapped peak, MiB':>18}{'tok/s':>8}")
    van = data["engines"]["vanilla"]
    print(f"{'vanilla (preallocated)':26}{van['kv_budget_bytes'] / mib:>20.1f}{van['kv_budget_bytes'] / w:>10.1f}"
          f"{'':>18}{van['tok_s']:>8.1f}")
    for name in ("vtensor_no_prefix_cache", "vtensor"):
        e = data["engines"][name]
        print(f"{name + ' (peak)':26}{e['peak_resident_bytes'] / mib:>20.2f}{e['peak_resident_over_window']:>10.2f}"
              f"{e['peak_mapped_bytes'] / mib:>18.2f}{e['tok_s']:>8.1f}")
    out.write_text(json.dumps(data, indent=2))
    _plot(data, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 1 << 20
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, color in (("vtensor_no_prefix_cache", "#2a7"), ("vtensor", "#46c")):
        s = [x for x in data["engines"][name]["samples"] if x[1] > 0]  # while the request runs
        ax.plot([x[1] for x in s], [x[2] / mib for x in s], label=f"{name}: resident", color=color)
        ax.plot([x[1] for x in s], [x[3] / mib for x in s], "--", label=f"{name}: mapped", color=color)
    ax.axhline(data["window_bytes"] / mib, color="#c84", label="the window's KV")
    ax.set_xlabel("tokens of the request")
    ax.set_ylabel("KV MiB")
    ax.set_title(f"one request on a {data['window_tokens']}-token sliding window (vanilla commits "
                 f"{data['engines']['vanilla']['kv_budget_bytes'] / mib:.0f} MiB)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
