"""FlexInfer's CUDA streaming runtime on its own (no vLLM): how well reads and copies hide behind compute.

    python benchmarks/offload_gpu.py            # on a CUDA machine; writes results/offload_gpu-cuda.json

A stack of ``--layers`` layers, each two fp16 ``[D, D]`` matrices, is written to a weight store
on disk. One "forward pass" runs ``x = x @ w0 @ w1`` through every layer for a batch of ``M`` rows,
with the weights:

* ``resident``: all on the GPU (compute alone);
* ``io only``: streamed, with no compute (the reads and host-to-device copies alone);
* ``sync``: streamed with ``window 0`` (read, copy, then compute: no overlap);
* ``prefetch``: streamed ``--window`` layers ahead into the pinned ring, copies on a side stream.

Reported per pass: milliseconds, and prefetch's efficiency against the bound
``max(compute, io only)`` (1.0 = I/O fully hidden or compute fully hidden). Outputs of the streamed
runs are checked against the resident run. Reads are buffered (page cache) unless ``--direct-io``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexoffload.runtime import Streamer, Unit  # noqa: E402
from flexoffload.store import WeightStore  # noqa: E402


def run(layers, stream, x, compute: bool) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(layers):
        if stream is None:
            w = resident[i]
        else:
            slot = stream.acquire(i)
            w = stream.tensors(slot)
        if compute:
            x = x @ w[f"layers.{i}.w0"] @ w[f"layers.{i}.w1"]
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-3)  # keep values bounded across layers
        if stream is not None:
            stream.release(slot)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, x


resident: list[dict] = []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--rows", default="256,16384", help="batch rows M per pass, comma-separated")
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--direct-io", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the CPU runtime is measured by benchmarks/offload.py)")

    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.w{j}": (torch.randn(args.dim, args.dim, generator=g) / args.dim ** 0.5).half()
               for i in range(args.layers) for j in range(2)}
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "store.bin"
    WeightStore.write(path, tensors)
    resident.clear()
    resident.extend({n: tensors[n].cuda() for n in (f"layers.{i}.w0", f"layers.{i}.w1")} for i in range(args.layers))
    layer_bytes = 2 * args.dim * args.dim * 2
    units = [Unit(f"layer.{i}", [f"layers.{i}.w0", f"layers.{i}.w1"]) for i in range(args.layers)]

    def streamer(window):
        return Streamer(WeightStore.open(path, args.direct_io), units, (max(window, 1) + 1) * layer_bytes,
                        window=window, io_threads=2, lock_memory=False, device="cuda")

    def best(fn):
        fn()  # warm-up
        times = [fn() for _ in range(args.passes)]
        return min(t for t, _ in times), times[-1][1]

    rows_out = []
    print(f"{args.layers} layers x {layer_bytes / 2**20:.0f} MiB (fp16 {args.dim}x{args.dim} x2), window {args.window}, "
          f"{'O_DIRECT' if args.direct_io else 'buffered'} reads, best of {args.passes} passes; "
          f"{torch.cuda.get_device_name()}")
    print(f"{'rows':>7}{'resident ms':>13}{'io only ms':>12}{'sync ms':>10}{'prefetch ms':>13}{'bound ms':>10}"
          f"{'efficiency':>12}{'overlap':>9}")
    for m in [int(r) for r in args.rows.split(",")]:
        x0 = torch.randn(m, args.dim, generator=g).half().cuda()
        t_res, ref = best(lambda: run(args.layers, None, x0, True))
        s_io = streamer(args.window)
        t_io, _ = best(lambda: run(args.layers, s_io, x0, False))
        s_io.close()
        s_sync = streamer(0)
        t_sync, out_sync = best(lambda: run(args.layers, s_sync, x0, True))
        s_sync.close()
        s_pre = streamer(args.window)
        t_pre, out_pre = best(lambda: run(args.layers, s_pre, x0, True))
        stats = s_pre.stats
        s_pre.close()
        for out in (out_sync, out_pre):
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
        bound = max(t_res, t_io)
        row = {"rows": m, "resident_ms": t_res, "io_only_ms": t_io, "sync_ms": t_sync, "prefetch_ms": t_pre,
               "bound_ms": bound, "efficiency": bound / t_pre, "speedup_vs_sync": t_sync / t_pre,
               "overlap": stats.overlap, "bytes_streamed": stats.bytes_streamed,
               "bytes_copied_to_device": stats.bytes_copied_to_device,
               "io_gb_s": args.layers * layer_bytes / t_io / 1e6}
        rows_out.append(row)
        print(f"{m:>7}{t_res:>13.2f}{t_io:>12.2f}{t_sync:>10.2f}{t_pre:>13.2f}{bound:>10.2f}"
              f"{row['efficiency']:>12.2f}{stats.overlap:>9.2f}", flush=True)
    from provenance import card_name, provenance

    out = Path(args.out or Path(__file__).parent / "results" / f"offload_gpu-{card_name(torch.cuda.get_device_name())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        **provenance("offload_gpu.py", argv),
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers, "dim": args.dim,
        "window": args.window, "direct_io": args.direct_io, "rows": rows_out}, indent=2))
    print(f"wrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
