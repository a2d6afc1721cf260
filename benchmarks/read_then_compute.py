"""How fast a decode-sized GEMV runs over weights an ``O_DIRECT`` read has just written, against the
same weights read a second time: what FlexInfer's streamed layers pay on top of the read itself.

    python benchmarks/read_then_compute.py                 # 12 trials of 66 MB (30 float32 960x576 matrices)
                                                           # on 1 compute thread, then on every core

Each trial reads the matrices from a file into one page-aligned arena with ``O_DIRECT`` (the way
FlexInfer's streamer does, at a new file offset each trial), then times one pass of ``x @ W.T`` for
a single token over all of them, twice: the first pass is what a streamed layer computes on; the
second reads the same memory again.  Then, as a control, the threads idle as long as the read took
(no read) and a third pass runs: a slow first pass that the control shares comes from the compute
threads having sat idle, not from the read.  The GEMV is oneDNN's matmul on the weight as it lies
(FlexInfer's path for weights it streams), on 1 thread and on every core.  The file (256 MiB of random float32) is
written once into the cache folder: ``O_DIRECT`` needs a real file system, not tmpfs.  Prints a
table, writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from pathlib import Path

import torch

from provenance import provenance

RESULTS = Path(__file__).parent / "results"
SHAPE = (960, 576)  # SmolLM2's fused qkv projection
FILE_BYTES = 256 << 20


def weight_file() -> Path:
    from vllm_vtensor.settings import cache_dir

    path = cache_dir() / "read_then_compute.bin"
    if not path.exists() or path.stat().st_size != FILE_BYTES:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(torch.randn(FILE_BYTES // 4, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--matrices", type=int, default=30)
    p.add_argument("--threads", default=f"1,{os.cpu_count()}",
                   help="compute thread counts to run, comma-separated (default: 1 and every core; vLLM's CPU "
                        "worker computes on 1 thread on a 2-core machine, leaving the other core to its processes)")
    p.add_argument("--out", default=str(RESULTS / "read_then_compute-cpu.json"))
    args = p.parse_args(argv)

    nbytes = SHAPE[0] * SHAPE[1] * 4
    span = args.matrices * nbytes
    arena = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(arena, dtype=torch.uint8)
    weights = [raw[i * nbytes:(i + 1) * nbytes].view(torch.float32).view(SHAPE) for i in range(args.matrices)]
    x = torch.randn(1, SHAPE[1])
    gemv = torch.ops.mkldnn._linear_pointwise

    def one_pass() -> float:
        t0 = time.perf_counter()
        for w in weights:
            gemv(x, w, None, "none", [], "")
        return time.perf_counter() - t0

    path = weight_file()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    view = memoryview(arena)
    slots = (FILE_BYTES - span) // 4096
    rows, summary = [], {}
    try:
        for threads in dict.fromkeys(int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            one_pass()  # oneDNN's primitive made, pages touched once
            for trial in range(args.trials):
                base = (trial * 7919 % slots) * 4096
                t0 = time.perf_counter()
                for i in range(args.matrices):
                    os.preadv(fd, [view[i * nbytes:(i + 1) * nbytes]], base + i * nbytes)
                read_s = time.perf_counter() - t0
                first, second = one_pass(), one_pass()
                time.sleep(read_s)  # the control: the compute threads idle as long, with no read
                after_idle = one_pass()
                rows.append({"threads": threads, "trial": trial, "file_offset": base, "read_gb_s": span / read_s / 1e9,
                             "first_pass_ms": first * 1e3, "second_pass_ms": second * 1e3,
                             "after_idle_pass_ms": after_idle * 1e3,
                             "first_gb_s": span / first / 1e9, "second_gb_s": span / second / 1e9})
            summary[threads] = _summary([r for r in rows if r["threads"] == threads])
    finally:
        os.close(fd)

    print(f"{args.matrices} x {SHAPE[0]}x{SHAPE[1]} float32 ({span / 1e6:.0f} MB), batch-1 GEMV after an O_DIRECT read")
    print(f"{'threads':>7} {'trial':>5} {'read GB/s':>10} {'1st pass ms':>12} {'2nd pass ms':>12} "
          f"{'after idle ms':>14} {'1st/2nd':>8}")
    for r in rows:
        print(f"{r['threads']:>7} {r['trial']:>5} {r['read_gb_s']:>10.2f} {r['first_pass_ms']:>12.2f} "
              f"{r['second_pass_ms']:>12.2f} {r['after_idle_pass_ms']:>14.2f} {r['first_pass_ms'] / r['second_pass_ms']:>8.2f}")
    for threads, s in summary.items():
        print(f"{threads} thread(s): median first pass {s['median_first_pass_ms']:.2f} ms, second "
              f"{s['median_second_pass_ms']:.2f} ms, after idling as long as the read took "
              f"{s['median_after_idle_pass_ms']:.2f} ms; ratio first/second {s['median_first_over_second']:.2f}; "
              f"trials with the first pass over 2x the second: {s['share_of_trials_first_over_2x']:.0%}, "
              f"with the pass after idling over 2x: {s['share_of_trials_after_idle_over_2x']:.0%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance("read_then_compute.py", argv), "matrix_shape": SHAPE,
                               "matrices": args.matrices, "summary": {str(k): v for k, v in summary.items()},
                               "rows": rows}, indent=2))
    _plot(rows, out.with_suffix(".png"), span)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _summary(rows: list[dict]) -> dict:
    ratios = [r["first_pass_ms"] / r["second_pass_ms"] for r in rows]
    return {"median_first_pass_ms": statistics.median(r["first_pass_ms"] for r in rows),
            "median_second_pass_ms": statistics.median(r["second_pass_ms"] for r in rows),
            "median_after_idle_pass_ms": statistics.median(r["after_idle_pass_ms"] for r in rows),
            "median_first_over_second": statistics.median(ratios),
            "share_of_trials_first_over_2x": sum(v > 2 for v in ratios) / len(ratios),
            "share_of_trials_after_idle_over_2x":
                sum(r["after_idle_pass_ms"] > 2 * r["second_pass_ms"] for r in rows) / len(rows)}


def _plot(rows, path: Path, span: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(dict.fromkeys(r["threads"] for r in rows))
    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 3.5), sharey=True, squeeze=False)
    for ax, threads in zip(axes[0], counts):
        mine = [r for r in rows if r["threads"] == threads]
        trials = [r["trial"] for r in mine]
        ax.bar([t - 0.27 for t in trials], [r["first_pass_ms"] for r in mine], 0.27, label="first pass (just read)")
        ax.bar(trials, [r["second_pass_ms"] for r in mine], 0.27, label="second pass")
        ax.bar([t + 0.27 for t in trials], [r["after_idle_pass_ms"] for r in mine], 0.27,
               label="after idling as long as the read")
        ax.set_xlabel("trial")
        ax.set_title(f"{threads} compute thread(s)", fontsize=9)
    axes[0][0].set_ylabel("ms per pass")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"batch-1 GEMV over {span / 1e6:.0f} MB of weights after an O_DIRECT read", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
