"""FlexInfer offload benchmark: decode tokens/s against the memory budget, each run in a cgroup.

    python benchmarks/offload.py                       # 1.65 GB random llama (float32), budgets 25/50/75/100%
    python benchmarks/offload.py --model smollm2 --budgets 0.5 --configs flexinfer,vanilla --tokens 16
    python benchmarks/offload.py --model smollm2 --dtype bfloat16   # bf16 weights in every engine (CPUs with AMX)

Every run is held to its budget by a cgroup v1 memory limit, page cache included:
once the engine has loaded and warmed up, the limit is set to ``budget + the
engine's own overhead in that run`` (its anonymous, shared and mapped memory
after warm-up minus the weights it holds - flexinfer's resident tensors and
arena, the weight file's pages mapped by the mmap baseline and llama.cpp - plus
64 MiB of headroom: see OwnOverhead); vanilla vLLM, whose weights cannot be told
from the rest of its memory, gets the budget + the overhead of an unlimited
flexinfer run at the smallest budget.  At 100% the limit is vanilla vLLM's own
steady footprint (its CPU weight packing holds more than the weights), so that
column compares speed at equal memory.  Loading itself runs unlimited, since vLLM's
CPU weight packing briefly holds two copies of every packed weight whatever the
loader (each run's load peak is recorded).  Tightening the limit after loading
matters for the mmap baseline: the page cache may then keep only what the
budget covers.  A run whose memory cannot be brought under the limit (the
kernel refuses to lower it) or that is killed by it is reported as over the
limit.  Every run starts with the page cache dropped.  Configurations: ``flexinfer``; its
ablations ``sync`` (no prefetch), ``threads`` (reads by a Python prefetch thread and reader pool instead
of glibc's AIO queued from the computing thread), ``no_balance``, ``attention_first``,
``ffn_first``, ``vllm_poll`` (the engine core waits for the worker with vLLM's ``sched_yield`` loop,
``VTENSOR_ENGINE_POLL_US=0``, instead of sleeping between checks) and ``poll_1ms`` (sleeping 1 ms
between checks instead of the default 200 us); ``mmap`` (every matrix mapped from the store, paged by the
kernel: the llama.cpp way); ``vanilla`` (vLLM's default loader); ``llamacpp`` (llama.cpp itself,
through llama-cpp-python in its own environment - ``benchmarks/llamacpp_setup.sh`` - on the same
weights converted to GGUF at the same precision by llama.cpp's converter, mapping the file as
llama.cpp does by default), held the same way (100% included: the same memory for weights as the
others); ``llamacpp_same_limit``: llama.cpp under the vLLM engines' limit (budget + vLLM's much
larger overhead, from an unlimited flexinfer run at the smallest budget, which leaves it room for
more of the weights).  The I/O
bound is disk bandwidth / bytes streamed per token, the bandwidth being the best
rate flexinfer's own read path reaches with no compute, measured before and after
the runs (each flexinfer row also records the rate its reads ran at).  The roof is the lower of
the I/O bound and the compute roof, flexinfer's own rate at 100% (the same model computed with
nothing streamed): where the compute takes longer than the reads, no engine reaches the I/O bound.
Each timed decode also records the kernel's counters for the disk holding the weights
(``/proc/diskstats``): bytes read per token and the share of the decode the disk was busy.  Needs root.
Prints a table, writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cgroup
from child_protocol import disk_activity, disk_counters, loaded_then_wait_for_go
from flexoffload.plan import DEFAULT_WINDOW

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "flexinfer": {},
    "sync": {"prefetch_window": 0},
    "threads": {"io_engine": "threads"},
    "gemv_onednn": {"gemv": "onednn"},  # one-token GEMMs through oneDNN, whatever choose_gemv would pick
    "no_expert_prefetch": {"expert_prefetch": False},  # a mixture of experts read only once routed to
    "packed_as_read": {"packed_experts": False},  # a mixture of experts packed for vLLM's kernel after each read
    "no_balance": {"policy": "no_balance"},
    "attention_first": {"policy": "attention_first"},
    "ffn_first": {"policy": "ffn_first"},
    "vllm_poll": {},  # with CONFIG_ENV's setting
    "poll_1ms": {},  # with CONFIG_ENV's setting
    "mmap": {"policy": "mmap"},
    "vanilla": None,
    "llamacpp": "llama.cpp",
    "llamacpp_same_limit": "llama.cpp",
}
CONFIG_ENV = {"vllm_poll": {"VTENSOR_ENGINE_POLL_US": "0"},  # settings a configuration's engine runs with
              "poll_1ms": {"VTENSOR_ENGINE_POLL_US": "1000"}}
LLAMA_CONFIGS = ("llamacpp", "llamacpp_same_limit")
LLAMA_PY = Path(__file__).resolve().parents[1] / ".venv-llamacpp" / "bin" / "python"
LLAMA_CONVERT = LLAMA_PY.parents[1] / "share" / "convert_hf_to_gguf.py"


DTYPES = {"float32": ("f32", 4), "bfloat16": ("bf16", 2)}  # --dtype -> llama.cpp's GGUF type, bytes per weight


def ensure_gguf(model: str, dtype: str = "float32") -> Path:
    """The model as GGUF in ``dtype`` (the precision the vLLM runs use), converted once by llama.cpp's
    own converter (with this environment's torch and transformers) into the cache folder."""
    from vllm_vtensor.settings import cache_dir

    outtype = DTYPES[dtype][0]
    out = cache_dir() / "gguf" / f"{Path(model).name}-{outtype}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        env = {**os.environ, "PYTHONPATH": str(LLAMA_CONVERT.with_name("gguf-py"))}  # llama.cpp's own gguf package
        subprocess.run([sys.executable, str(LLAMA_CONVERT), model, "--outtype", outtype, "--outfile", str(tmp)],
                       check=True, env=env)
        tmp.rename(out)
    return out


def child(args) -> None:
    """One engine: load, warm up, wait for the parent's go (it tightens the limit), decode, report."""
    from vllm import LLM, SamplingParams

    extra = json.loads(args.extra) if args.extra != "null" else None
    kw = dict(load_format="flexinfer", model_loader_extra_config=extra) if extra is not None else {}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=32 << 20, **kw)
    prompt = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    llm.chat(prompt, SamplingParams(max_tokens=2))
    loaded_then_wait_for_go(args.result)
    before = _experts()
    disk = disk_counters(args.model)
    t0 = time.perf_counter()
    out = llm.chat(prompt, SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    n = len(out[0].outputs[0].token_ids)
    result = {"tokens": n, "seconds": elapsed, "tok_s": n / elapsed, **disk_activity(disk, disk_counters(args.model))}
    if before is not None:  # a mixture of experts: the experts read while timed (the prompt's prefill too)
        time.sleep(0.5)  # the snapshot is written at most every 0.2 s
        after = _experts()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("bytes_read", "misses", "ahead", "ahead_used")}
        result["expert_bytes_read"] = delta["bytes_read"]  # reads ahead the router did not pick included
        reads = delta["misses"] - delta["ahead_used"] + delta["ahead"]  # every read: a miss now, or ahead
        result["expert_bytes_needed"] = delta["bytes_read"] * delta["misses"] // reads if reads else 0
        result["experts_ahead"], result["experts_ahead_used"] = delta["ahead"], delta["ahead_used"]
    Path(args.result).write_text(json.dumps(result))
    llm.llm_engine.engine_core.shutdown()


def _experts() -> dict | None:
    """A FlexInfer engine's expert figures so far (bytes read, misses, reads ahead; None: no expert slots)."""
    try:
        return json.loads(Path(os.environ["FLEXOFFLOAD_STATS_FILE"]).read_text()).get("experts") or None
    except (KeyError, OSError, ValueError):
        return None


def run_in_cgroup(name: str, limit, argv: list[str], env: dict, result: Path,
                  limit_from_start: bool = False, load_timeout: float = 1200, python: str = sys.executable) -> dict:
    """Run the child in a fresh cgroup, unlimited while it loads (or, with ``limit_from_start``, held
    to ``limit`` from its start), held to ``limit`` once it has loaded; one that has not loaded after
    ``load_timeout`` seconds (thrashing under its limit, say) is killed.  ``limit`` is bytes, None, or
    a function of the after-load figures and the group (an :class:`OwnOverhead`) giving the bytes."""
    cg = cgroup.MemoryCgroup(f"vllm-vtensor-bench-{name}", limit if limit_from_start else None)
    info = {"over_steady_limit": False, "limit_bytes": None if callable(limit) else limit}
    try:
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen(cg.enter([python, *argv]), env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            loaded = Path(str(result) + ".loaded")
            deadline = time.monotonic() + load_timeout
            while proc.poll() is None and not loaded.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            info["load_timed_out"] = proc.poll() is None and not loaded.exists()
            if info["load_timed_out"]:
                cg.kill_all()
            if proc.poll() is None and loaded.exists():
                info["memory_after_load"] = mem = cg.unreclaimable()
                info["needed_after_load_bytes"] = sum(mem.values())
                if callable(limit):
                    info["limit_bytes"] = limit = limit(info, cg)
                try:
                    if limit:
                        cg.hold(limit)
                    Path(str(result) + ".go").touch()
                except OSError:  # EBUSY: its memory cannot be brought under the limit
                    info["over_steady_limit"] = True
                    cg.kill_all()
            try:
                proc.wait(timeout=1200)
            except subprocess.TimeoutExpired:
                cg.kill_all()
                proc.wait()
            log.seek(0)
            tail = log.read()[-1500:]
        return {"returncode": proc.returncode, "peak_bytes": cg.peak(), "limit_hits": cg.limit_hits(), **info,
                "log_tail": tail}
    finally:
        cg.close()  # with the engine processes a killed child left behind


def disk_bandwidth(path: Path, io_threads: int = 2, window: int = DEFAULT_WINDOW, passes: int = 3) -> float:
    """Read bandwidth of the weight store ``path`` (bytes/s) through flexinfer's own streaming runtime with
    no compute: a streamer with every decoder layer as one unit (as when a whole layer streams), the
    default prefetch window, an mlocked arena (O_DIRECT into page-aligned buffers); a pass acquires and
    releases every layer in order.  The best of ``passes`` with each read path (glibc's AIO where
    the C library provides it, and the Python reader threads), ``io_threads`` reads in flight: a virtual machine's disk can vary by
    up to 2x from one measurement to the next (main() also measures again after the runs).  An earlier
    version read each tensor with a plain thread pool and measured ~0.6x of the rate the runtime
    itself reached during the runs, which made the bound no bound."""
    from flexoffload import aio
    from flexoffload.plan import _layer_of
    from flexoffload.runtime import Streamer, Unit
    from flexoffload.store import WeightStore

    store = WeightStore.open(path, direct_io=True)
    layers: dict[int, list[str]] = {}
    for name in store.index:
        if (i := _layer_of(name)) is not None:
            layers.setdefault(i, []).append(name)
    units = [Unit(f"layer.{i}", names) for i, names in sorted(layers.items())]
    unit_bytes = [sum(store.index[n].nbytes for n in u.names) for u in units]
    biggest = max(sum(store.index[n].padded for n in u.names) for u in units)
    best = 0.0
    try:
        for kind in [Streamer] + ([aio.AioStreamer] if aio.unavailable_reason() is None else []):
            streamer = kind(store, units, (window + 1) * biggest, window=window, io_threads=io_threads,
                            lock_memory=True)
            try:
                for _ in range(passes):
                    t0 = time.perf_counter()
                    for i in range(len(units)):
                        streamer.release(streamer.acquire(i))
                    best = max(best, sum(unit_bytes) / (time.perf_counter() - t0))
            finally:
                streamer.close()
        return best
    finally:
        store.close()


def drop_page_cache() -> None:
    """Start every run cold.  Page cache is charged to the cgroup that first read it, and a removed
    cgroup's pages move to the root: without this, the mmap baseline would map weights an earlier run
    cached and never pay for them under its own limit."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def run_child(tag: str, cgroup: str, model: str, extra: dict | None, limit: int | None, tokens: int, tmp,
              env_extra: dict | None = None, dtype: str = "float32", **cgroup_kw) -> dict:
    """One engine (``extra``: flexinfer's options, None for vLLM's own loader) from a cold page cache in
    cgroup ``cgroup`` (see run_in_cgroup): its limit, the cgroup's figures, tok/s (None when it
    failed) and flexinfer's stats snapshot."""
    result, stats = Path(tmp) / f"{tag}.json", Path(tmp) / f"{tag}-stats.json"
    for leftover in (result, stats, Path(f"{result}.loaded"), Path(f"{result}.go")):
        leftover.unlink(missing_ok=True)
    env = {**os.environ, **(env_extra or {}), "FLEXOFFLOAD_STATS_FILE": str(stats)}
    if isinstance(extra, str):  # llama.cpp
        argv = [str(Path(__file__).with_name("llamacpp_child.py")), "--gguf", str(ensure_gguf(model, dtype)),
                "--tokens", str(tokens), "--result", str(result)]
        cgroup_kw["python"] = str(LLAMA_PY)
    else:
        argv = [__file__, "--child", "--model", model, "--extra", json.dumps(extra), "--tokens", str(tokens),
                "--result", str(result), "--dtype", dtype]
    drop_page_cache()
    if isinstance(limit, OwnOverhead):
        limit = functools.partial(limit, stats)
    row = run_in_cgroup(cgroup, limit, argv, env, result, **cgroup_kw)
    if result.exists():
        row.update(json.loads(result.read_text()))
    else:
        row["tok_s"] = None  # failed: killed by the memory limit, or over the steady limit after loading
    if stats.exists():
        row["flexinfer"] = json.loads(stats.read_text())
    return row


def run_config(model, cfg_name, fraction, limit, tokens, tmp, dtype: str = "float32") -> dict:
    extra = CONFIGS[cfg_name]
    extra = extra if extra is None or isinstance(extra, str) else {"memory_budget": fraction, **extra}
    return {"config": cfg_name, "fraction": fraction,
            **run_child(f"{cfg_name}-{fraction}", f"{cfg_name}-{int(fraction * 100)}", model, extra, limit, tokens, tmp,
                        env_extra=CONFIG_ENV.get(cfg_name), dtype=dtype)}


@dataclasses.dataclass
class OwnOverhead:
    """A run's limit from its own memory after warm-up: ``budget_bytes`` of weights + what the engine
    holds besides its weights + 64 MiB of headroom.  The weights it holds: the weight file's pages
    mapped into it (``weight_file``: the mmap baseline's store, llama.cpp's GGUF) and flexinfer's
    resident tensors, arena and host tier (its stats snapshot, written at load).  Measured in the same
    run, so an engine's run-to-run variation of its own overhead (vLLM's: ~100-300 MiB) is neither
    taken from nor given to its weights."""

    budget_bytes: int
    weight_file: Path

    def __call__(self, stats: Path, info: dict, cg: "cgroup.MemoryCgroup") -> int:
        held = cg.file_rss(self.weight_file)
        if stats.exists():
            held += flexinfer_weights_held(json.loads(stats.read_text()))
        info["weights_held_bytes"] = held
        info["own_overhead_bytes"] = info["needed_after_load_bytes"] - held
        return self.budget_bytes + info["own_overhead_bytes"] + HEADROOM


HEADROOM = 64 << 20  # run-to-run noise (allocator, page cache of small files) must not decide OOMs


def flexinfer_weights_held(stats: dict) -> int:
    """Bytes of weights a flexinfer engine holds in memory, from its stats snapshot: resident tensors,
    the stream arena, the host tier and a mixture of experts' slots (none of them for the mmap baseline)."""
    return (stats.get("resident_bytes", 0) + stats.get("arena_bytes", 0) + stats.get("host_bytes", 0)
            + stats.get("expert_bytes", 0))


def steady_overhead(probe: dict) -> int:
    """The engine's fixed memory after warm-up, from a flexinfer run's row: anonymous + shared + mapped
    memory minus its weights and buffers, + 64 MiB of headroom (run-to-run noise: allocator, page cache
    of small files, must not decide OOMs)."""
    return probe["needed_after_load_bytes"] - flexinfer_weights_held(probe["flexinfer"]) + HEADROOM


def resolve_model(name: str, dtype: str = "float32") -> tuple[str, int]:
    """bench-llama / bench-moe / smollm2 (built locally) or a model folder, and its weight bytes in ``dtype``."""
    from flexoffload.plan import checkpoint_tensors
    from vllm_vtensor.models import build_bench_llama, build_bench_moe, build_smollm2

    builders = {"bench-llama": build_bench_llama, "bench-moe": build_bench_moe, "smollm2": build_smollm2}
    model = str(builders[name]()) if name in builders else name
    return model, sum(t.nbytes for t in checkpoint_tensors(model, dtype_bytes=DTYPES[dtype][1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench-llama",
                   help="bench-llama (1.65 GB random-weight llama, the default), bench-moe (1.1 GB random-weight "
                        "Qwen 3 MoE), smollm2, or a model folder")
    p.add_argument("--budgets", default="0.25,0.5,0.75,1.0")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated, of {', '.join(CONFIGS)} (default: all; llamacpp when its environment exists)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the weights' precision in every engine (llama.cpp's GGUF converted to the same)")
    p.add_argument("--out", default=str(RESULTS / "offload-cpu.json"))
    p.add_argument("--recompute", metavar="JSON", help="re-derive the bound, table, ratios and plot from a "
                   "result file's recorded runs (written back to --out)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--extra", default="null", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.recompute:
        data = json.loads(Path(args.recompute).read_text())
        rows = data.pop("rows")
        for key in ("ratios", "disk_bytes_per_s", "fastest_run_read_bytes_per_s", "compute_roof_tok_s"):
            data.pop(key, None)
        data.setdefault("budgets", list(dict.fromkeys(r["fraction"] for r in rows)))
        data.setdefault("configs", list(dict.fromkeys(r["config"] for r in rows)))
        _report(data, rows, Path(args.out))
        return 0
    if not cgroup.available():
        raise SystemExit("this benchmark needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")

    model, weight_bytes = resolve_model(args.model, args.dtype)
    budgets = [float(b) for b in args.budgets.split(",")]
    configs = args.configs.split(",") if args.configs else [
        c for c in CONFIGS if c not in LLAMA_CONFIGS or LLAMA_PY.exists()]
    if not args.configs and not LLAMA_PY.exists():
        print("llama.cpp's environment is missing (bash benchmarks/llamacpp_setup.sh): running without it")
    if set(LLAMA_CONFIGS) & set(configs) and not LLAMA_PY.exists():
        raise SystemExit("the llamacpp configuration needs llama.cpp's environment: bash benchmarks/llamacpp_setup.sh")
    gguf_bytes = ensure_gguf(model, args.dtype).stat().st_size if set(LLAMA_CONFIGS) & set(configs) else 0
    with tempfile.TemporaryDirectory() as tmp:
        # The engine's fixed overhead, after warm-up, from an unlimited flexinfer run at the smallest
        # budget: anonymous + shared + mapped memory minus its weights and buffers.  The first flexinfer
        # run writes the weight store.
        run = functools.partial(run_config, model, tmp=tmp, dtype=args.dtype)
        base = run("vanilla", 1.0, None, args.tokens)
        run("flexinfer", min(budgets), None, 2)  # writes the weight store
        probe = run("flexinfer", min(budgets), None, 2)
        overhead = steady_overhead(probe)
        # At 100% the limit is what vanilla vLLM itself holds after loading: its CPU weight packing keeps
        # more than the weights (a packed copy of the tied lm_head beside the embedding, padded oneDNN
        # layouts, load-time leftovers), so "the whole model" means vanilla's own footprint there.
        # Its anonymous + shared memory, plus the probe's mapped files (libraries; vanilla still maps
        # its checkpoint, which the limit may evict).
        # 256 MiB of headroom there: vanilla's footprint after loading varies by ~300 MiB between runs
        # (3.47 vs 3.81 GiB RSS measured), and at 100% the limit must bind neither loader.
        van = base["memory_after_load"]
        full_limit = van["rss"] + van["shmem"] + probe["memory_after_load"]["mapped_file"] + (256 << 20)
        store = Path(probe["flexinfer"]["store_path"])  # the model's weight store (the cache may hold others)
        bw_before = disk_bandwidth(store)
        rows = []
        partial = Path(args.out).with_suffix(".partial.json")
        for fraction in budgets:
            # vanilla vLLM (whose weights cannot be told from the rest of its memory) and llama.cpp
            # under the vLLM engines' limit: the budget + the probe's overhead
            vllm_limit = int(fraction * weight_bytes) + overhead if fraction < 1 else max(full_limit, weight_bytes + overhead)
            for cfg in configs:
                if cfg == "llamacpp":  # the same memory for weights, on top of its own overhead
                    cfg_limit = OwnOverhead(int(fraction * gguf_bytes), ensure_gguf(model, args.dtype))
                elif isinstance(CONFIGS[cfg], dict) and fraction < 1:  # flexinfer, its ablations, mmap
                    cfg_limit = OwnOverhead(int(fraction * weight_bytes), store)
                else:
                    cfg_limit = vllm_limit
                row = run(cfg, fraction, cfg_limit, args.tokens)
                rows.append(row)
                partial.write_text(json.dumps(rows))  # survives a crash of this script
                print(f"{cfg:>19} {fraction:>5.0%} limit {(row['limit_bytes'] or 0) / 2**20:7.0f} MiB: "
                      + (f"{row['tok_s']:7.2f} tok/s" if row["tok_s"] else "  over the memory limit"), flush=True)
        bw_after = disk_bandwidth(store)

    from provenance import provenance

    meta = {**provenance("offload.py", argv),
            "weight_bytes": weight_bytes, "overhead_bytes": overhead, "limit_at_100_bytes": full_limit,
            "gguf_bytes": gguf_bytes,
            "disk_bytes_per_s_before": bw_before, "disk_bytes_per_s_after": bw_after,
            "model": model, "dtype": args.dtype, "baseline_unlimited": base, "budgets": budgets, "configs": configs}
    _report(meta, rows, Path(args.out))
    return 0


BOUNDS = {"io_bound": "io_bound_tok_s", "roof": "roof_tok_s"}  # table row -> the flexinfer row's figure


def _apply_io_bound(meta: dict, rows: list[dict]) -> float:
    """The I/O bound of each flexinfer-family row: disk bandwidth / bytes streamed per forward.

    The bandwidth is the best rate the disk was seen to deliver during the run: the pure-read
    measurements before and after the runs, and the rate every run's reads ran at (bytes streamed
    over the time reads were in flight).  A virtual machine's disk can vary by up to 2x from one try to the next,
    and reads ran faster inside the runs than in any separate measurement, so a bound taken from
    the measurements alone was exceeded by every run (no bound at all)."""
    for row in rows:
        flex = row.get("flexinfer") or {}
        row["read_bytes_per_s"] = flex["bytes_streamed"] / flex["io_seconds"] if flex.get("io_seconds") else None
    seen = [r["read_bytes_per_s"] for r in rows if r.get("read_bytes_per_s")]
    bw = max([meta["disk_bytes_per_s_before"], meta["disk_bytes_per_s_after"], *seen])
    resident = next((r["tok_s"] for r in rows if r["config"] == "flexinfer" and r["fraction"] == 1.0), None)
    for row in rows:
        streamed = (row.get("flexinfer") or {}).get("streamed_bytes_per_forward")
        needed = row.get("expert_bytes_needed", row.get("expert_bytes_read"))  # the experts each token's router picked
        if needed is not None and row.get("tokens"):  # and not in a slot, per token (reads ahead not picked: not)
            streamed = (streamed or 0) + needed / row["tokens"]
        row["io_bound_tok_s"] = bw / streamed if streamed else None
        row["roof_tok_s"] = row["io_bound_tok_s"] if not (streamed and resident) else min(row["io_bound_tok_s"], resident)
    meta["disk_bytes_per_s"] = bw
    meta["fastest_run_read_bytes_per_s"] = max(seen, default=None)
    meta["compute_roof_tok_s"] = resident
    return bw


def _report(meta: dict, rows: list[dict], out: Path) -> None:
    """Print the table and the ratios, write JSON (meta + rows) and the PNG."""
    budgets, configs, weight_bytes = meta["budgets"], meta["configs"], meta["weight_bytes"]
    title = f"{Path(meta['model']).name} {meta.get('dtype', 'float32')} ({{:.0f}} MiB weights)"
    bw = _apply_io_bound(meta, rows)
    fastest = meta["fastest_run_read_bytes_per_s"] or 0
    print(f"\n{title.format(weight_bytes / 2**20)}, engine overhead {meta['overhead_bytes'] / 2**20:.0f} MiB; "
          f"decode tok/s (cgroup limit = budget + the run's own overhead).  I/O bound at {bw / 1e9:.2f} GB/s, the best "
          f"read rate seen (flexinfer's O_DIRECT path alone: {meta['disk_bytes_per_s_before'] / 1e9:.2f} before "
          f"the runs, {meta['disk_bytes_per_s_after'] / 1e9:.2f} after; fastest run's reads {fastest / 1e9:.2f})")
    print(f"{'config':>19}" + "".join(f"{b:>9.0%}" for b in budgets))
    for cfg in configs + list(BOUNDS):
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["fraction"] == b and r["config"] == (cfg if cfg not in BOUNDS else "flexinfer")), None)
            v = None if r is None else (r.get(BOUNDS[cfg]) if cfg in BOUNDS else r["tok_s"])
            cells.append(f"{v:>9.2f}" if v else f"{'OOM' if cfg not in BOUNDS and r else '-':>9}")
        print(f"{cfg:>19}" + "".join(cells))
    for line in _disk_lines(rows, budgets, configs):
        print(line)
    ratios = _ratios(rows, budgets)
    for line in ratios["lines"]:
        print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "ratios": ratios["values"], "rows": rows}, indent=2))
    _plot(rows, budgets, configs, out.with_suffix(".png"), title.format(weight_bytes / 2**20))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _disk_lines(rows, budgets, configs) -> list[str]:
    """The disk during each timed decode (the kernel's counters for the device holding the weights): MiB
    read per token and the share of the decode it was busy, the rest being time no read was in flight
    (each row gets ``disk_read_bytes_per_token`` and ``disk_busy_fraction``)."""
    lines = []
    for r in rows:
        if r.get("disk_busy_s") is not None and r.get("tokens") and r.get("seconds"):
            r["disk_read_bytes_per_token"] = r["disk_read_bytes"] / r["tokens"]
            r["disk_busy_fraction"] = min(1.0, r["disk_busy_s"] / r["seconds"])
    for cfg in configs:
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["fraction"] == b and r["config"] == cfg), None)
            ok = r is not None and "disk_busy_fraction" in r
            cells.append(f"{r['disk_read_bytes_per_token'] / 2**20:>6.0f} {r['disk_busy_fraction']:>4.0%}" if ok
                         else f"{'-':>11}")
        if any(c.strip() != "-" for c in cells):
            lines.append(f"{cfg:>19}" + "".join(f"{c:>12}" for c in cells))
    if lines:
        lines.insert(0, "\ndisk during the decode: MiB read per token, share of the time busy")
    return lines


def _ratios(rows, budgets) -> dict:
    """The goals as ratios of runs made side by side: flexinfer vs the mmap baseline,
    vs the I/O bound and the roof, and vs vanilla vLLM at 100%.  A run killed by its limit gives no ratio."""
    def tok(cfg, b):
        r = next((r for r in rows if r["config"] == cfg and r["fraction"] == b), None)
        return r and r["tok_s"], r
    values, lines = {}, ["", "ratios (flexinfer / other, same budget):"]
    for b in budgets:
        flex, row = tok("flexinfer", b)
        for other, key in (("mmap", "vs_mmap"), ("vanilla", "vs_vanilla"), ("llamacpp", "vs_llamacpp"),
                           ("llamacpp_same_limit", "vs_llamacpp_same_limit"),
                           ("io_bound", "vs_io_bound"), ("roof", "vs_roof")):
            if other in BOUNDS:
                ref = row and row.get(BOUNDS[other])
            else:
                ref, ref_row = tok(other, b)
                if ref_row is None:
                    continue
            if flex and ref:
                values[f"{key}@{b:g}"] = flex / ref
                lines.append(f"  {b:>4.0%} {key:<12} {flex / ref:6.2f}x")
            elif flex and other not in BOUNDS:
                lines.append(f"  {b:>4.0%} {key:<12}  {other} failed under the limit")
    return {"values": values, "lines": lines}


def _plot(rows, budgets, configs, path, title) -> None:
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
        ax.plot(*zip(*bound), "k--", label="I/O bound (best read rate seen / streamed bytes)")
    roof = [(r["fraction"] * 100, r["roof_tok_s"]) for r in rows if r["config"] == "flexinfer" and r.get("roof_tok_s")]
    if roof and roof != bound:
        ax.plot(*zip(*roof), "k:", label="roof (lower of the I/O bound and flexinfer at 100%)")
    ax.set_xlabel("memory budget, % of weight bytes")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"{title} under a cgroup memory limit", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
