"""FlexInfer offload benchmark: decode tokens/s against the memory budget, each run in a cgroup.

    python benchmarks/offload.py                       # SmolLM2-135M (float32), budgets 25/50/75/100%
    python benchmarks/offload.py --budgets 0.5 --configs flexinfer,vanilla --tokens 16

Every run is held to its budget by a cgroup v1 memory limit of ``budget + the
engine's fixed overhead`` (measured first: an unlimited flexinfer run's peak at
the smallest budget, minus that budget, plus 64 MiB headroom), page cache included.  Configurations: ``flexinfer``; its
ablations ``sync`` (no prefetch), ``no_balance``, ``attention_first``,
``ffn_first``; ``mmap`` (layer weights mapped from the store, paged by the
kernel: the llama.cpp way); ``vanilla`` (vLLM's default loader).  The I/O
bound is measured disk bandwidth / bytes streamed per token.  Needs root.
Prints a table, writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CGROUP = Path("/sys/fs/cgroup/memory")
CONFIGS = {
    "flexinfer": {},
    "sync": {"prefetch_window": 0},
    "no_balance": {"policy": "no_balance"},
    "attention_first": {"policy": "attention_first"},
    "ffn_first": {"policy": "ffn_first"},
    "mmap": {"policy": "mmap"},
    "vanilla": None,
}


def child(args) -> None:
    """One engine: load, warm up, decode ``--tokens`` tokens for one prompt, report."""
    from vllm import LLM, SamplingParams

    extra = json.loads(args.extra) if args.extra != "null" else None
    kw = dict(load_format="flexinfer", model_loader_extra_config=extra) if extra is not None else {}
    llm = LLM(model=args.model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=32 << 20, **kw)
    prompt = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    llm.chat(prompt, SamplingParams(max_tokens=2))
    t0 = time.perf_counter()
    out = llm.chat(prompt, SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    n = len(out[0].outputs[0].token_ids)
    Path(args.result).write_text(json.dumps({"tokens": n, "seconds": elapsed, "tok_s": n / elapsed}))
    llm.llm_engine.engine_core.shutdown()


def run_in_cgroup(name: str, limit: int | None, argv: list[str], env: dict) -> dict:
    cg = CGROUP / f"vllm-vtensor-bench-{name}"
    if cg.exists():
        cg.rmdir()
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit) if limit else "-1")
        cmd = f'echo $$ > {cg}/cgroup.procs && exec "$0" "$@"'
        proc = subprocess.run(["sh", "-c", cmd, sys.executable, *argv], env=env, capture_output=True, text=True,
                              timeout=1200)
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
        ooms = int((cg / "memory.failcnt").read_text())
        return {"returncode": proc.returncode, "peak_bytes": peak, "limit_hits": ooms,
                "log_tail": (proc.stdout + proc.stderr)[-1500:]}
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.2)


def disk_bandwidth(path: Path, limit_bytes: int = 512 << 20) -> float:
    """O_DIRECT sequential read bandwidth of ``path`` (bytes/s)."""
    import mmap

    buf = mmap.mmap(-1, 8 << 20)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    best = 0.0
    try:
        for _ in range(3):  # best of three: the runs re-read the same file, warm below the page cache
            done, t0 = 0, time.perf_counter()
            while done < min(limit_bytes, path.stat().st_size):
                n = os.preadv(fd, [buf], done)
                if n <= 0:
                    break
                done += n
            best = max(best, done / (time.perf_counter() - t0))
        return best
    finally:
        os.close(fd)


def run_config(model, cfg_name, fraction, limit, tokens, tmp) -> dict:
    extra = CONFIGS[cfg_name]
    extra = None if extra is None else {"memory_budget": fraction, **extra}
    result, stats = Path(tmp) / f"{cfg_name}-{fraction}.json", Path(tmp) / f"{cfg_name}-{fraction}-stats.json"
    env = {**os.environ, "FLEXOFFLOAD_STATS_FILE": str(stats)}
    argv = [__file__, "--child", "--model", model, "--extra", json.dumps(extra), "--tokens", str(tokens),
            "--result", str(result)]
    run = run_in_cgroup(f"{cfg_name}-{int(fraction * 100)}", limit, argv, env)
    row = {"config": cfg_name, "fraction": fraction, "limit_bytes": limit, **run}
    if result.exists():
        row.update(json.loads(result.read_text()))
    else:
        row["tok_s"] = None  # failed: usually killed by the memory limit
    if stats.exists():
        row["flexinfer"] = json.loads(stats.read_text())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--budgets", default="0.25,0.5,0.75,1.0")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS / "offload-cpu.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--extra", default="null", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if os.geteuid() != 0 or not (CGROUP / "memory.limit_in_bytes").exists():
        raise SystemExit("this benchmark needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")

    from flexoffload.plan import checkpoint_tensors
    from vllm_vtensor.models import build_smollm2

    model = args.model or str(build_smollm2())
    weight_bytes = sum(t.nbytes for t in checkpoint_tensors(model, dtype_bytes=4))
    budgets = [float(b) for b in args.budgets.split(",")]
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        # The engine's fixed overhead: the peak of an unlimited flexinfer run at the smallest budget
        # (it holds at most that budget of weights, and loads only those), minus that budget.  The
        # first flexinfer run also writes the weight store, outside any limit.  (vanilla's peak would
        # include load-time copies of the whole model and leave the other runs slack to cache it.)
        base = run_config(model, "vanilla", 1.0, None, args.tokens, tmp)
        run_config(model, "flexinfer", min(budgets), None, 2, tmp)
        probe = run_config(model, "flexinfer", min(budgets), None, 2, tmp)
        # + 64 MiB of headroom: run-to-run noise (allocator, page cache of small files) must not decide OOMs
        overhead = probe["peak_bytes"] - int(min(budgets) * weight_bytes) + (64 << 20)
        store = max((Path(os.environ.get("VTENSOR_CACHE", Path.home() / ".cache/vllm-vtensor")) / "flexinfer")
                    .glob("*.bin"), key=lambda q: q.stat().st_mtime)
        bw = disk_bandwidth(store)
        rows = []
        for fraction in budgets:
            limit = int(fraction * weight_bytes) + overhead
            for cfg in configs:
                row = run_config(model, cfg, fraction, limit, args.tokens, tmp)
                streamed = (row.get("flexinfer") or {}).get("streamed_bytes_per_forward")
                row["io_bound_tok_s"] = bw / streamed if streamed else None
                rows.append(row)
                print(f"{cfg:>16} {fraction:>5.0%} limit {limit / 2**20:7.0f} MiB: "
                      + (f"{row['tok_s']:7.2f} tok/s" if row["tok_s"] else "  failed (memory limit)"), flush=True)

    print(f"\nSmolLM2-135M float32 ({weight_bytes / 2**20:.0f} MiB weights), engine overhead "
          f"{overhead / 2**20:.0f} MiB, disk O_DIRECT {bw / 1e9:.2f} GB/s; decode tok/s (cgroup limit = budget + overhead)")
    print(f"{'config':>16}" + "".join(f"{b:>9.0%}" for b in budgets))
    for cfg in configs + ["io_bound"]:
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["fraction"] == b and r["config"] == (cfg if cfg != "io_bound" else "flexinfer")), None)
            v = None if r is None else (r.get("io_bound_tok_s") if cfg == "io_bound" else r["tok_s"])
            cells.append(f"{v:>9.2f}" if v else f"{'OOM' if cfg != 'io_bound' and r else '-':>9}")
        print(f"{cfg:>16}" + "".join(cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/offload.py " + " ".join(argv or sys.argv[1:]),
                               "weight_bytes": weight_bytes, "overhead_bytes": overhead, "disk_bytes_per_s": bw,
                               "baseline_unlimited": base, "rows": rows}, indent=2))
    _plot(rows, budgets, configs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(rows, budgets, configs, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for cfg in configs:
        pts = [(r["fraction"] * 100, r["tok_s"]) for r in rows if r["config"] == cfg and r["tok_s"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=cfg, linewidth=2.5 if cfg == "flexinfer" else 1.2)
    bound = [(r["fraction"] * 100, r["io_bound_tok_s"]) for r in rows if r["config"] == "flexinfer" and r.get("io_bound_tok_s")]
    if bound:
        ax.plot(*zip(*bound), "k--", label="I/O bound (disk bw / streamed bytes)")
    ax.set_xlabel("memory budget, % of weight bytes")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M fp32 under a cgroup memory limit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
