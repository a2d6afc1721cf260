"""Several `vllm serve` engines on one host: one shared KV pool (VTENSOR_POOL) against the same total KV
split statically between vanilla vLLM servers, under load that shifts from engine to engine.

    python benchmarks/multi_engine.py                      # 2 SmolLM2 servers per configuration
    python benchmarks/multi_engine.py --engines 3          # 3
    python benchmarks/multi_engine.py --quick              # short phases (smoke test)

Each configuration starts its servers side by side in one memory cgroup (v1), held, once they are up,
to what they use then plus the total KV and a margin:

* ``static``: vanilla vLLM, each server with ``--kv-cache-memory-bytes`` = total / engines (what a user
  of vLLM does today: a fixed split decided at start-up);
* ``shared``: ``--attention-backend VTENSOR`` with ``VTENSOR_POOL`` of the same total, each server's own
  ceiling the whole total (the ceilings overcommit the pool).

Load: in phase ``busy-<i>`` engine i gets ``--clients`` closed-loop streaming clients and the others
none; in phase ``all`` every engine gets clients / engines. Requests are ~``--prompt-tokens`` random
token ids (no prefix shared) and ``--max-tokens`` greedy tokens. Per phase: output tokens/s over the
phase (issuing for ``--phase-s`` seconds, then draining), TTFT p50/p99, failed requests. Memory per
engine is sampled every 0.25 s: the pool's ledger for ``shared``; for ``static`` the KV each server
preallocated and the part its requests use (vLLM's ``kv_cache_usage_perc``). After each configuration:
the cgroup's limit hits and OOM kills, and whether every server is still up.

On a CUDA GPU (``--device cuda``, the default where one is seen) the engines share the GPU instead:
no cgroup (the GPU's memory is what is split or shared), a random-weight model of a real shape
(``--shape``, default Llama-3.2-1B's; ``--load-format dummy``, no tokenizer: requests and replies are
token ids), bfloat16, vanilla on vLLM's Triton attention,
VTENSOR on this project's kernels, the engines started one after another. Under
``benchmarks/gpu_vllm.sh`` (vLLM's Python source without its compiled ops) both run vLLM's native
layers (``VTENSOR_NO_VLLM_OPS=1``).

Prints a table, writes JSON and a PNG (memory per engine over time) to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import re
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import cgroup
from gpu_harness import CUSTOM_OPS, KERNEL_CONFIG, without_vllm_ops
from provenance import card_name, provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
MiB = 1 << 20


def start_servers(config: str, args, cg: cgroup.MemoryCgroup, pool: str) -> list:
    from vllm_vtensor.demo import Server

    per = args.kv_bytes // args.engines
    env = {k: v for k, v in os.environ.items() if k not in ("VTENSOR_POOL", "VTENSOR_POOL_BYTES")}
    if config == "shared":
        env |= {"VTENSOR_POOL": pool, "VTENSOR_POOL_BYTES": str(args.pool_bytes or args.kv_bytes)}
    servers = []
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    for i in range(args.engines):
        if not args.cuda and args.cores == "per-engine" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # engine i's worker computes on core i (vLLM's default, auto, puts every engine's worker on core 0)
            env = env | {"VLLM_CPU_OMP_THREADS_BIND": str(i % (os.cpu_count() or 1))}
        flags = ["--max-model-len", str(args.max_model_len), "--served-model-name", f"engine{i}",
                 "--enforce-eager", "--max-num-seqs", str(args.clients), *device_flags(args)]
        vtensor = ["--attention-backend", "VTENSOR"]
        if config == "shared":
            flags += [*vtensor, "--kv-cache-memory-bytes", str(args.ceiling_bytes or args.kv_bytes)]
        elif config == "vtensor_static":  # VTENSOR without a pool: the same split as vanilla's
            flags += [*vtensor, "--kv-cache-memory-bytes", str(per)]
        else:
            flags += ["--kv-cache-memory-bytes", str(per)] + (["--attention-backend", "TRITON_ATTN"] if args.cuda else [])
        s = Server(args.model, flags, log_path=str(Path(args.log_dir) / f"multi_engine-{config}-{i}.log"), env=env)
        if cg is not None:
            s.args = cg.enter(s.args)
        servers.append(s)
    if args.cuda:  # one after another: each engine sizes itself against the GPU memory the others left
        for s in servers:
            s.start(timeout=900)
    else:
        with cf.ThreadPoolExecutor(len(servers)) as ex:  # side by side: each waits for its /health
            list(ex.map(lambda s: s.start(timeout=900), servers))
    return servers


def device_name(args) -> str:
    if not args.cuda:
        return "cpu"
    import subprocess

    try:  # not through torch: this process makes no CUDA context on the GPU the engines share
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "cuda"
    except OSError:
        return "cuda"


def device_flags(args) -> list[str]:
    """The flags every server of a run gets for its device."""
    if not args.cuda:
        return ["--dtype", "float32"]
    flags = ["--dtype", "bfloat16", "--load-format", "dummy", "--skip-tokenizer-init",
             "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if without_vllm_ops():
        flags += ["--compilation-config", json.dumps({"custom_ops": CUSTOM_OPS}), "--kernel-config", json.dumps(KERNEL_CONFIG)]
    return flags


def _request(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, n = None, 0
    try:
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        for chunk in stream:
            new = len(getattr(chunk.choices[0], "token_ids", None) or []) if chunk.choices else 0
            if new:  # the tokens themselves: a server without a tokenizer sends no text
                n += new
                first = first or time.perf_counter()
    except Exception as e:  # a failed request is counted, never lost
        return {"ok": False, "error": repr(e)[:200], "start": t0}
    end = time.perf_counter()
    return {"ok": n > 0, "ttft": (first or end) - t0, "tokens": n, "start": t0, "end": end}


def run_phase(servers, clients_per: list[int], args, rng: random.Random) -> dict:
    from openai import OpenAI

    deadline = time.perf_counter() + args.phase_s
    done: list[list[dict]] = [[] for _ in servers]

    def client_loop(i: int, seed: int):
        client = OpenAI(base_url=servers[i].url + "/v1", api_key="unused", max_retries=0, timeout=600)
        r = random.Random(seed)
        while time.perf_counter() < deadline:
            prompt = [r.randrange(100, 40000) for _ in range(args.prompt_tokens)]
            done[i].append(_request(client, f"engine{i}", prompt, args.max_tokens))

    t0 = time.perf_counter()
    jobs = [(i, rng.randrange(1 << 30)) for i, n in enumerate(clients_per) for _ in range(n)]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        list(ex.map(lambda j: client_loop(*j), jobs))
    wall = time.perf_counter() - t0
    rows = []
    for i, reqs in enumerate(done):
        ok = [r for r in reqs if r["ok"]]
        ttft = sorted(r["ttft"] for r in ok)
        rows.append({"engine": i, "clients": clients_per[i], "requests": len(reqs), "failed": len(reqs) - len(ok),
                     "output_tokens": sum(r["tokens"] for r in ok),
                     "tok_s": sum(r["tokens"] for r in ok) / wall,
                     "ttft_p50_s": statistics.median(ttft) if ttft else None,
                     "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None})
    busy = [r for r in rows if r["clients"]]
    return {"wall_s": wall, "engines": rows, "tok_s": sum(r["tok_s"] for r in rows),
            "ttft_p99_s": max((r["ttft_p99_s"] or 0) for r in busy), "failed": sum(r["failed"] for r in rows)}


class MemorySampler:
    """KV memory per engine every 0.25 s: committed on the pool (shared) or preallocated and used (static)."""

    def __init__(self, config: str, servers, args, pool: str):
        self.config, self.servers, self.args = config, servers, args
        self.ledger = None
        if config == "shared":
            from vllm_vtensor.ledger import open_pool
            from vllm_vtensor.top import engines_of

            self.ledger = open_pool(pool, None, None)
            view = self.ledger.view()
            # each engine's entry: its engine core is a child of its server
            self.slot_engine = {e.slot: i for i, s in enumerate(servers) for e in engines_of(s.proc.pid, view)}
        self.samples, self.phase, self._stop = [], "", threading.Event()
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        per = self.args.kv_bytes // self.args.engines
        while not self._stop.wait(0.25):
            t = time.perf_counter() - self.t0
            row = {"t": round(t, 2), "phase": self.phase}
            if self.ledger is not None:
                v = self.ledger.view()
                for e in v.engines:
                    i = self.slot_engine.get(e.slot)
                    if i is not None:
                        row[f"held{i}"], row[f"used{i}"] = e.committed, e.used
                row["pool_committed"] = v.committed
            else:
                for i, s in enumerate(self.servers):
                    try:
                        m = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)", s.metrics(), re.M)
                        row[f"held{i}"], row[f"used{i}"] = per, int(float(m.group(1)) * per) if m else None
                    except OSError:
                        pass
            self.samples.append(row)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.samples


def run_config(config: str, args) -> dict:
    pool = f"bench-{uuid.uuid4().hex[:8]}"
    cg = None if args.cuda else cgroup.MemoryCgroup(f"vllm-vtensor-multi-{config}")
    servers = []
    try:
        servers = start_servers(config, args, cg, pool)
        # warm-up: one request per engine, then hold the tree to what it uses now plus the whole KV and a margin
        run_phase(servers, [1] * args.engines, argparse.Namespace(**{**vars(args), "phase_s": 0.1}), random.Random(0))
        if cg is not None:
            usage = cg.usage()
            limit = usage + args.kv_bytes + args.margin_bytes
            cg.hold(limit)
        sampler = MemorySampler(config, servers, args, pool)
        rng = random.Random(1)
        phases = {}
        names = args.phases.split(",") if args.phases else [f"busy-{i}" for i in range(args.engines)] + ["all"]
        for name in names:
            sampler.phase = name
            per = [args.clients if name == f"busy-{i}" else 0 for i in range(args.engines)]
            if name == "all":
                per = [max(1, args.clients // args.engines)] * args.engines
            phases[name] = run_phase(servers, per, args, rng)
            print(f"{config} {name}: {phases[name]['tok_s']:.1f} tok/s, TTFT p99 {phases[name]['ttft_p99_s']:.2f} s, "
                  f"{phases[name]['failed']} failed", flush=True)
        samples = sampler.stop()
        alive = [s.proc.poll() is None for s in servers]
        out = {"phases": phases, "memory": samples, "servers_alive": alive, "cgroup": None if cg is None else {
            "usage_before_load_bytes": usage, "limit_bytes": limit, "peak_bytes": cg.peak(),
            "limit_hits": cg.limit_hits(), "oom_kills": cg.oom_kills()}}
        if sampler.ledger is not None:  # exact, not sampled: how far the engines' total ever went past the pool
            out["pool_overdrawn_bytes"] = sampler.ledger.view().overdrawn
        return out
    finally:
        for s in servers:
            s.stop()
        if cg is not None:
            cg.close()
        if config == "shared":
            from vllm_vtensor.ledger import pool_path
            from vllm_vtensor.stats import private_folder

            pool_path(private_folder(), pool).unlink(missing_ok=True)


def compare(results: dict) -> dict:
    out = {}
    for name in results["static"]["phases"]:
        s, v = results["shared"]["phases"][name], results["static"]["phases"][name]
        out[name] = {"tok_s_ratio": s["tok_s"] / v["tok_s"],
                     "ttft_p99_ratio": s["ttft_p99_s"] / v["ttft_p99_s"] if v["ttft_p99_s"] else None}
    skewed = [r for name, r in out.items() if name.startswith("busy-")]
    out["goals"] = {
        "skewed_met": all(r["tok_s_ratio"] >= 1.3 or (r["ttft_p99_ratio"] or 9) <= 0.7 for r in skewed) if skewed else None,
        "balanced_met": out["all"]["tok_s_ratio"] >= 0.95 if "all" in out else None,  # within 5%, or better
        "no_failures": all(p["failed"] == 0 for c in results.values() for p in c["phases"].values()),
        "no_oom_kills": all((c["cgroup"] or {}).get("oom_kills", 0) == 0 and all(c["servers_alive"])
                            for c in results.values()),
        "pool_never_passed": results["shared"].get("pool_overdrawn_bytes") == 0,
    }
    return out


def _plot(results: dict, engines: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=False)
    for ax, config in zip(axes, ("static", "shared")):
        samples = results[config]["memory"]
        t = [s["t"] for s in samples]
        for i in range(engines):
            ax.plot(t, [(s.get(f"held{i}") or 0) / MiB for s in samples], label=f"engine {i}: KV held")
            ax.plot(t, [(s.get(f"used{i}") or 0) / MiB for s in samples], "--", label=f"engine {i}: used by requests")
        start = None
        for j, s in enumerate(samples):
            if j == 0 or s["phase"] != samples[j - 1]["phase"]:
                ax.axvline(s["t"], color="grey", lw=0.5)
                ax.text(s["t"], ax.get_ylim()[1] if start else 0, s["phase"], fontsize=8, va="bottom")
                start = s["t"]
        ax.set_title(f"{config}: " + ("vanilla vLLM, total KV split statically" if config == "static"
                                      else "VTENSOR, one shared pool (VTENSOR_POOL)"))
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda where torch sees a GPU (the engines share it), else cpu")
    ap.add_argument("--model", default=None, help="model folder (default: on a CPU SmolLM2-135M-Instruct, converted "
                    "locally; on CUDA the --shape config with dummy weights)")
    ap.add_argument("--shape", default="llama-3.2-1b", help="CUDA: the model's shape (vllm_vtensor.models.SHAPES)")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--kv-bytes", type=int, default=None,
                    help="total KV: the pool, or the sum of the split (default 192 MiB on a CPU, 2.5 GiB on CUDA)")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients on a busy engine (12; CUDA 64)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="(200; CUDA 1024)")
    ap.add_argument("--max-tokens", type=int, default=None, help="(96; CUDA 256)")
    ap.add_argument("--max-model-len", type=int, default=None, help="(1024; CUDA 2048)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="CUDA: each engine's share of the GPU")
    ap.add_argument("--pool-bytes", type=int, default=None, help="shared: the pool (default: --kv-bytes)")
    ap.add_argument("--ceiling-bytes", type=int, default=None, help="shared: each engine's ceiling (default: --kv-bytes)")
    ap.add_argument("--phase-s", type=float, default=None, help="(60; CUDA 30)")
    ap.add_argument("--margin-bytes", type=int, default=768 * MiB, help="cgroup headroom over usage + KV")
    ap.add_argument("--quick", action="store_true", help="10 s phases, half the clients")
    ap.add_argument("--configs", default="static,shared", help="static, shared, vtensor_static (VTENSOR, split)")
    ap.add_argument("--phases", default=None, help="e.g. all or busy-0,all (default: each engine busy, then all)")
    ap.add_argument("--cores", choices=("auto", "per-engine"), default="auto",
                    help="CPU: auto: vLLM's default binding (every engine's worker on core 0); per-engine: engine i's "
                         "worker computes on core i (modulo the cores; unless VLLM_CPU_OMP_THREADS_BIND is set)")
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--out", default=None, help="where the JSON (and PNG) go: a path, with or without .json "
                    "(default: benchmarks/results/multi_engine-<cpu or card>-<N>engines)")
    args = ap.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.cuda = args.device == "cuda"
    defaults = (dict(kv_bytes=5 * (1 << 29), clients=64, prompt_tokens=1024, max_tokens=256, max_model_len=2048,
                     phase_s=30.0) if args.cuda else
                dict(kv_bytes=192 * MiB, clients=12, prompt_tokens=200, max_tokens=96, max_model_len=1024, phase_s=60.0))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.phase_s, args.clients = 10.0, max(1, args.clients // 2)
    if args.model is None:
        from vllm_vtensor.models import build_shape_config, build_smollm2

        args.model = str(build_shape_config(args.shape) if args.cuda else build_smollm2())
    if not args.cuda and not cgroup.available():
        print(f"needs the cgroup v1 memory controller at {cgroup.ROOT} (writable: run as root)", file=sys.stderr)
        return 2
    results = {c: run_config(c, args) for c in args.configs.split(",")}
    meta = provenance("multi_engine.py", argv) | {
        "model": Path(args.model).name, "engines": args.engines, "kv_bytes": args.kv_bytes, "clients": args.clients,
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "phase_s": args.phase_s,
        "device": device_name(args), "server_flags": device_flags(args)}
    if args.cuda:
        meta |= {"gpu_memory_utilization": args.gpu_memory_utilization,
                 "harness": ("vLLM 0.32's Python source without its compiled CUDA ops (benchmarks/gpu_vllm.sh): native "
                             "torch layers for both, vLLM's Triton attention for vanilla, this project's kernels for "
                             "VTENSOR, no CUDA graphs (--enforce-eager)") if without_vllm_ops()
                            else "the installed vLLM, --enforce-eager"}
    else:
        meta["cores"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", args.cores)
    out = {"meta": meta, "results": results}
    if set(results) == {"static", "shared"}:
        out["comparison"] = compare(results)
    print(f"\n{'phase':<8} {'static tok/s':>12} {'shared tok/s':>12} {'ratio':>6} {'static p99':>10} "
          f"{'shared p99':>10} {'ratio':>6}")
    for name in results[next(iter(results))]["phases"]:
        row = {c: results[c]["phases"][name] for c in results}
        if "comparison" in out:
            cmp = out["comparison"][name]
            print(f"{name:<8} {row['static']['tok_s']:>12.1f} {row['shared']['tok_s']:>12.1f} {cmp['tok_s_ratio']:>6.2f} "
                  f"{row['static']['ttft_p99_s']:>10.2f} {row['shared']['ttft_p99_s']:>10.2f} "
                  f"{cmp['ttft_p99_ratio'] or 0:>6.2f}")
    for c, r in results.items():
        cg = r["cgroup"]
        print(f"{c}: " + (f"cgroup limit {cg['limit_bytes'] / MiB:.0f} MiB, peak {cg['peak_bytes'] / MiB:.0f} MiB, "
                          f"limit hits {cg['limit_hits']}, OOM kills {cg['oom_kills']}, " if cg else "")
              + f"servers alive {r['servers_alive']}, failed requests {sum(p['failed'] for p in r['phases'].values())}"
              + (f", pool overdrawn by {r['pool_overdrawn_bytes']} bytes" if "pool_overdrawn_bytes" in r else ""))
    if "comparison" in out:
        print("goals:", out["comparison"]["goals"])
    stem = Path(args.out.removesuffix(".json")) if args.out else \
        RESULTS / (f"multi_engine-{card_name(meta['device']) if args.cuda else 'cpu'}-{args.engines}engines"
                   + ("-quick" if args.quick else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(out, indent=1))
    if set(results) == {"static", "shared"}:
        _plot(results, args.engines, stem.with_name(stem.name + ".png"))
    print(f"wrote {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
