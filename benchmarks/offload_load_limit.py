"""Can a loader load, not just run, under the memory limit? Each engine here is held to
``budget + the engine's steady overhead`` by a cgroup v1 memory limit from its first instruction
(benchmarks/offload.py lifts the limit while loading), and flexinfer starts without a weight store,
so its first build of the store happens under the limit too.

    python benchmarks/offload_load_limit.py                     # 1.65 GB random llama, 25% budget
    python benchmarks/offload_load_limit.py --model smollm2 --budget 0.5

Runs, each from a cold page cache: (1) flexinfer unlimited with a fresh store, which gives the
engine's steady overhead (as in offload.py: anonymous + shared + mapped memory after warm-up minus
weights and buffers, + 64 MiB) and its unlimited peak; (2) flexinfer with a fresh store under the
limit; (3) flexinfer again under the limit, its store kept from (2); (4) vanilla vLLM's loader under
the same limit.  A run killed by the limit, or still loading after 300 s (thrashing under it), is
reported as such.  Needs root.  Prints a table and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cgroup  # noqa: E402
from offload import RESULTS, resolve_model, run_child, steady_overhead  # noqa: E402

LOAD_TIMEOUT = 300  # s; unlimited, each engine here loads in under a minute


def _run(name: str, model: str, extra: dict | None, limit: int | None, tokens: int, tmp: str) -> dict:
    return {"run": name, **run_child(name, f"load-limit-{name}", model, extra, limit, tokens, tmp,
                                     limit_from_start=True, load_timeout=LOAD_TIMEOUT)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench-llama", help="bench-llama, smollm2, or a model folder")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of the weight bytes")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS / "offload-load-limit-cpu.json"))
    args = p.parse_args(argv)
    if not cgroup.available():
        raise SystemExit("this benchmark needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    model, weight_bytes = resolve_model(args.model)
    budget = int(args.budget * weight_bytes)
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # the stores: on disk, not on a tmpfs /tmp
        flex = lambda store: {"memory_budget": args.budget, "cache_dir": str(Path(tmp) / store)}  # noqa: E731
        probe = _run("flexinfer-unlimited", model, flex("a"), None, args.tokens, tmp)
        if probe["tok_s"] is None:
            raise SystemExit(f"the unlimited flexinfer run failed:\n{probe['log_tail']}")
        overhead = steady_overhead(probe)
        limit = budget + overhead
        rows = [probe,
                _run("flexinfer-limited", model, flex("b"), limit, args.tokens, tmp),
                _run("flexinfer-limited-again", model, flex("b"), limit, args.tokens, tmp),
                _run("vanilla-limited", model, None, limit, args.tokens, tmp)]
    mib = 2**20
    print(f"\n{Path(model).name}: weights {weight_bytes / mib:.0f} MiB, budget {args.budget:.0%} = {budget / mib:.0f} MiB, "
          f"engine overhead {overhead / mib:.0f} MiB, limit {limit / mib:.0f} MiB from the start")
    print(f"{'run':>22} {'limit MiB':>10} {'peak MiB':>9} {'store built':>12} {'load peak anon MiB':>19} {'tok/s':>7}")
    for r in rows:
        f = r.get("flexinfer") or {}
        built = "-" if not r["run"].startswith("flexinfer") else "no (kept)" if r["run"].endswith("again") else "yes"
        anon = f.get("load_peak_anon_bytes")
        print(f"{r['run']:>22} {(r['limit_bytes'] or 0) / mib:>10.0f} {r['peak_bytes'] / mib:>9.0f} {built:>12} "
              f"{(anon / mib if anon is not None else float('nan')):>19.0f} "
              + (f"{r['tok_s']:>7.2f}" if r["tok_s"] else f"  not loaded in {LOAD_TIMEOUT} s (thrashing under the limit)"
                 if r.get("load_timed_out") else "  killed by the limit" if r["limit_hits"] else "  failed"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance

    out.write_text(json.dumps({**provenance("offload_load_limit.py", argv),
                               "model": model, "weight_bytes": weight_bytes, "budget_bytes": budget,
                               "overhead_bytes": overhead, "limit_bytes": limit, "rows": rows}, indent=2))
    print(f"\nwrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
