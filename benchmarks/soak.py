"""Rounds of overload against `vllm serve`, with clients hanging up and long idle gaps: does memory
come back each time, and does the process's footprint stay flat from round to round?

    python benchmarks/soak.py                 # VTENSOR and vanilla vLLM, 5 rounds of 48 streams, 128 MiB KV
    python benchmarks/soak.py --quick         # VTENSOR only, 2 rounds of 12 streams (the test suite's)

Each engine runs as its own server (SmolLM2-135M, float32, one after the other). A round sends
``--streams`` concurrent streaming chats over one shared system prompt, with more KV than the budget
holds (vLLM preempts); a quarter of the clients hang up after a few tokens. Then the server is left
alone for ``--idle-s`` seconds (no request, no step) and measured: VTENSOR's resident, mapped and
cached KV bytes and running requests, the worker's RSS and PSS, the whole server tree's RSS, the
worker's memfds. Round 1 fills the prefix cache; later rounds are compared with it (an idle
server's memory must not grow from round to round). After the server stops: no process of its
tree is left, and no snapshot file. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a patient assistant who answers questions about rivers in plain words. " * 8


def _gauges(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^(vllm_vtensor_\w+) (\S+)$", text, re.M)}


def _worker(server) -> psutil.Process | None:
    """The process that holds the KV cache: the tree's largest by RSS (vLLM's worker)."""
    root = psutil.Process(server.proc.pid)
    procs = [root, *root.children(recursive=True)]
    return max(procs, key=lambda p: p.memory_info().rss, default=None)


def _memfds(proc: psutil.Process) -> int:
    n = 0
    for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
        try:
            n += os.readlink(fd).startswith("/memfd:")
        except OSError:
            pass
    return n


def _pss(proc: psutil.Process) -> int:
    try:
        return proc.memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):
        return 0


def _round(client, model: str, streams: int, max_tokens: int, rnd: int) -> dict:
    def chat(i):
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Round {rnd}, question {i}: tell me about river number {i}."}]
        stream = client.chat.completions.create(model=model, messages=messages, stream=True, temperature=0,
                                                max_tokens=max_tokens, extra_body={"ignore_eos": True})
        if i % 4 == 3:  # a client that hangs up after a few tokens
            got = sum(1 for _ in zip(range(3), stream))
            stream.close()
            return "hung up", got
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return "answered", len(text)

    with cf.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(chat, range(streams)))
    return {"sent": streams, "answered": sum(r == "answered" for r, _ in results), "hung_up": sum(r == "hung up" for r, _ in results),
            "empty_answers": sum(r == "answered" and n == 0 for r, n in results)}


def _measure(server, worker: psutil.Process, name: str) -> dict:
    row = {"worker_rss_bytes": worker.memory_info().rss, "worker_pss_bytes": _pss(worker),
           "tree_rss_bytes": server.tree_rss_bytes(), "worker_memfds": _memfds(worker)}
    if name == "vtensor":
        g = _gauges(server.metrics())
        row |= {k: g.get(f"vllm_vtensor_{k}") for k in (
            "resident_bytes", "mapped_bytes", "cached_bytes", "reserve_bytes", "lingering_bytes",
            "running_requests", "budget_bytes", "chunk_bytes")}
        row["preemptions"] = g.get("vllm_vtensor_preemptions_total")
    return row


def run_engine(name: str, model: str, args) -> dict:
    from openai import OpenAI

    from vllm_vtensor.demo import Server

    flags = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
             "--kv-cache-memory-bytes", str(args.kv_bytes)] + (["--attention-backend", "VTENSOR"] if name == "vtensor" else [])
    log = Path(args.log_dir) / f"soak-{name}.log"
    rows = []
    with Server(model, flags, log_path=str(log)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        served = client.models.list().data[0].id
        worker = _worker(server)
        tree = {p.pid for p in [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]}
        # the snapshot file the API server chose (the first process the plugin loads in): in a folder of its own
        from vllm_vtensor.stats import private_folder_path

        snapshots = private_folder_path() / f"stats-{server.proc.pid}"
        for rnd in range(args.rounds + 1):  # round 0: nothing sent, the server as it started
            t0 = time.perf_counter()
            load = _round(client, served, args.streams, args.max_tokens, rnd) if rnd else {}
            busy_s = time.perf_counter() - t0
            time.sleep(args.idle_s if rnd else 1.0)
            row = {"round": rnd, "busy_s": round(busy_s, 1), **load, **_measure(server, worker, name)}
            # then the prefix cache reset (what an idle server can give back, and an operator can ask for)
            urllib.request.urlopen(urllib.request.Request(server.url + "/reset_prefix_cache", method="POST"), timeout=30)
            time.sleep(1.5)  # the freed memory lingers 1 s (VTENSOR_CHUNK_LINGER_S) before it goes back
            row["after_cache_reset"] = _measure(server, worker, name)
            rows.append(row)
            print(f"{name} round {rnd}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "round"), flush=True)
        stats_file_seen = (snapshots / "stats.json").exists()

    def alive():
        out = []
        for pid in tree:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + 30  # the engine core and worker exit after the API server, within seconds
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {"rows": rows, "processes_left": left,
            "stats_file_seen": stats_file_seen,
            # any snapshot file or folder of a process of the server's tree still there
            "stats_file_left": sorted(str(f) for pid in tree for f in private_folder_path().glob(f"stats-{pid}*")),
            "log": str(log)}


def check(result: dict, engine: str) -> dict:
    """What each round must show. Idle (cache kept): nothing running, mapped or lingering; the memory
    beyond the prefix cache back to the ready reserve. After the prefix-cache reset: the KV memory
    back to where the server started (the reserve, within a chunk), the worker's PSS and the tree's
    RSS within 5% of the server as it started. Throughout: the worker's memfds constant; after the
    server stops, no process of its tree and no snapshot file left."""
    rows = result["rows"]
    start = rows[0]["after_cache_reset"]
    resets = [r["after_cache_reset"] for r in rows[1:]]
    out = {"every_request_ended": all(r["answered"] + r["hung_up"] == r["sent"] and r["empty_answers"] == 0
                                      for r in rows[1:]),
           "tree_rss_after_reset_over_start": max(r["tree_rss_bytes"] for r in resets) / start["tree_rss_bytes"],
           "worker_pss_after_reset_over_start": (max(r["worker_pss_bytes"] for r in resets) / start["worker_pss_bytes"]
                                                 if start["worker_pss_bytes"] else None),
           "memfds_constant": len({r["worker_memfds"] for r in rows}) == 1,
           "processes_left": result["processes_left"], "stats_file_seen": result["stats_file_seen"],
           "stats_file_left": result["stats_file_left"]}
    out["footprint_within_5pct"] = out["tree_rss_after_reset_over_start"] <= 1.05 and (
        out["worker_pss_after_reset_over_start"] or 0) <= 1.05
    if engine == "vtensor":
        chunk = rows[0]["chunk_bytes"]
        out |= {"idle_after_every_round": all(r["running_requests"] == 0 and r["mapped_bytes"] == 0
                                              and r["lingering_bytes"] == 0 for r in rows[1:]),
                "idle_beyond_cache_is_the_reserve": all(
                    r["resident_bytes"] - r["cached_bytes"] <= r["reserve_bytes"] + chunk for r in rows[1:]),
                "kv_back_to_start_after_reset": all(r["resident_bytes"] <= start["resident_bytes"] + chunk
                                                    for r in resets),
                "within_budget": all(r["resident_bytes"] <= r["budget_bytes"] for r in rows)}
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the servers choose their own snapshot file, which must go with them (checked): a file named in
    # the environment (a caller's; an earlier test's) is the caller's to keep, so it is not inherited
    os.environ.pop("VTENSOR_STATS_FILE", None)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, built locally)")
    p.add_argument("--engines", default="vtensor,vanilla")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--streams", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--idle-s", type=float, default=10.0, help="seconds the server is left alone after each round")
    p.add_argument("--kv-bytes", type=int, default=128 << 20)
    p.add_argument("--quick", action="store_true", help="VTENSOR only, 2 rounds of 12 streams, 3 s idle")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak-cpu.json"))
    p.add_argument("--log-dir", default=None, help="server logs (default: a temporary folder, printed)")
    args = p.parse_args(argv)
    if args.quick:
        args.engines, args.rounds, args.streams, args.max_tokens, args.idle_s = "vtensor", 2, 12, 48, 3.0
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="vllm-vtensor-soak-")
    print(f"server logs in {args.log_dir}", flush=True)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from vllm_vtensor.models import build_smollm2

    model = args.model or str(build_smollm2())
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # POST /reset_prefix_cache
    data = {**provenance("soak.py", argv), "kv_bytes": args.kv_bytes, "rounds": args.rounds, "streams": args.streams,
            "idle_s": args.idle_s, "engines": {}}
    for name in args.engines.split(","):
        result = run_engine(name, model, args)
        result["checks"] = check(result, name)
        data["engines"][name] = result
        Path(args.out).write_text(json.dumps(data, indent=2))
    mib = 1 << 20
    print(f"\n{'engine':10}{'round':>6}{'answered':>9}{'hung up':>8}{'tree RSS MiB':>13}{'worker PSS MiB':>15}"
          f"{'KV resident MiB':>16}{'mapped':>8}{'running':>8}")
    for name, result in data["engines"].items():
        for r in result["rows"]:
            res = r.get("resident_bytes")
            print(f"{name:10}{r['round']:>6}{r.get('answered', '-'):>9}{r.get('hung_up', '-'):>8}"
                  f"{r['tree_rss_bytes'] / mib:>13.0f}{r['worker_pss_bytes'] / mib:>15.0f}"
                  f"{(res / mib if res is not None else float('nan')):>16.1f}{r.get('mapped_bytes', '-')!s:>8}"
                  f"{r.get('running_requests', '-')!s:>8}")
        print(f"{name} checks: {json.dumps(result['checks'])}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
