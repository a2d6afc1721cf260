"""VTENSOR's block updates per engine step, without an engine: what the worker does before each forward
pass (``vllm_vtensor.worker.translate_scheduler_output``) for N running requests.

    python benchmarks/block_updates.py                                  # host backend, 64 KiB chunks
    python benchmarks/block_updates.py --device cuda --chunk-kib 2048   # CUDA VMM; Llama-3.1-8B's chunk at block 16

Each step is a decode step as vLLM's scheduler hands it to the worker: every request one token, a new block
for those whose last block is full. Three phases per request count, one KV space each, as the worker makes
it (a slot of ``--max-model-len`` per request, the chunk pool with its pre-creation thread, prefix caching
on):

* ``bookkeeping``: the requests' block boundaries fall on the same step, so all but one step in a block's
  worth map nothing: the median step is the per-step cost that every decode step pays, the slowest the
  step where every request maps a block at once;
* ``steady``: boundaries spread evenly, N / block size maps in every step, as in a long decode;
* ``finish``: every request finishes in one step (unmaps; full blocks stay cached).

``maps/step`` counts the maps a step made itself; with ``--map-ahead`` (``VTENSOR_MAP_AHEAD=1``) a helper
thread maps decoding requests' next chunks between steps (``ahead/step``: those a step took).

Between steps the script sleeps ``--compute-ms`` (the forward pass, during which chunks are pre-created).
Prints a table, writes JSON (default ``benchmarks/results/block_updates-<device>.json``) and a PNG.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_vtensor import worker  # noqa: E402
from vllm_vtensor.kv_space import default_decode_lookahead  # noqa: E402
from vllm_vtensor.vmm import make_backend  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _output(new=(), decoding=(), tokens=None, finished=()) -> NS:
    """A scheduler output with the fields the worker reads: ``new`` as (id, block ids, prompt length),
    ``decoding`` as (id, new block ids or None), one token each."""
    return NS(finished_req_ids=set(finished), preempted_req_ids=set(), new_block_ids_to_zero=None,
              kv_cache_block_copies=None,
              num_scheduled_tokens={**{r: n for r, _, n in new}, **{r: 1 for r, _ in decoding}},
              scheduled_new_reqs=[NS(req_id=r, block_ids=(b,), num_computed_tokens=0) for r, b, _ in new],
              scheduled_cached_reqs=NS(req_ids=[r for r, _ in decoding], new_block_ids=[b for _, b in decoding],
                                       resumed_req_ids=set(), num_computed_tokens=[tokens[r] for r, _ in decoding]))


def _held_ahead(kv) -> int:
    """Chunks mapped ahead that no step has taken yet."""
    with kv._lock:
        return sum(r.ahead is not None for r in kv._reqs.values())


def run_phase(backend, n: int, args, staggered: bool) -> dict:
    block = args.block_size
    kv = worker.kv_space_for(backend, max_num_seqs=n, max_model_len=args.max_model_len, block_size=block,
                             block_bytes=args.chunk_kib << 10, num_blocks=n * (args.max_model_len // block + 1),
                             keep_full_blocks=True, null_block=0, linger_s=1.0, precreate_bytes=args.precreate_mib << 20,
                             decode_lookahead=args.decode_lookahead, map_ahead=args.map_ahead)
    next_block = [1]  # 0 is vLLM's null block

    def fresh(k: int) -> tuple[int, ...]:
        next_block[0] += k
        return tuple(range(next_block[0] - k, next_block[0]))

    prompts = {f"r{i}": args.prompt_len + ((i * block) // n if staggered else 0) for i in range(n)}
    worker.translate_scheduler_output(kv, _output(new=[(r, fresh(-(-p // block)), p) for r, p in prompts.items()]))
    tokens = dict(prompts)
    before, held_before = kv.stats(), _held_ahead(kv)
    steps = []
    for _ in range(args.steps):
        time.sleep(args.compute_ms / 1e3)
        out = _output(decoding=[(r, (fresh(1),) if t % block == 0 else None) for r, t in tokens.items()], tokens=tokens)
        t0 = time.perf_counter()
        worker.translate_scheduler_output(kv, out)
        backend.synchronize()
        steps.append(time.perf_counter() - t0)
        for r in tokens:
            tokens[r] += 1
    after, held_after = kv.stats(), _held_ahead(kv)
    maps, on_demand = after.maps - before.maps, after.chunks_created_on_demand - before.chunks_created_on_demand
    ahead = after.mapped_ahead - before.mapped_ahead  # maps made beside the steps and taken by one
    maps -= ahead + held_after - held_before  # the steps' own (not those made ahead and not yet taken)
    time.sleep(args.compute_ms / 1e3)
    t0 = time.perf_counter()
    worker.translate_scheduler_output(kv, _output(finished=tokens, tokens=tokens))
    backend.synchronize()
    finish = time.perf_counter() - t0
    kv.close()
    ms = sorted(s * 1e3 for s in steps)
    return {"step_ms_median": statistics.median(ms), "step_ms_p90": ms[int(0.9 * (len(ms) - 1))],
            "step_ms_max": ms[-1], "maps_per_step": maps / args.steps, "mapped_ahead_per_step": ahead / args.steps,
            # chunks a step had to create itself (the pre-creation thread had none ready for it)
            "created_in_step_per_step": on_demand / args.steps, "finish_ms": finish * 1e3}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (the host backend) or cuda")
    p.add_argument("--requests", default="16,32,64,128,256", help="running requests, comma-separated")
    p.add_argument("--steps", type=int, default=160, help="decode steps per phase")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk-kib", type=int, default=64,
                   help="bytes of one block's KV for all layers (Llama-3.1-8B in bf16 at block 16: 2048)")
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--compute-ms", type=float, default=2.0, help="sleep between steps (the forward pass)")
    p.add_argument("--precreate-mib", type=int, default=4, help="VTENSOR_PRECREATE_BYTES, in MiB")
    p.add_argument("--decode-lookahead", type=int, default=None,
                   help="tokens before a decoding request's block boundary at which its chunk is made ahead "
                        "(default: VTENSOR's, half a block; 1: only for the next step)")
    p.add_argument("--map-ahead", action="store_true",
                   help="VTENSOR_MAP_AHEAD=1: decoding requests' next chunks mapped beside the compute")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    counts = [int(x) for x in args.requests.split(",")]
    backend = make_backend(args.device)
    rows = []
    print(f"VTENSOR block updates per decode step on {args.device}: block {args.block_size}, chunk {args.chunk_kib} KiB"
          f"{', next chunks mapped ahead' if args.map_ahead else ''}")
    print(f"{'requests':>9} {'bookkeeping':>13} {'all cross':>10} {'steady':>11} {'steady p90':>10} {'maps/step':>10} "
          f"{'ahead/step':>10} {'us/map':>8} {'made in step':>12} {'finish all':>10}   (ms unless named)")
    try:
        for n in counts:
            row = {"requests": n,
                   "bookkeeping": run_phase(backend, n, args, staggered=False),
                   "steady": run_phase(backend, n, args, staggered=True)}
            b, s = row["bookkeeping"], row["steady"]
            # what a steady step costs beyond the bookkeeping, per map (creating chunks included where the
            # pre-creation thread fell behind)
            row["us_per_map"] = max(0.0, s["step_ms_median"] - b["step_ms_median"]) * 1e3 / max(s["maps_per_step"], 1e-9)
            rows.append(row)
            # "all cross": the bookkeeping phase's slowest step, where every request maps a block at once;
            # "made in step": chunks per step, over both phases, that the step created itself
            made = (b["created_in_step_per_step"] + s["created_in_step_per_step"]) / 2
            print(f"{n:>9} {b['step_ms_median']:>13.3f} {b['step_ms_max']:>10.3f} {s['step_ms_median']:>11.3f} "
                  f"{s['step_ms_p90']:>10.3f} {s['maps_per_step']:>10.1f} "
                  f"{s['mapped_ahead_per_step']:>10.1f} {row['us_per_map']:>8.1f} {made:>12.2f} "
                  f"{s['finish_ms']:>10.2f}", flush=True)
    finally:
        backend.close()

    from provenance import provenance

    device = args.device
    if device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name()
    else:
        from provenance import cpu

        device_name = "cpu" + cpu()
    out = Path(args.out or RESULTS / f"block_updates-{'cuda' if device.startswith('cuda') else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance("block_updates.py", argv), "device": device_name,
                               "block_size": args.block_size, "chunk_bytes": args.chunk_kib << 10,
                               "compute_ms": args.compute_ms, "steps": args.steps,
                               "decode_lookahead": args.decode_lookahead or default_decode_lookahead(args.block_size),
                               "map_ahead": args.map_ahead,
                               "rows": rows}, indent=2))
    _plot(rows, out.with_suffix(".png"), device_name)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["requests"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for phase, style in (("bookkeeping", "o-"), ("steady", "s-")):
        ax.plot(n, [r[phase]["step_ms_median"] for r in rows], style, label=f"{phase} (median step)")
    ax.plot(n, [r["steady"]["step_ms_p90"] for r in rows], "s--", label="steady (p90 step)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("running requests")
    ax.set_ylabel("block updates per step, ms")
    ax.set_title(f"VTENSOR block updates, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
