"""VMM micro-benchmark: per-chunk map / unmap / share latency, and growth cost vs copy-on-grow.

    python benchmarks/vmm.py                    # host (memfd) backend, page tables filled at map
    python benchmarks/vmm.py --stage            # host backend moving populated mappings (mremap)
    python benchmarks/vmm.py --device cuda      # CUDA VMM backend on a GPU machine

Prints a table and writes JSON (default ``benchmarks/results/vmm-<device>.json``).
The claim under test: growing a VTensor by N chunks costs the same whatever its
current size, while growing a plain tensor (allocate a bigger one, copy) costs
time linear in the current size. ``map_run16``/``unmap_run16``: per chunk, 16
consecutive chunks mapped in one ``map_many`` call (a prompt's blocks; on CUDA one
unmap of the zero granules and one set-access for them all) and unmapped in one call.

On CUDA, ``while_busy`` times each operation again while the device runs a kernel of
``--busy-ms`` (``torch.cuda._sleep``) and records whether the call returned only after
that kernel had finished: an operation that waits for the device cannot overlap a
forward pass under vLLM's async scheduling, whatever thread makes it. ``beside_a_sync``:
the same while another thread waits in ``synchronize`` (as the deferred-unmap helper does).
``by_size``: each operation on one chunk of 1, 4, 16 x ``--chunk-mib`` (bigger blocks), and on
CUDA the bare driver calls mapping that much of one allocation.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_vtensor.pool import ChunkPool  # noqa: E402
from vllm_vtensor.vmm import make_backend  # noqa: E402
from vllm_vtensor.vtensor import VTensor  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
RUN = 16  # chunks per run of consecutive blocks (a 256-token prompt at block 16)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def per_chunk_latency(backend, chunk: int, reps: int) -> dict:
    vr = backend.reserve(reps * chunk)
    handles = [backend.create_chunk(chunk) for _ in range(reps)]
    maps, unmaps = [], []
    for i, h in enumerate(handles):
        t = time.perf_counter()
        backend.map(vr, i * chunk, h, chunk)
        maps.append(time.perf_counter() - t)
    for i in range(reps):
        t = time.perf_counter()
        backend.unmap(vr, i * chunk, chunk)
        unmaps.append(time.perf_counter() - t)
    # a request's consecutive blocks: RUN chunks mapped in one map_many call and unmapped in one call (per chunk)
    runs, run_unmaps = [], []
    for start in range(0, reps - RUN + 1, RUN):
        t = time.perf_counter()
        backend.map_many(vr, start * chunk, handles[start:start + RUN], chunk)
        runs.append((time.perf_counter() - t) / RUN)
        t = time.perf_counter()
        backend.unmap(vr, start * chunk, RUN * chunk)
        run_unmaps.append((time.perf_counter() - t) / RUN)
    for h in handles:
        backend.release_chunk(h)
    backend.free_range(vr)
    return {"map": maps, "unmap": unmaps, f"map_run{RUN}": runs, f"unmap_run{RUN}": run_unmaps}


def share_latency(pool: ChunkPool, reps: int) -> list[float]:
    src = VTensor(pool, pool.chunk_bytes)
    src.grow(pool.chunk_bytes)
    out = []
    for _ in range(reps):
        dst = VTensor(pool, pool.chunk_bytes)
        t = time.perf_counter()
        dst.share_prefix(src, pool.chunk_bytes)
        out.append(time.perf_counter() - t)
        dst.free()
    src.free()
    return out


def grow_vs_copy(pool: ChunkPool, device: str, sizes_mib: list[int], grow_chunks: int, reps: int) -> list[dict]:
    chunk = pool.chunk_bytes
    delta = grow_chunks * chunk
    rows = []
    for size_mib in sizes_mib:
        base = size_mib * MiB
        vt = VTensor(pool, base + delta)
        vt.grow(base)
        vt.view()[:base].fill_(1)
        v_times, c_times = [], []
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            vt.grow(base + delta)
            vt.view()[base : base + delta].fill_(2)  # touch the new memory, as a KV write would
            _sync(device)
            v_times.append(time.perf_counter() - t)
            vt.shrink(base)  # chunks return to the pool's cache

            old = torch.ones(base, dtype=torch.uint8, device=device)
            _sync(device)
            t = time.perf_counter()
            new = torch.empty(base + delta, dtype=torch.uint8, device=device)
            new[:base].copy_(old)
            new[base:].fill_(2)
            _sync(device)
            c_times.append(time.perf_counter() - t)
            del old, new
        vt.free()
        rows.append({
            "current_mib": size_mib,
            "grow_mib": delta // MiB,
            "vtensor_ms": statistics.median(v_times) * 1e3,
            "copy_on_grow_ms": statistics.median(c_times) * 1e3,
        })
    return rows


def _sleep_cycles(ms: float) -> int:
    """GPU clock cycles for ``torch.cuda._sleep`` to run about ``ms`` milliseconds on this device."""
    probe = 10_000_000
    torch.cuda._sleep(probe)  # warm-up (module load)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * ms / max(start.elapsed_time(end), 1e-3))


def _busy(cycles: int):
    """Start a kernel of ``cycles`` on an idle device; the event recorded after it (``query()``: finished)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    done = torch.cuda.Event()
    done.record()
    return done


def while_busy(backend, chunk: int, reps: int, cycles: int) -> dict:
    """Each operation of a step's block updates timed with the device idle and while it runs a kernel of
    ``cycles``; ``waited`` is the share of busy calls that returned only after the kernel had finished
    (1.0: the call waits for the device; 0.0: it runs beside the kernel)."""
    vr = backend.reserve((RUN + 1) * chunk)
    ops = {
        "create": lambda st: st.setdefault("made", []).append(backend.create_chunk(chunk)),
        "map": lambda st: backend.map(vr, 0, st["made"][0], chunk),
        "unmap": lambda st: backend.unmap(vr, 0, chunk),
        f"map_run{RUN}": lambda st: backend.map_many(vr, chunk, st["made"][1:RUN + 1], chunk),
        f"unmap_run{RUN}": lambda st: backend.unmap(vr, chunk, RUN * chunk),
        "release": lambda st: [backend.release_chunk(h) for h in st.pop("made")],
    }
    times: dict[str, dict[str, list]] = {op: {"idle": [], "busy": [], "waited": []} for op in ops}
    for _ in range(reps):
        for busy in (False, True):
            state = {"made": [backend.create_chunk(chunk) for _ in range(RUN)]}
            for op, run in ops.items():
                if busy:
                    done = _busy(cycles)
                else:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                run(state)
                dt = time.perf_counter() - t
                times[op]["busy" if busy else "idle"].append(dt)
                if busy:
                    times[op]["waited"].append(done.query())
            torch.cuda.synchronize()
    backend.free_range(vr)
    return {op: {"idle_median_us": statistics.median(t["idle"]) * 1e6,
                 "busy_median_us": statistics.median(t["busy"]) * 1e6,
                 "waited": sum(t["waited"]) / len(t["waited"])} for op, t in times.items()}


def beside_a_sync(backend, chunk: int, reps: int, cycles: int) -> dict:
    """What the worker's thread can do while another thread waits in ``synchronize`` for a kernel of
    ``cycles`` (VTENSOR_DEFERRED_UNMAP's helper does that before unmapping finished requests): launch a
    kernel, map a chunk. ``waited``: the share of calls that returned only after the kernel had finished
    (the helper's wait holding the driver up)."""
    import threading

    vr = backend.reserve(chunk)
    handle = backend.create_chunk(chunk)
    ops = {"launch": lambda: torch.cuda._sleep(1000),
           "map": lambda: backend.map(vr, 0, handle, chunk),
           "unmap": lambda: backend.unmap(vr, 0, chunk)}
    times = {op: {"us": [], "waited": []} for op in ops}
    for _ in range(reps):
        for op, run in ops.items():
            done = _busy(cycles)
            helper = threading.Thread(target=backend.synchronize)
            helper.start()
            time.sleep(0.002)  # the helper is inside its wait
            t = time.perf_counter()
            run()
            times[op]["us"].append((time.perf_counter() - t) * 1e6)
            times[op]["waited"].append(done.query())
            helper.join()
    torch.cuda.synchronize()
    backend.release_chunk(handle)
    backend.free_range(vr)
    return {op: {"median_us": statistics.median(t["us"]), "waited": sum(t["waited"]) / len(t["waited"])}
            for op, t in times.items()}


def create_in_threads(backend, chunk: int, n: int, thread_counts: list[int]) -> list[dict]:
    """Creating ``n`` chunks at once (a burst of new requests finding no ready chunk) from one thread and
    from several: whether the device's allocator creates them side by side (then a step that needs many
    could create them in parallel) or one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    rows = []
    for threads in thread_counts:
        with ThreadPoolExecutor(threads) as ex:
            warm = list(ex.map(lambda _: backend.create_chunk(chunk), range(threads)))  # each thread bound once
            _sync(backend.device)
            t = time.perf_counter()
            made = list(ex.map(lambda _: backend.create_chunk(chunk), range(n)))
            _sync(backend.device)
            dt = time.perf_counter() - t
        for h in warm + made:
            backend.release_chunk(h)
        rows.append({"threads": threads, "chunks": n, "ms": dt * 1e3, "us_per_chunk": dt * 1e6 / n})
    return rows


def by_size(make, chunk: int, multiples: list[int], reps: int) -> list[dict]:
    """Each operation on one chunk of 1, 4, 16, ... times ``chunk`` (on CUDA, granules): whether a bigger
    block (one chunk per block of all layers: ``--block-size 64`` makes an 8B model's chunk 8 MiB)
    costs as many calls' time as it holds granules or about one. On CUDA ``driver_map_us`` /
    ``driver_unmap_us`` time the bare ``cuMemMap`` + ``cuMemSetAccess`` and ``cuMemUnmap`` of that
    size of one allocation (what covering a range with bigger zero pieces would cost per call); the
    backend's own ``map``/``unmap`` also move the zero granules there (one call each way per granule).
    ``make()`` gives a fresh backend for each size (the host backend's chunks have one size)."""
    rows = []
    for k in multiples:
        size = k * chunk
        backend = make()
        vr = backend.reserve(size)
        t: dict[str, list] = {"create": [], "map": [], "unmap": [], "release": []}
        for _ in range(reps):
            for op in ("create", "map", "unmap", "release"):
                t0 = time.perf_counter()
                if op == "create":
                    h = backend.create_chunk(size)
                elif op == "map":
                    backend.map(vr, 0, h, size)
                elif op == "unmap":
                    backend.unmap(vr, 0, size)
                else:
                    backend.release_chunk(h)
                _sync(backend.device)
                t[op].append(time.perf_counter() - t0)
        row = {"chunks": k, "mib": size / MiB, **{f"{op}_us": statistics.median(xs) * 1e6 for op, xs in t.items()}}
        if backend.device.startswith("cuda"):
            row.update(_driver_by_size(backend, size, reps))
        backend.close()
        rows.append(row)
    return rows


def _driver_by_size(backend, size: int, reps: int) -> dict:
    """Bare driver calls mapping ``size`` bytes of one allocation at a fresh address (no zero granules)."""
    from vllm_vtensor.vmm.cuda import _ok, cu

    backend._bind()
    addr = int(_ok(cu.cuMemAddressReserve(size, backend.granularity, 0, 0), "cuMemAddressReserve"))
    handle = _ok(cu.cuMemCreate(size, backend._prop, 0), "cuMemCreate")
    maps, unmaps = [], []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            _ok(cu.cuMemMap(addr, size, 0, handle, 0), "cuMemMap")
            _ok(cu.cuMemSetAccess(addr, size, [backend._rw], 1), "cuMemSetAccess")
            maps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _ok(cu.cuMemUnmap(addr, size), "cuMemUnmap")
            unmaps.append(time.perf_counter() - t0)
    finally:
        _ok(cu.cuMemRelease(handle), "cuMemRelease")
        _ok(cu.cuMemAddressFree(addr, size), "cuMemAddressFree")
    return {"driver_map_us": statistics.median(maps) * 1e6, "driver_unmap_us": statistics.median(unmaps) * 1e6}


def reserve_cost(backend, sizes_gib: list[float]) -> list[dict]:
    """Time reserving a fresh range of each size, reading as zeros everywhere: what a KV space does
    once at start-up (VTENSOR reserves max_num_seqs slots of max_model_len).  The host backend maps
    one read-only zero file over the range; the CUDA backend maps its zero granule over every
    granule of it.  Ranges stay reserved until the backend closes."""
    rows = []
    for gib in sizes_gib:
        size = int(gib * GiB) // backend.granularity * backend.granularity
        t = time.perf_counter()
        backend.reserve(size)
        _sync(backend.device)
        dt = time.perf_counter() - t
        rows.append({"reserve_gib": gib, "ms": dt * 1e3, "us_per_granule": dt * 1e6 / (size // backend.granularity)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--stage", action="store_true",
                   help="host backend: map by moving each chunk's populated mapping (VTENSOR_STAGE_MAPPINGS=1)")
    p.add_argument("--chunk-mib", type=int, default=2)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--sizes-mib", default="16,64,256,1024")
    p.add_argument("--grow-chunks", type=int, default=8)
    p.add_argument("--reserve-gib", default="1,4,16",
                   help="sizes of fresh virtual ranges to time reserving (comma-separated GiB; '' for none)")
    p.add_argument("--busy-ms", type=float, default=20.0,
                   help="CUDA: the kernel each operation is timed beside (0: skip the busy timings)")
    p.add_argument("--busy-reps", type=int, default=5)
    p.add_argument("--create-chunks", type=int, default=64,
                   help="chunks created at once from 1, 2 and 4 threads (0: skip)")
    p.add_argument("--by-size", default="1,4,16",
                   help="chunk sizes, in multiples of --chunk-mib, for the per-size timings (comma-separated; '' for none)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    if args.stage and args.device != "cpu":
        p.error("--stage is a host (cpu) backend option")
    backend = make_backend(args.device, **({"stage": True} if args.stage else {}))
    backend_facts = {"granularity": backend.granularity,
                     "zero_read_only": getattr(backend, "zero_read_only", None)}  # CUDA: zero granules read-only?
    chunk = args.chunk_mib * MiB
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    lat = per_chunk_latency(backend, chunk, args.reps)
    budget = max(sizes) * MiB + (args.grow_chunks + 4) * chunk
    pool = ChunkPool(backend, budget, chunk, high_watermark=args.grow_chunks)
    lat["share"] = share_latency(pool, args.reps)
    grow = grow_vs_copy(pool, args.device, sizes, args.grow_chunks, reps=5)
    pool.close()
    reserve = reserve_cost(backend, [float(g) for g in args.reserve_gib.split(",") if g])
    cuda = args.device.startswith("cuda")
    busy, sync_beside = {}, {}
    if cuda and args.busy_ms > 0:
        cycles = _sleep_cycles(args.busy_ms)
        busy = while_busy(backend, chunk, args.busy_reps, cycles)
        sync_beside = beside_a_sync(backend, chunk, args.busy_reps, cycles)
    creates = create_in_threads(backend, chunk, args.create_chunks, [1, 2, 4]) if args.create_chunks else []
    backend.close()
    make = lambda: make_backend(args.device, **({"stage": True} if args.stage else {}))  # noqa: E731
    sizes_by = by_size(make, chunk, [int(k) for k in args.by_size.split(",") if k], min(args.reps, 16))

    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    print(f"\nVMM latency per {args.chunk_mib} MiB chunk on {args.device} ({device_name}), {args.reps} reps")
    print(f"{'op':<12}{'median us':>12}{'p99 us':>12}   (runs: per chunk of {RUN} mapped or unmapped in one call)")
    summary = {}
    for op, xs in lat.items():
        if not xs:  # fewer reps than one run
            continue
        summary[op] = {"median_us": statistics.median(xs) * 1e6, "p99_us": pct(xs, 0.99) * 1e6}
        print(f"{op:<12}{summary[op]['median_us']:>12.1f}{summary[op]['p99_us']:>12.1f}")
    print(f"\nGrowing by {args.grow_chunks} chunks ({args.grow_chunks * args.chunk_mib} MiB), median of 5")
    print(f"{'current MiB':>12}{'vtensor ms':>12}{'copy-on-grow ms':>17}{'speedup':>9}")
    for r in grow:
        r["speedup"] = r["copy_on_grow_ms"] / r["vtensor_ms"]
        print(f"{r['current_mib']:>12}{r['vtensor_ms']:>12.2f}{r['copy_on_grow_ms']:>17.2f}{r['speedup']:>8.1f}x")

    if reserve:
        print("\nReserving a fresh range that reads as zeros (once per KV space, at start-up)")
        print(f"{'GiB':>8}{'ms':>12}{'us/granule':>12}")
        for r in reserve:
            print(f"{r['reserve_gib']:>8g}{r['ms']:>12.3f}{r['us_per_granule']:>12.3f}")

    if busy:
        print(f"\nEach operation with the device idle and beside a {args.busy_ms:g} ms kernel "
              f"(waited: share of calls that returned after the kernel had finished)")
        print(f"{'op':<12}{'idle us':>12}{'busy us':>12}{'waited':>9}")
        for op, r in busy.items():
            print(f"{op:<12}{r['idle_median_us']:>12.1f}{r['busy_median_us']:>12.1f}{r['waited']:>9.2f}")
        print("\nThe same thread's calls while another thread waits in synchronize for that kernel")
        print(f"{'op':<12}{'us':>12}{'waited':>9}")
        for op, r in sync_beside.items():
            print(f"{op:<12}{r['median_us']:>12.1f}{r['waited']:>9.2f}")

    if creates:
        print(f"\nCreating {args.create_chunks} chunks at once")
        print(f"{'threads':>8}{'ms':>10}{'us/chunk':>10}")
        for r in creates:
            print(f"{r['threads']:>8}{r['ms']:>10.1f}{r['us_per_chunk']:>10.1f}")

    if sizes_by:
        driver = "driver_map_us" in sizes_by[0]
        print(f"\nOne chunk of k x {args.chunk_mib} MiB (median us per call; drv: bare cuMemMap + cuMemSetAccess / cuMemUnmap)")
        print(f"{'k':>9}{'MiB':>7}{'create':>9}{'map':>9}{'unmap':>9}{'release':>9}"
              + (f"{'drv map':>9}{'drv unmap':>10}" if driver else ""))
        for r in sizes_by:
            print(f"{r['chunks']:>9}{r['mib']:>7g}{r['create_us']:>9.1f}{r['map_us']:>9.1f}{r['unmap_us']:>9.1f}"
                  f"{r['release_us']:>9.1f}" + (f"{r['driver_map_us']:>9.1f}{r['driver_unmap_us']:>10.1f}" if driver else ""))

    from provenance import card_name, provenance

    where = "cpu" if args.device == "cpu" else card_name(device_name)
    out = Path(args.out or Path(__file__).parent / "results" / f"vmm-{where}{'-staged' if args.stage else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        **provenance("vmm.py", argv),
        "device": args.device, "device_name": device_name, "chunk_bytes": chunk, "staged": args.stage,
        "latency": summary, "grow": grow, "reserve": reserve, "create_in_threads": creates, "by_size": sizes_by,
        **({"while_busy": {"busy_ms": args.busy_ms, "ops": busy, "beside_a_sync": sync_beside}} if busy else {}),
        "torch": torch.__version__, **backend_facts,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
