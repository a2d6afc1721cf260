"""How fast a decode-sized GEMV runs over weights an ``O_DIRECT`` read has just written, against the
same weights read a second time: what FlexInfer's streamed layers pay on top of the read itself.

    python benchmarks/read_then_compute.py                 # 12 trials of 66 MB (30 float32 960x576 matrices)
                                                           # on 1 compute thread, then on every core, into
                                                           # 4 KiB pages and into transparent huge pages

Each trial reads the matrices from a file into one page-aligned arena with ``O_DIRECT`` (the way
FlexInfer's streamer does, at a new file offset each trial), then times one pass of ``x @ W.T`` for
a single token over all of them, twice: the first pass is what a streamed layer computes on; the
second reads the same memory again.  Then, as a control, the threads idle as long as the read took
(no read) and a third pass runs: a slow first pass that the control shares comes from the compute
threads having sat idle, not from the read.  Each trial runs twice, alternating: into an arena of
4 KiB pages and into one of transparent huge pages (``MADV_HUGEPAGE``, as FlexInfer's arena): an
``O_DIRECT`` read pins every page it lands in.  The GEMV is oneDNN's matmul on the weight as it lies
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

from flexoffload.store import aligned_buffer
from provenance import provenance

RESULTS = Path(__file__).parent / "results"
SHAPE = (960, 576)  # SmolLM2's fused qkv projection
FILE_BYTES = 256 << 20


def random_file(name: str, nbytes: int) -> Path:
    """A file of ``nbytes`` of random float32 (seeded) in the cache folder, written once: ``O_DIRECT``
    needs a real file system, not tmpfs."""
    from vllm_vtensor.settings import cache_dir

    path = cache_dir() / name
    if not path.exists() or path.stat().st_size != nbytes:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        gen, chunk = torch.Generator().manual_seed(0), 64 << 20
        with open(tmp, "wb") as f:
            for start in range(0, nbytes, chunk):
                f.write(torch.randn(min(chunk, nbytes - start) // 4, generator=gen).numpy().tobytes())
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
    p.add_argument("--pages", default="4k,huge", help="arena page kinds to compare, comma-separated: 4k, huge")
    p.add_argument("--out", default=str(RESULTS / "read_then_compute-cpu.json"))
    args = p.parse_args(argv)

    nbytes = SHAPE[0] * SHAPE[1] * 4
    span = args.matrices * nbytes
    x = torch.randn(1, SHAPE[1])
    gemv = torch.ops.mkldnn._linear_pointwise
    arenas = {kind: Arena(kind, span, nbytes, args.matrices) for kind in args.pages.split(",")}

    def one_pass(arena) -> float:
        t0 = time.perf_counter()
        for w in arena.weights:
            gemv(x, w, None, "none", [], "")
        return time.perf_counter() - t0

    path = random_file("read_then_compute.bin", FILE_BYTES)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    slots = (FILE_BYTES - span) // 4096
    rows, summary = [], {}
    try:
        for threads in dict.fromkeys(int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for arena in arenas.values():
                one_pass(arena)  # oneDNN's primitive made, pages touched once
            for trial in range(args.trials):
                base = (trial * 7919 % slots) * 4096
                for arena in arenas.values():  # alternating, at the same file offset
                    t0 = time.perf_counter()
                    for i in range(args.matrices):
                        os.preadv(fd, [arena.view[i * nbytes:(i + 1) * nbytes]], base + i * nbytes)
                    read_s = time.perf_counter() - t0
                    first, second = one_pass(arena), one_pass(arena)
                    time.sleep(read_s)  # the control: the compute threads idle as long, with no read
                    after_idle = one_pass(arena)
                    rows.append({"threads": threads, "pages": arena.kind, "trial": trial, "file_offset": base,
                                 "read_gb_s": span / read_s / 1e9, "huge_page_bytes": arena.huge_bytes(),
                                 "first_pass_ms": first * 1e3, "second_pass_ms": second * 1e3,
                                 "after_idle_pass_ms": after_idle * 1e3,
                                 "first_gb_s": span / first / 1e9, "second_gb_s": span / second / 1e9})
            for kind in arenas:
                summary[f"{threads} {kind}"] = _summary([r for r in rows if r["threads"] == threads
                                                         and r["pages"] == kind])
    finally:
        os.close(fd)

    print(f"{args.matrices} x {SHAPE[0]}x{SHAPE[1]} float32 ({span / 1e6:.0f} MB), batch-1 GEMV after an O_DIRECT read")
    print(f"{'threads':>7} {'pages':>5} {'trial':>5} {'read GB/s':>10} {'1st pass ms':>12} {'2nd pass ms':>12} "
          f"{'after idle ms':>14} {'1st/2nd':>8}")
    for r in rows:
        print(f"{r['threads']:>7} {r['pages']:>5} {r['trial']:>5} {r['read_gb_s']:>10.2f} {r['first_pass_ms']:>12.2f} "
              f"{r['second_pass_ms']:>12.2f} {r['after_idle_pass_ms']:>14.2f} {r['first_pass_ms'] / r['second_pass_ms']:>8.2f}")
    for key, s in summary.items():
        threads, kind = key.split()
        print(f"{threads} thread(s), {kind} pages: median read {s['median_read_gb_s']:.2f} GB/s; first pass "
              f"{s['median_first_pass_ms']:.2f} ms, second "
              f"{s['median_second_pass_ms']:.2f} ms, after idling as long as the read took "
              f"{s['median_after_idle_pass_ms']:.2f} ms; ratio first/second {s['median_first_over_second']:.2f}; "
              f"trials with the first pass over 2x the second: {s['share_of_trials_first_over_2x']:.0%}, "
              f"with the pass after idling over 2x: {s['share_of_trials_after_idle_over_2x']:.0%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance("read_then_compute.py", argv), "matrix_shape": SHAPE,
                               "matrices": args.matrices, "summary": summary, "rows": rows}, indent=2))
    _plot(rows, out.with_suffix(".png"), span)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


class Arena:
    """Page-aligned anonymous memory the reads land in: ``kind`` 4k (plain pages) or huge
    (FlexInfer's own streaming buffer, which asks for transparent huge pages before the first touch)."""

    def __init__(self, kind: str, span: int, nbytes: int, count: int):
        if kind not in ("4k", "huge"):
            raise SystemExit(f"--pages: {kind!r} is neither 4k nor huge")
        self.kind = kind
        self.buf = (aligned_buffer(span) if kind == "huge"
                    else mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        raw = torch.frombuffer(self.buf, dtype=torch.uint8)
        self.addr = raw.data_ptr()
        self.weights = [raw[i * nbytes:(i + 1) * nbytes].view(torch.float32).view(SHAPE) for i in range(count)]
        self.view = memoryview(self.buf)

    def huge_bytes(self) -> int:
        """How much of the arena the kernel backs with huge pages (/proc/self/smaps)."""
        inside = False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and all(c in "0123456789abcdef-" for c in head):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= self.addr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
        return 0


def _summary(rows: list[dict]) -> dict:
    ratios = [r["first_pass_ms"] / r["second_pass_ms"] for r in rows]
    return {"median_read_gb_s": statistics.median(r["read_gb_s"] for r in rows),
            "median_first_pass_ms": statistics.median(r["first_pass_ms"] for r in rows),
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

    panels = list(dict.fromkeys((r["threads"], r["pages"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), sharey=True, squeeze=False)
    for ax, (threads, kind) in zip(axes[0], panels):
        mine = [r for r in rows if r["threads"] == threads and r["pages"] == kind]
        trials = [r["trial"] for r in mine]
        ax.bar([t - 0.27 for t in trials], [r["first_pass_ms"] for r in mine], 0.27, label="first pass (just read)")
        ax.bar(trials, [r["second_pass_ms"] for r in mine], 0.27, label="second pass")
        ax.bar([t + 0.27 for t in trials], [r["after_idle_pass_ms"] for r in mine], 0.27,
               label="after idling as long as the read")
        ax.set_xlabel("trial")
        reads = statistics.median(r["read_gb_s"] for r in mine)
        ax.set_title(f"{threads} compute thread(s), {kind} pages: reads {reads:.2f} GB/s", fontsize=9)
    axes[0][0].set_ylabel("ms per pass")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"batch-1 GEMV over {span / 1e6:.0f} MB of weights after an O_DIRECT read", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
