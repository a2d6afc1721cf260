"""VTENSOR end to end at a real model's size: vanilla vLLM and two VTENSOR engines, side by side.

    python benchmarks/gpu_e2e.py --shape llama-3.1-8b --out-dir DIR      # on a CUDA GPU (see gpu_vllm.sh)
    python benchmarks/gpu_e2e.py --shape tiny --quick --out-dir DIR      # on a CPU: a tiny llama, small workloads

The model is a real model's shape (``python -m vllm_vtensor.models shape NAME``: config.json only)
with vLLM's random weights (``load_format="dummy"``: no files, no download); requests go by token
ids, so no tokenizer is needed. Three engines live in this one process (each with its own engine
core and worker) and take turns on every workload, the order rotating:

* ``vanilla``: vLLM's own KV cache and attention (the Triton backend on CUDA, CPU_ATTN on a CPU);
* ``vtensor``: ``--attention-backend VTENSOR`` with this project's kernels (``VTENSOR_ATTENTION=triton``;
  on a CPU only under Triton's interpreter, so not by default there);
* ``vtensor_vllm_kernel``: VTENSOR's memory with vLLM's kernel over it (``VTENSOR_ATTENTION=vllm`` on
  CUDA, ``cpu`` on a CPU): what the memory management costs, apart from what the kernels gain;
* a variant of any, named ``BASE+NAME=VALUE[+...]`` in ``--engines`` (e.g.
  ``vtensor+VTENSOR_DEFERRED_UNMAP=1+block_size=64``): that engine with VTENSOR settings or vLLM engine
  arguments of its own, side by side with the others (its summary over vanilla under
  ``summaries_over_vanilla``).

Workloads (sizes for ``--quick`` are smaller):

Run in the order B, C, A (a run cut off by a time limit keeps the shorter ones):

(A) offline throughput: 256 requests, inputs 512-2048 tokens, 256 output tokens each; output tok/s,
    inter-token latency (ITL) p50/p99, TTFT;
(B) multi-turn chat: 32 conversations x 6 turns over one shared 1024-token system prompt, 250-350
    new tokens and a 128-token answer per turn (each turn's 32 requests submitted together);
    TTFT p50/p99 per turn and over all turns, ITL;
(C) long shared document: 16 requests over one 16384-token document, each with its own 256-token
    question, 128 output tokens, submitted together; TTFT p50/p99 and throughput;
(D) KV memory, per workload: the most bytes VTENSOR held (exact, from its KV space) against the
    most bytes the live tokens needed (each request's tokens counted, so shared prefixes count once
    per request: in (B) and (C) the need exceeds what any engine must hold), and after the load
    ended, how long until VTENSOR's memory fell to 5% of that peak (all of it, and what the prefix
    cache is not keeping). vanilla vLLM holds its whole KV space from start-up.

TTFT and ITL come from vLLM's per-request metrics (``disable_log_stats=False``): TTFT from arrival
at the front end to the first token there; ITL = (last token - first token) / (tokens - 1) in the
engine core. Each workload starts with every engine's prefix cache reset, so (B) and (C) hit only
what their own requests left.

Writes ``gpu-e2e-<card>-<shape>.json`` (after every workload, so a cut-off run keeps what it
measured) and ``.png`` to ``--out-dir``; the JSON's top-level ``summary`` holds the ratios
VTENSOR / vanilla and the goals.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu_harness import CUSTOM_OPS, KERNEL_CONFIG, without_vllm_ops
from provenance import card_name, provenance

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("vanilla", "vtensor", "vtensor_vllm_kernel")
VT_ENGINES = ("vtensor", "vtensor_vllm_kernel")
EXTENSION = "vllm_vtensor.worker.VTensorWorkerExtension"
GOALS = {  # VTENSOR (this project's kernels) over vanilla, on an H100/H200 at the 8B shape in bf16
    "throughput_ratio": (">=", 1.05),
    "itl_ratio": ("<=", 1.0),
    "multi_turn_ttft_ratio": ("<=", 0.75),
    "long_doc_ttft_ratio": ("<=", 0.6),
    "kv_committed_over_need": ("<=", 1.1),
    "seconds_to_5pct_after_load": ("<=", 2.0),
    "failed_requests": ("<=", 0),
}

# workload sizes: full, and --quick (a CPU's tiny model in a few minutes)
FULL = dict(a_requests=256, a_in=(512, 2048), a_out=256,
            b_convs=32, b_turns=6, b_system=1024, b_new=(250, 350), b_out=128,
            c_requests=16, c_doc=16384, c_question=256, c_out=128)
QUICK = dict(a_requests=8, a_in=(64, 256), a_out=16,
             b_convs=4, b_turns=3, b_system=128, b_new=(32, 64), b_out=8,
             c_requests=4, c_doc=1024, c_question=32, c_out=8)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _ratio(a, b):
    return b / a if a and b is not None else None


class Engine:
    """One vLLM engine of the comparison, with what it needs set in the environment at its start."""

    def __init__(self, name: str, spec: tuple[str, dict, dict], model: str, kw: dict, out_dir: Path, cuda: bool,
                 vtensor_env: dict | None = None):
        """``spec``: the ``--engines`` entry ``name`` read by :func:`parse_engine`."""
        from vllm import LLM

        self.name = name
        base, own_env, own_args = spec
        self.vtensor = base in VT_ENGINES
        vtensor_env = (vtensor_env or {}) | own_env
        env = {"VTENSOR_STEP_PROFILE_LABEL": name}
        args = dict(kw) | own_args
        if self.vtensor:
            self.stats_file = out_dir / f"stats-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"
            env |= vtensor_env | {"VTENSOR_STATS_FILE": str(self.stats_file),
                                  "VTENSOR_ATTENTION": "triton" if base == "vtensor" else ("vllm" if cuda else "cpu")}
            args |= dict(attention_backend="VTENSOR", worker_extension_cls=EXTENSION)
        elif cuda:
            args |= dict(attention_backend="TRITON_ATTN")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the engine core and its workers inherit these
        t0 = time.perf_counter()
        try:
            self.llm = LLM(model=model, **args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.start_s = time.perf_counter() - t0
        cfg = self.llm.llm_engine.vllm_config
        comp = cfg.compilation_config
        self.config = {
            "attention_backend": args.get("attention_backend") or "vLLM's default",
            "attention_kernel": env.get("VTENSOR_ATTENTION"),
            "vtensor_env": dict(vtensor_env) if self.vtensor else None,
            "own_engine_args": own_args,
            "block_size": cfg.cache_config.block_size,
            "prefix_caching": bool(cfg.cache_config.enable_prefix_caching),
            "chunked_prefill": bool(cfg.scheduler_config.enable_chunked_prefill),
            "async_scheduling": bool(getattr(cfg.scheduler_config, "async_scheduling", False)),
            "max_num_seqs": cfg.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "max_model_len": cfg.model_config.max_model_len,
            "torch_compile_mode": str(getattr(comp, "mode", None)),
            "cudagraph_mode": str(getattr(comp, "cudagraph_mode", None)),
            "enforce_eager": bool(cfg.model_config.enforce_eager),
            "kv_cache_memory_bytes": cfg.cache_config.kv_cache_memory_bytes,
            "start_seconds": round(self.start_s, 1),
        }
        print(f"{name} started in {self.start_s:.1f} s: {self.config}", flush=True)

    def kv(self) -> dict | None:
        """VTENSOR's KV-space figures, exact and current (from the worker); None for vanilla."""
        if not self.vtensor:
            return None
        return self.llm.collective_rpc("vtensor_stats")[0]

    def reset(self) -> None:
        """Before a workload: an empty prefix cache, and VTENSOR's peak figures started over."""
        self.llm.reset_prefix_cache()
        if self.vtensor:
            self.llm.collective_rpc("vtensor_reset_peaks")

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        """Submit ``prompts`` together; wall time, outputs and per-request TTFT / ITL."""
        from vllm import SamplingParams

        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        failed = 0
        try:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        except Exception as e:  # a failed batch counts every request in it as failed, and the run goes on
            print(f"{self.name}: a batch of {len(prompts)} requests failed: {e!r}", flush=True)
            return {"seconds": time.perf_counter() - t0, "outputs": [None] * len(prompts), "ttft": [], "itl": [],
                    "failed": len(prompts), "output_tokens": 0, "prompt_tokens": sum(map(len, prompts))}
        seconds = time.perf_counter() - t0
        ttft, itl, outputs = [], [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            outputs.append(ids)
            if len(ids) != max_tokens or c.finish_reason != "length":
                failed += 1
            m = o.metrics
            if m is not None and m.first_token_latency:
                ttft.append(m.first_token_latency)
                if len(ids) > 1 and m.last_token_ts > m.first_token_ts:
                    itl.append((m.last_token_ts - m.first_token_ts) / (len(ids) - 1))
        return {"seconds": seconds, "outputs": outputs, "ttft": ttft, "itl": itl, "failed": failed,
                "output_tokens": sum(map(len, outputs)), "prompt_tokens": sum(map(len, prompts))}

    def _watch(self, seconds: float, poll_s: float, until=None) -> list[tuple]:
        """VTENSOR's memory every ``poll_s`` for ``seconds`` (or until ``until(resident, cached)``):
        [(seconds since the call, resident, cached, mapped, running requests)]."""
        t0, series = time.perf_counter(), []
        while True:
            s = self.kv()
            t = time.perf_counter() - t0
            series.append((round(t, 3), s["resident_bytes"], s["cached_bytes"], s["mapped_bytes"], s["running_requests"]))
            if t >= seconds or (until and until(s["resident_bytes"], s["cached_bytes"])):
                return series
            time.sleep(poll_s)

    def settle(self, settle_s: float, poll_s: float = 0.05) -> dict | None:
        """After a workload: VTENSOR's exact peaks in it; its memory watched for ``settle_s`` seconds;
        then the prefix cache reset and its memory watched again until it is within 5% of the peak."""
        if not self.vtensor:
            return None
        first = self.kv()
        peak = first["peak_resident_bytes"]
        low = lambda res, cached: res <= 0.05 * peak  # noqa: E731
        series = self._watch(settle_s, poll_s)
        self.llm.reset_prefix_cache()
        after_reset = self._watch(settle_s, poll_s, until=low)

        def first_at(rows, pred):
            return next((t for t, res, cached, *_ in rows if pred(res, cached)), None)

        return {
            "peak_resident_bytes": peak,
            "peak_live_tokens": first["peak_live_tokens"],
            "seconds_to_5pct": first_at(series, low),
            "seconds_to_5pct_excluding_prefix_cache": first_at(series, lambda res, cached: res - cached <= 0.05 * peak),
            "seconds_to_5pct_after_prefix_cache_reset": first_at(after_reset, low),
            "resident_bytes_after": series[-1][1], "cached_bytes_after": series[-1][2],
            "mapped_bytes_after": series[-1][3], "running_requests_after": series[-1][4],
            "resident_bytes_after_prefix_cache_reset": after_reset[-1][1],
            "settle_series": series[::4] + ([series[-1]] if (len(series) - 1) % 4 else []),
            "reset_series": after_reset,
            "allocator": {k: first[k] for k in ("budget_bytes", "chunk_bytes", "block_size", "maps", "unmaps",
                                                "prefix_hit_bytes", "copied_bytes", "preemptions", "chunks_created",
                                                "chunks_created_on_demand", "step_seconds", "reserve_bytes",
                                                "mapped_ahead")},
        }

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()


def _order(names: list[str], i: int) -> list[str]:
    k = i % len(names)
    return names[k:] + names[:k]


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    # ids clear of the special tokens at both ends of a llama vocabulary
    lo, hi = min(1000, vocab // 8), vocab - min(1000, vocab // 8)
    return [rng.randrange(lo, hi) for _ in range(n)]


def _lat(run: dict) -> dict:
    return {"ttft_p50_s": _pct(run["ttft"], 50), "ttft_p99_s": _pct(run["ttft"], 99),
            "itl_p50_s": _pct(run["itl"], 50), "itl_p99_s": _pct(run["itl"], 99)}


def workload_a(engines: dict, w: dict, vocab: int, rounds: int, settle_s: float, checkpoint) -> dict:
    rng = random.Random(1)
    res = {n: {"rounds": []} for n in engines}
    for r in range(rounds):
        prompts = [_tokens(rng, rng.randint(*w["a_in"]), vocab) for _ in range(w["a_requests"])]
        for name in _order(list(engines), r):
            e = engines[name]
            e.reset()
            run = e.run(prompts, w["a_out"])
            row = {"seconds": run["seconds"], "output_tok_s": run["output_tokens"] / run["seconds"],
                   "total_tok_s": (run["output_tokens"] + run["prompt_tokens"]) / run["seconds"],
                   "failed": run["failed"]} | _lat(run)
            row["memory"] = e.settle(settle_s)
            res[name]["rounds"].append(row)
            checkpoint(res)
            print(f"(A) round {r + 1} {name}: {row['output_tok_s']:.0f} output tok/s, ITL p50 "
                  f"{(row['itl_p50_s'] or 0) * 1e3:.2f} ms, {run['failed']} failed", flush=True)
    for name, d in res.items():
        rows = d["rounds"]
        d |= {k: statistics.median(x[k] for x in rows if x[k] is not None) if any(x[k] is not None for x in rows)
              else None for k in ("output_tok_s", "total_tok_s", "ttft_p50_s", "itl_p50_s", "itl_p99_s")}
        d["failed"] = sum(x["failed"] for x in rows)
    return res


def workload_b(engines: dict, w: dict, vocab: int, settle_s: float, checkpoint) -> dict:
    rng = random.Random(2)
    system = _tokens(rng, w["b_system"], vocab)
    users = [[_tokens(rng, rng.randint(*w["b_new"]), vocab) for _ in range(w["b_turns"])] for _ in range(w["b_convs"])]
    history = {n: [list(system) for _ in range(w["b_convs"])] for n in engines}
    res = {n: {"turns": [], "failed": 0} for n in engines}
    for e in engines.values():
        e.reset()
    for turn in range(w["b_turns"]):
        for name in _order(list(engines), turn):
            e = engines[name]
            prompts = [h + users[i][turn] for i, h in enumerate(history[name])]
            run = e.run(prompts, w["b_out"])
            for i, out in enumerate(run["outputs"]):
                history[name][i] = prompts[i] + (out or [])
            res[name]["turns"].append({"seconds": run["seconds"], "ttft": run["ttft"], "itl": run["itl"],
                                       "context_tokens_max": max(map(len, prompts))} | _lat(run))
            res[name]["failed"] += run["failed"]
            if turn == w["b_turns"] - 1:
                res[name]["memory"] = e.settle(settle_s)
            checkpoint({n: {"turns": [{k: v for k, v in x.items() if k not in ("ttft", "itl")} for x in d["turns"]]}
                        for n, d in res.items()})
        print(f"(B) turn {turn + 1}: TTFT p50 " + ", ".join(
            f"{n} {res[n]['turns'][-1]['ttft_p50_s'] * 1e3:.1f} ms" for n in engines
            if res[n]["turns"][-1]["ttft_p50_s"] is not None), flush=True)
    for d in res.values():
        ttft = [t for x in d["turns"] for t in x["ttft"]]
        itl = [t for x in d["turns"] for t in x["itl"]]
        d |= {"ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "ttft_mean_s": statistics.mean(ttft) if ttft else None,
              "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99)}
        for x in d["turns"]:  # the per-request lists are summarised; keep the JSON small
            del x["ttft"], x["itl"]
    return res


def workload_c(engines: dict, w: dict, vocab: int, rounds: int, settle_s: float, checkpoint) -> dict:
    rng = random.Random(3)
    res = {n: {"rounds": []} for n in engines}
    for r in range(rounds):
        doc = _tokens(rng, w["c_doc"], vocab)
        prompts = [doc + _tokens(rng, w["c_question"], vocab) for _ in range(w["c_requests"])]
        for name in _order(list(engines), r):
            e = engines[name]
            e.reset()
            run = e.run(prompts, w["c_out"])
            row = {"seconds": run["seconds"], "output_tok_s": run["output_tokens"] / run["seconds"],
                   "failed": run["failed"]} | _lat(run)
            row["memory"] = e.settle(settle_s)
            res[name]["rounds"].append(row)
            checkpoint(res)
            print(f"(C) round {r + 1} {name}: TTFT p50 {(row['ttft_p50_s'] or 0) * 1e3:.1f} ms, "
                  f"{row['output_tok_s']:.0f} output tok/s", flush=True)
    for d in res.values():
        rows = d["rounds"]
        d |= {k: statistics.median(x[k] for x in rows if x[k] is not None) if any(x[k] is not None for x in rows)
              else None for k in ("output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s")}
        d["failed"] = sum(x["failed"] for x in rows)
    return res


def _memory(results: dict, engines: dict, bytes_per_token: int) -> dict:
    """(D) per workload: peak committed against peak need, and the give-back after the load."""
    out = {}
    for wl in ("A", "B", "C"):
        if wl not in results:
            continue
        out[wl] = {}
        for name in engines:
            d = results[wl][name]
            mems = [x["memory"] for x in d.get("rounds", [])] + ([d["memory"]] if "memory" in d else [])
            mems = [m for m in mems if m]
            if not mems:
                continue
            peak = max(m["peak_resident_bytes"] for m in mems)
            need = max(m["peak_live_tokens"] for m in mems) * bytes_per_token

            def worst(key):
                vals = [m[key] for m in mems]
                return None if any(v is None for v in vals) else max(vals)

            out[wl][name] = {"peak_committed_bytes": peak, "peak_need_bytes": need,
                             "committed_over_need": peak / need if need else None,
                             "seconds_to_5pct": worst("seconds_to_5pct"),
                             "seconds_to_5pct_excluding_prefix_cache": worst("seconds_to_5pct_excluding_prefix_cache"),
                             "seconds_to_5pct_after_prefix_cache_reset": worst("seconds_to_5pct_after_prefix_cache_reset"),
                             "resident_bytes_after": max(m["resident_bytes_after"] for m in mems),
                             "resident_bytes_after_prefix_cache_reset":
                                 max(m["resident_bytes_after_prefix_cache_reset"] for m in mems)}
        kv = engines["vanilla"].config["kv_cache_memory_bytes"] if "vanilla" in engines else None
        need = next((v["peak_need_bytes"] for v in out[wl].values()), None)
        if kv and need:
            out[wl]["vanilla"] = {"peak_committed_bytes": kv, "peak_need_bytes": need, "committed_over_need": kv / need,
                                  "seconds_to_5pct": None, "note": "vLLM allocates its whole KV space at start-up"}
    return out


def _summary(results: dict, memory: dict, vt: str, base: str = "vanilla") -> dict:
    a, b, c = results.get("A", {}), results.get("B", {}), results.get("C", {})
    get = lambda d, n, k: d.get(n, {}).get(k)  # noqa: E731
    s = {
        "throughput_ratio": _ratio(get(a, base, "output_tok_s"), get(a, vt, "output_tok_s")),
        "itl_ratio": _ratio(get(a, base, "itl_p50_s"), get(a, vt, "itl_p50_s")),
        "multi_turn_ttft_ratio": _ratio(get(b, base, "ttft_p50_s"), get(b, vt, "ttft_p50_s")),
        "multi_turn_ttft_p99_ratio": _ratio(get(b, base, "ttft_p99_s"), get(b, vt, "ttft_p99_s")),
        "multi_turn_ttft_mean_ratio": _ratio(get(b, base, "ttft_mean_s"), get(b, vt, "ttft_mean_s")),
        "multi_turn_ttft_ratio_per_turn": [_ratio(x["ttft_p50_s"], y["ttft_p50_s"]) for x, y in
                                           zip(get(b, base, "turns") or [], get(b, vt, "turns") or [])],
        "multi_turn_itl_ratio": _ratio(get(b, base, "itl_p50_s"), get(b, vt, "itl_p50_s")),
        "long_doc_ttft_ratio": _ratio(get(c, base, "ttft_p50_s"), get(c, vt, "ttft_p50_s")),
        "long_doc_throughput_ratio": _ratio(get(c, base, "output_tok_s"), get(c, vt, "output_tok_s")),
    }
    if "A" in memory and vt in memory["A"]:  # (A) has no shared prefixes: the need is what must be held
        s["kv_committed_over_need"] = memory["A"][vt]["committed_over_need"]
    secs = [memory[w][vt]["seconds_to_5pct"] for w in memory if vt in memory[w]]
    s["seconds_to_5pct_after_load"] = None if not secs or None in secs else max(secs)
    secs = [memory[w][vt]["seconds_to_5pct_excluding_prefix_cache"] for w in memory if vt in memory[w]]
    s["seconds_to_5pct_after_load_excluding_prefix_cache"] = None if not secs or None in secs else max(secs)
    secs = [memory[w][vt]["seconds_to_5pct_after_prefix_cache_reset"] for w in memory if vt in memory[w]]
    s["seconds_to_5pct_after_prefix_cache_reset"] = None if not secs or None in secs else max(secs)
    return s


def _goals(summary: dict) -> dict:
    out = {}
    for k, (op, bound) in GOALS.items():
        v = summary.get(k)
        out[k] = {"goal": f"{op} {bound}", "value": v,
                  "met": None if v is None else (v >= bound if op == ">=" else v <= bound)}
    return out


def _step_profile() -> dict | None:
    """Where each engine's step time went, when the run was profiled ($VTENSOR_STEP_PROFILE, see
    benchmarks/step_profile/): host milliseconds per step in the worker (execute_model; on CUDA it
    returns once the step is launched), VTENSOR's block updates within them, and the VMM backend calls
    those updates made (``block_update_calls``) and other threads made beside them (``calls_beside``),
    as ``{call: {"calls": n, "seconds": s}}``."""
    directory = os.environ.get("VTENSOR_STEP_PROFILE")
    if not directory:
        return None
    sys.path.insert(0, str(ROOT / "benchmarks" / "step_profile"))
    from report import by_kind, load, op_totals

    def calls(ops: dict) -> dict:
        return {k: {"calls": n, "seconds": round(s, 4)} for k, (n, s) in sorted(ops.items())}

    out = {}
    for engine, rows in load(directory).items():
        slow = sorted(rows, key=lambda r: -r[2])[:5]
        out[engine] = {"steps": len(rows), "step_host_seconds": round(sum(r[1] for r in rows) / 1e3, 3),
                       "block_update_seconds": round(sum(r[2] for r in rows) / 1e3, 3),
                       "slowest_block_updates_ms": [(round(r[2], 1), r[3]) for r in slow],
                       "block_update_calls": calls(op_totals(rows, 4)), "calls_beside": calls(op_totals(rows, 5)),
                       "by_step_kind": {kind: {"steps": len(rs), "block_update_seconds": round(sum(r[2] for r in rs) / 1e3, 3),
                                               "block_update_calls": calls(op_totals(rs, 4))}
                                        for kind, rs in by_kind(rows).items()}}
    return out


GiB = 1 << 30
DEFAULT_KV_BYTES = 20 * GiB  # each engine's KV budget on CUDA, where the card holds them all
DEFAULT_GPU_SHARE = 0.28  # each engine's gpu_memory_utilization, the same
USABLE = 0.92  # of the card's memory, for all the engines together
ENGINE_OVERHEAD = 4 * GiB  # per engine beyond weights and KV: activations, CUDA graphs, torch and driver state


def weight_bytes(hf: dict, itemsize: int) -> int:
    """A llama-shaped model's weights from its config (embedding, lm_head unless tied, attention, MLP, norms)."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or h // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * head_dim, hf["num_key_value_heads"] * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * hf["intermediate_size"] + 2 * h
    table = hf["vocab_size"] * h * (1 if hf.get("tie_word_embeddings") else 2)
    return (table + layers * per_layer + h) * itemsize


def fit_engines(card_bytes: int | None, weights: int, engines: int) -> tuple[int, float, str]:
    """Each engine's KV budget and memory share on a card of ``card_bytes``: the defaults where all the
    engines fit with them (an H200 with three at the 8B shape), else what fits (an H100), with why.
    Raises SystemExit naming the fix where less than 2 GiB of KV per engine would fit."""
    need = engines * (weights + DEFAULT_KV_BYTES + ENGINE_OVERHEAD)
    if card_bytes is None or need <= USABLE * card_bytes:
        return DEFAULT_KV_BYTES, DEFAULT_GPU_SHARE, "default"
    share = USABLE / engines
    kv = int(share * card_bytes) - weights - ENGINE_OVERHEAD
    if kv < 2 * GiB:
        raise SystemExit(f"{engines} engines of {weights / GiB:.1f} GiB of weights leave {max(kv, 0) / GiB:.1f} GiB of KV "
                         f"each on a {card_bytes / GiB:.0f} GiB card: run fewer engines (--engines) or a smaller "
                         "--shape, or give --kv-bytes")
    kv = kv // (2 << 20) * (2 << 20)
    return kv, round(share, 3), (f"fitted to the card: {engines} x ({weights / GiB:.1f} GiB weights + 20 GiB KV + "
                                 f"{ENGINE_OVERHEAD / GiB:.0f} GiB) > {USABLE:.0%} of {card_bytes / GiB:.0f} GiB")


def _card_bytes() -> int | None:
    """The card's memory from nvidia-smi (MiB), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return int(out) << 20 if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _device(cuda: bool) -> str:
    """The card's name from nvidia-smi (no CUDA context in this process: the engines' workers hold theirs)."""
    if not cuda:
        return platform.processor() or "cpu"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "cuda"
    except (OSError, subprocess.SubprocessError):
        return "cuda"


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, names = data["results"], data["engines_run"]
    palette = iter(["#d62", "#a4c", "#2aa", "#cb3"])
    colors = {"vanilla": "#888", "vtensor": "#2a7", "vtensor_vllm_kernel": "#46c"}
    colors |= {n: next(palette, "#555") for n in names if n not in colors}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    if "A" in res:
        axes[0].bar(names, [res["A"][n]["output_tok_s"] or 0 for n in names], color=[colors[n] for n in names])
        axes[0].set_title("(A) offline output tok/s")
        axes[0].tick_params(axis="x", labelrotation=15)
    if "B" in res:
        for n in names:
            axes[1].plot(range(1, len(res["B"][n]["turns"]) + 1),
                         [(x["ttft_p50_s"] or 0) * 1e3 for x in res["B"][n]["turns"]], marker="o", label=n,
                         color=colors[n])
        axes[1].set_title("(B) multi-turn TTFT p50 per turn, ms")
        axes[1].set_xlabel("turn")
        axes[1].legend(fontsize=8)
    if "C" in res:
        axes[2].bar(names, [(res["C"][n]["ttft_p50_s"] or 0) * 1e3 for n in names], color=[colors[n] for n in names])
        axes[2].set_title("(C) long shared document: TTFT p50, ms")
        axes[2].tick_params(axis="x", labelrotation=15)
    mem = data.get("memory", {})
    if mem:
        wls = list(mem)
        width = 0.8 / (len(names) + 1)
        gib = 1 << 30
        for i, n in enumerate(names):
            axes[3].bar([j + i * width for j in range(len(wls))],
                        [mem[w].get(n, {}).get("peak_committed_bytes", 0) / gib for w in wls], width, label=n,
                        color=colors[n])
        axes[3].bar([j + len(names) * width for j in range(len(wls))],
                    [next((v["peak_need_bytes"] for v in mem[w].values()), 0) / gib for w in wls], width,
                    label="live tokens need", color="#c84")
        axes[3].set_xticks([j + 0.4 for j in range(len(wls))], [f"({w})" for w in wls])
        axes[3].set_title("(D) peak KV committed vs need, GiB")
        axes[3].legend(fontsize=8)
    fig.suptitle(f"{data['shape']} ({data['dtype']}) on {data['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_table(data: dict) -> None:
    res, names = data["results"], data["engines_run"]
    print(f"\n{data['shape']} ({data['dtype']}) on {data['device']}; ratios are each engine over vanilla")
    print(f"{'':34}" + "".join(f"{n:>22}" for n in names))

    def row(label, wl, key, scale=1.0, fmt=".1f"):
        if wl not in res:
            return
        base = res[wl].get("vanilla", {}).get(key)
        cells = []
        for n in names:
            v = res[wl][n].get(key)
            r = f" ({v / base:.2f}x)" if v is not None and base and n != "vanilla" else ""
            cells.append(f"{v * scale:{fmt}}{r}" if v is not None else "-")
        print(f"{label:34}" + "".join(f"{c:>22}" for c in cells))

    row("(A) output tok/s", "A", "output_tok_s")
    row("(A) ITL p50, ms", "A", "itl_p50_s", 1e3, ".2f")
    row("(A) TTFT p50, s", "A", "ttft_p50_s", 1, ".2f")
    row("(B) TTFT p50 all turns, ms", "B", "ttft_p50_s", 1e3)
    row("(B) TTFT p99 all turns, ms", "B", "ttft_p99_s", 1e3)
    row("(B) ITL p50, ms", "B", "itl_p50_s", 1e3, ".2f")
    row("(C) TTFT p50, ms", "C", "ttft_p50_s", 1e3)
    row("(C) output tok/s", "C", "output_tok_s")
    gib = 1 << 30
    for wl, per in data.get("memory", {}).items():
        cells = []
        for n in names:
            m = per.get(n)
            cells.append(f"{m['peak_committed_bytes'] / gib:.2f} ({m['committed_over_need']:.2f}x)"
                         if m and m.get("committed_over_need") else "-")
        print(f"{'(D) ' + wl + ' peak KV GiB (x need)':34}" + "".join(f"{c:>22}" for c in cells))
        cells = []
        for n in names:
            m = per.get(n) or {}
            ts = [m.get(k) for k in ("seconds_to_5pct", "seconds_to_5pct_excluding_prefix_cache",
                                     "seconds_to_5pct_after_prefix_cache_reset")]
            cells.append("never" if n == "vanilla" else " / ".join("-" if t is None else f"{t:.2f}" for t in ts))
        print(f"{'(D) ' + wl + ' s to 5%: all/uncached/reset':34}" + "".join(f"{c:>22}" for c in cells))
    print("\nsummary (vtensor / vanilla): " + json.dumps({k: v for k, v in data["summary"].items()
                                                        if not isinstance(v, list)}, default=str))


def parse_settings(items: list[str]) -> dict:
    """``NAME=VALUE`` items as a dict, each checked by the plugin's settings module (ValueError names the
    fix: a name it does not know or a value it refuses is a usage error, not a failed engine start later)."""
    from vllm_vtensor import settings

    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("VTENSOR_"):
            raise ValueError(f"{item!r}: give NAME=VALUE with a VTENSOR_ setting's name")
        settings.parse_env(name, value)
        env[name] = value
    return env


def _engine_arg(item: str) -> tuple[str, object]:
    """``name=value`` for one of vLLM's engine arguments (``EngineArgs``' fields; the value read as JSON
    where it parses, else kept as text)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    name, _, value = item.partition("=")
    if name not in {f.name for f in dataclasses.fields(EngineArgs)}:
        raise ValueError(f"{item!r}: {name!r} is neither a VTENSOR_ setting nor one of vLLM's engine arguments")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def parse_engine(spec: str) -> tuple[str, dict, dict]:
    """An ``--engines`` entry, ``BASE`` or ``BASE+NAME=VALUE[+...]``: (BASE, its own VTENSOR settings, its own
    engine arguments), e.g. ``vtensor+VTENSOR_DEFERRED_UNMAP=1+block_size=64``."""
    base, *items = spec.split("+")
    if base not in ENGINES:
        raise ValueError(f"{spec!r}: an engine is one of {', '.join(ENGINES)}, optionally with +NAME=VALUE")
    if any("=" not in item for item in items):
        raise ValueError(f"{spec!r}: give each of an engine's own settings as +NAME=VALUE")
    env_items = [item for item in items if item.startswith("VTENSOR_")]
    if env_items and base not in VT_ENGINES:
        raise ValueError(f"{spec!r}: only a VTENSOR engine ({', '.join(VT_ENGINES)}) takes VTENSOR settings")
    return base, parse_settings(env_items), dict(_engine_arg(item) for item in items if item not in env_items)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b", help="a model shape of vllm_vtensor.models.SHAPES")
    p.add_argument("--model", default=None, help="a model folder instead of --shape (its weights are still dummy)")
    p.add_argument("--engines", default=None,
                   help="comma-separated, of " + ", ".join(ENGINES) + " (default: all three on CUDA; on a CPU "
                   "vanilla,vtensor_vllm_kernel, since this project's kernels run there only under Triton's interpreter); "
                   "an engine may carry settings and engine arguments of its own: "
                   "vtensor+VTENSOR_DEFERRED_UNMAP=1+block_size=64")
    p.add_argument("--workloads", default="ABC", help="which of A, B, C to run (D is measured within each)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    p.add_argument("--kv-bytes", default=None, type=int,
                   help="each engine's KV budget (kv_cache_memory_bytes); default 20 GiB on CUDA where the card holds "
                   "every engine with it (an H200 at the 8B shape), else what fits (recorded); 1 GiB on a CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="each engine's share of the GPU (the engines run side by side on one device); default 0.28, "
                   "or the card's share per engine where the KV budget was fitted to it")
    p.add_argument("--max-num-seqs", type=int, default=128,
                   help="the same for every engine (default 128). VTENSOR reserves a virtual range of max_model_len per "
                   "sequence and maps the zero granule over all of it: at 256 x 16896 tokens of the 8B shape (528 GiB each) "
                   "the second VTENSOR engine on one H200 could not map its range (CUDA_ERROR_OUT_OF_MEMORY)")
    p.add_argument("--rounds-a", type=int, default=1)
    p.add_argument("--rounds-c", type=int, default=2)
    p.add_argument("--settle-s", type=float, default=3.0, help="how long memory is watched after each load")
    p.add_argument("--engine-json", default="{}", help="more LLM(...) arguments for every engine, as JSON")
    p.add_argument("--vtensor-block-size", type=int, default=None,
                   help="the VTENSOR engines' block size (default: VTENSOR's choice, 16 at the 8B shape on CUDA): a "
                   "larger block maps fewer, larger chunks")
    p.add_argument("--vtensor-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a VTENSOR setting for the VTENSOR engines' environment (repeatable), e.g. "
                   "VTENSOR_DEFERRED_UNMAP=1; recorded in each engine's config")
    p.add_argument("--quick", action="store_true", help="small workloads (a CPU's tiny model)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="result file name without suffix (default gpu-e2e-<card>-<shape>[-<tag>])")
    p.add_argument("--tag", default=None, help="a variant's name appended to the default file name (e.g. deferred-unmap)")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    names = args.engines.split(",") if args.engines else (list(ENGINES) if cuda else ["vanilla", "vtensor_vllm_kernel"])
    try:
        specs = {n: parse_engine(n) for n in names}
    except ValueError as e:
        p.error(f"--engines {e}")
    if "vanilla" not in names or len(names) < 2 or len(set(names)) < len(names):
        p.error(f"--engines: vanilla and at least one of {', '.join(VT_ENGINES)}, each once")
    if set(args.workloads.upper()) - set("ABC") or not args.workloads:
        p.error("--workloads: some of A, B, C")
    try:
        vtensor_env = parse_settings(args.vtensor_env)
    except ValueError as e:
        p.error(f"--vtensor-env {e}")
    w = dict(QUICK if args.quick else FULL)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from vllm_vtensor import stats
    from vllm_vtensor.models import build_shape_config

    stats.ensure_stats_path()
    model = args.model or str(build_shape_config(args.shape))
    hf = json.loads((Path(model) / "config.json").read_text())
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    itemsize = 4 if dtype in ("float32", "float") else 2
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    bytes_per_token = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head_dim * itemsize
    max_len = max(w["a_in"][1] + w["a_out"], w["b_system"] + w["b_turns"] * (w["b_new"][1] + w["b_out"]),
                  w["c_doc"] + w["c_question"] + w["c_out"])
    max_len = -(-max_len // 256) * 256
    kv_bytes, gpu_share = args.kv_bytes or (1 << 30), args.gpu_memory_utilization
    sized = "given" if args.kv_bytes else "default"
    if cuda and not args.kv_bytes:
        try:
            weights = weight_bytes(hf, itemsize)
        except KeyError:  # not a llama-shaped config: the defaults, as on a card that holds them
            weights = 0
        kv_bytes, fitted_share, sized = fit_engines(_card_bytes() if weights else None, weights, len(names))
        gpu_share = args.gpu_memory_utilization or fitted_share
        if sized != "default":
            print(f"each engine: {kv_bytes / 2**30:.1f} GiB of KV, gpu_memory_utilization {gpu_share} ({sized})",
                  flush=True)
    kw = dict(dtype=dtype, load_format="dummy", skip_tokenizer_init=True, max_model_len=max_len, seed=0,
              max_num_seqs=args.max_num_seqs, disable_log_stats=False, kv_cache_memory_bytes=kv_bytes)
    if cuda:
        # torch.compile off (mode 0), decode steps replayed from full CUDA graphs: what VTENSOR's CUDA tests cover
        kw |= dict(gpu_memory_utilization=gpu_share or DEFAULT_GPU_SHARE,
                   compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})
        if without_vllm_ops():
            kw["compilation_config"]["custom_ops"] = list(CUSTOM_OPS)
            kw["kernel_config"] = copy.deepcopy(KERNEL_CONFIG)
    else:
        kw |= dict(enforce_eager=True)
    for k, v in json.loads(args.engine_json).items():
        kw[k] = (kw.get(k) or {}) | v if isinstance(v, dict) else v

    device = _device(cuda)
    name = args.name or (f"gpu-e2e-{card_name(device) if cuda else 'cpu'}-{args.shape if not args.model else Path(model).name}"
                         + (f"-{args.tag}" if args.tag else ""))
    out, png = out_dir / f"{name}.json", out_dir / f"{name}.png"
    data = {
        **provenance("gpu_e2e.py", argv),
        "device": device, "shape": args.shape if not args.model else model,
        "model_config": {k: hf.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")},
        "dtype": dtype, "kv_bytes_per_token": bytes_per_token, "workload_sizes": w,
        "harness": ("vLLM 0.32's Python source without its compiled CUDA ops (benchmarks/gpu_vllm.sh): native torch "
                    "layers for every engine, vLLM's Triton attention for vanilla, no FlashAttention, no torch.compile"
                    if without_vllm_ops() else "the installed vLLM"),
        "engine_kwargs": kw, "kv_budget_sized": sized, "engines_run": names, "engines": {}, "results": {},
        "partial": True,
    }

    def save():
        if data["results"]:
            data["memory"] = _memory(data["results"], engines, bytes_per_token)
            primary = next(n for n in (*VT_ENGINES, *names) if n in names and n != "vanilla")  # vtensor first
            data["summary"] = _summary(data["results"], data["memory"], primary)
            data["summary_engine"] = primary
            vk = [n for n in VT_ENGINES if n in names]
            if len(vk) == 2:  # what the kernels gain over vLLM's on the same memory
                data["summary_vllm_kernel_over_vanilla"] = _summary(data["results"], data["memory"], vk[1])
                data["summary_vtensor_over_vllm_kernel"] = _summary(data["results"], data["memory"], vk[0], vk[1])
            variants = [n for n in names if n not in ENGINES]
            if variants:  # engines with settings of their own, each over vanilla
                data["summaries_over_vanilla"] = {n: _summary(data["results"], data["memory"], n) for n in variants}
            fails = sum(data["results"][wl][n].get("failed", 0) for wl in data["results"] for n in names)
            data["summary"]["failed_requests"] = fails
            data["goals"] = _goals(data["summary"])
        out.write_text(json.dumps(data, indent=2, default=str))

    engines: dict[str, Engine] = {}
    t_start = time.perf_counter()
    try:
        for n in names:
            try:
                vt = specs[n][0] in VT_ENGINES
                ekw = kw | ({"block_size": args.vtensor_block_size} if args.vtensor_block_size and vt else {})
                engines[n] = Engine(n, specs[n], model, ekw, out_dir, cuda, vtensor_env)
                data["engines"][n] = engines[n].config
            except Exception as e:  # the others still run; the result says why this one is missing
                print(f"{n} failed to start: {e!r}", flush=True)
                data["engines"][n] = {"error": repr(e)[-2000:]}
            out.write_text(json.dumps(data, indent=2, default=str))
        names[:] = data["engines_run"] = [n for n in names if n in engines]
        if "vanilla" not in engines or len(engines) < 2:
            raise SystemExit(f"nothing to compare: engines that started: {list(engines)} (see {out})")
        vocab = hf["vocab_size"]
        warm = random.Random(0)
        for e in engines.values():  # compile each kernel variant once, outside the measurements
            e.run([_tokens(warm, n, vocab) for n in (w["a_in"][0], w["a_in"][1], w["b_system"] + 40)], 8)
            e.run([_tokens(warm, w["c_question"], vocab)], 4)
        print(f"engines ready after {time.perf_counter() - t_start:.0f} s", flush=True)
        # the shorter workloads first: a run cut off by a time limit keeps them (and the rounds it finished
        # of the one it was in, raw, under "unfinished")
        for wl in sorted(args.workloads.upper(), key="BCA".index):
            def checkpoint(raw, wl=wl):
                data["unfinished"] = {wl: raw}
                out.write_text(json.dumps(data, indent=2, default=str))

            if wl == "A":
                data["results"]["A"] = workload_a(engines, w, vocab, args.rounds_a, args.settle_s, checkpoint)
            elif wl == "B":
                data["results"]["B"] = workload_b(engines, w, vocab, args.settle_s, checkpoint)
            else:
                data["results"]["C"] = workload_c(engines, w, vocab, args.rounds_c, args.settle_s, checkpoint)
            data.pop("unfinished", None)
            save()
        data["partial"] = False
        data["seconds"] = round(time.perf_counter() - t_start, 1)
        data["step_profile"] = _step_profile()
        save()
    finally:
        for e in engines.values():
            e.shutdown()
    _print_table(data)
    _plot(data, png)
    print(f"\nwrote {out} and {png} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
