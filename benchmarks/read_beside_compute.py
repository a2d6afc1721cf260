"""What streaming weights costs the compute beside it, and the reverse, on two cores of one machine:
the physics under FlexInfer's decode when reads and compute overlap.

    python benchmarks/read_beside_compute.py               # 5 alternating rounds, ~1 min

Two measurements, each with the other core doing one of several things (a process pinned there,
started fresh each round; the modes alternate round by round):

- **reads**: FlexInfer's read path (``O_DIRECT`` ``preadv`` of 4 MiB pieces into its huge-page
  buffer, 2 I/O threads) on the second core, over a 512 MiB file, while the first core idles, spins
  (a busy core that touches no memory), or runs a batch-1 GEMV (oneDNN, 1 thread, over 256 MB of
  float32 weights: what vLLM's CPU worker computes a decode step with);
- **GEMV**: that GEMV on the first core while the second idles, spins, reads (FlexInfer's read path,
  continuously) or copies memory (``torch`` copy of 100 MB, a pure memory-bandwidth load).

A memory-bound decode and the reads that stream its weights share the machine's memory bandwidth
(and, in a virtual machine, the host's CPU time: the host emulates the disk on the cores that run
the guest's virtual CPUs, which shows as steal time, recorded for both cores during each
measurement): where the GEMV slows beside the
reads, a streamed decode computes more slowly than a resident one, and the I/O bound (bytes
streamed / read rate alone) is out of reach even with every read hidden.  The file is written once
into the cache folder (``O_DIRECT`` needs a real file system).  Prints a table, writes JSON and a PNG
to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from flexoffload.store import aligned_buffer
from provenance import provenance
from read_then_compute import random_file

RESULTS = Path(__file__).parent / "results"
FILE_BYTES = 512 << 20
PIECE = 4 << 20
SLOTS = 8  # pieces in flight share a buffer of this many pieces
IO_THREADS = 2
GEMV_BYTES = 256 << 20
GEMV_SHAPE = (3072, 576)  # SmolLM2's fused gate/up projection
READ_MODES = ("idle", "spin", "gemv")
GEMV_MODES = ("idle", "spin", "read", "memcpy")


class Reader:
    """FlexInfer's read path in miniature: ``IO_THREADS`` threads on ``core`` reading 4 MiB pieces with
    ``O_DIRECT`` into one huge-page buffer."""

    def __init__(self, path: Path, core: int):
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.buf = aligned_buffer(SLOTS * PIECE)
        self.view = memoryview(self.buf)
        self.core = core

    def _piece(self, i: int) -> int:
        slot = (i % SLOTS) * PIECE
        return os.preadv(self.fd, [self.view[slot:slot + PIECE]], (i * PIECE) % FILE_BYTES)

    def _on_io_threads(self, work) -> None:
        """``work(k)`` on each of ``IO_THREADS`` threads pinned to the reading core; returns when all end."""
        def run(k):
            os.sched_setaffinity(0, {self.core})
            work(k)
        threads = [threading.Thread(target=run, args=(k,)) for k in range(IO_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def rate(self) -> float:
        """One pass over the file; bytes per second."""
        n, lock, done = FILE_BYTES // PIECE, threading.Lock(), [0, 0]

        def loop(_):
            while True:
                with lock:
                    i = done[0]
                    done[0] += 1
                if i >= n:
                    return
                got = self._piece(i)
                with lock:
                    done[1] += got
        t0 = time.perf_counter()
        self._on_io_threads(loop)
        return done[1] / (time.perf_counter() - t0)

    def until(self, stop) -> None:
        def loop(k):
            for i in itertools.count(k, IO_THREADS):
                if stop.is_set():
                    return
                self._piece(i)
        self._on_io_threads(loop)


class Gemv:
    """Batch-1 ``x @ W.T`` over ``GEMV_BYTES`` of float32 weights (more than any cache), 1 thread."""

    def __init__(self):
        torch.set_num_threads(1)
        count = GEMV_BYTES // (GEMV_SHAPE[0] * GEMV_SHAPE[1] * 4)
        self.weights = [torch.randn(GEMV_SHAPE) for _ in range(count)]
        self.x = torch.randn(1, GEMV_SHAPE[1])
        self.nbytes = sum(w.numel() * 4 for w in self.weights)
        self.one_pass()

    def one_pass(self) -> None:
        for w in self.weights:
            torch.ops.mkldnn._linear_pointwise(self.x, w, None, "none", [], "")

    def rate(self, passes: int = 4) -> float:
        t0 = time.perf_counter()
        for _ in range(passes):
            self.one_pass()
        return passes * self.nbytes / (time.perf_counter() - t0)


def _other_core(mode: str, core: int, path: str, ready, stop) -> None:
    """The load on the other core, until ``stop``."""
    os.sched_setaffinity(0, {core})
    if mode == "gemv":
        g = Gemv()
        ready.set()
        while not stop.is_set():
            g.one_pass()
    elif mode == "read":
        r = Reader(Path(path), core)
        ready.set()
        r.until(stop)
    elif mode == "memcpy":
        torch.set_num_threads(1)
        a = torch.empty(100 << 18)
        b = torch.empty_like(a)
        ready.set()
        while not stop.is_set():
            b.copy_(a)
    elif mode == "spin":
        ready.set()
        while not stop.is_set():
            pass
    else:
        ready.set()
        stop.wait()


def _cpu_times() -> dict[int, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return {int(line.split()[0][3:]): [int(v) for v in line.split()[1:]] for line in f
                if line.startswith("cpu") and line[3].isdigit()}


def _steal(before: dict, after: dict, cores: list[int]) -> float:
    """Share of the time the host ran something else on these virtual CPUs (steal time)."""
    d = [[b - a for a, b in zip(before[c], after[c])] for c in cores]
    return sum(x[7] for x in d) / max(1, sum(sum(x) for x in d))


def _beside(mode: str, core: int, path: Path, measure, cores: list[int]) -> tuple[float, float]:
    """``measure()`` while the other core runs ``mode``; (its rate, the steal time of both cores)."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_other_core, args=(mode, core, str(path), ready, stop), daemon=True)
    proc.start()
    try:
        if not ready.wait(120):
            raise RuntimeError(f"the {mode} load did not start")
        time.sleep(0.3)
        before = _cpu_times()
        rate = measure()
        return rate, _steal(before, _cpu_times(), cores)
    finally:
        stop.set()
        proc.join(60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "read_beside_compute-cpu.json"))
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("read_beside_compute needs two usable cores (one computes, the other reads)")
    first, second = cores[0], cores[1]
    path = random_file("read_beside_compute.bin", FILE_BYTES)
    os.sched_setaffinity(0, {second})
    reader = Reader(path, second)
    os.sched_setaffinity(0, {first})
    gemv = Gemv()
    rows = []
    for rnd in range(args.rounds):
        for mode in READ_MODES:
            rate, steal = _beside(mode, first, path, reader.rate, [first, second])
            rows.append({"measure": "read", "beside": mode, "round": rnd, "gb_s": rate / 1e9, "steal": steal})
        for mode in GEMV_MODES:
            rate, steal = _beside(mode, second, path, gemv.rate, [first, second])
            rows.append({"measure": "gemv", "beside": mode, "round": rnd, "gb_s": rate / 1e9, "steal": steal})
    summary = {}
    for measure, modes in (("read", READ_MODES), ("gemv", GEMV_MODES)):
        idle = statistics.median(r["gb_s"] for r in rows if r["measure"] == measure and r["beside"] == "idle")
        for mode in modes:
            mine = [r for r in rows if r["measure"] == measure and r["beside"] == mode]
            med = statistics.median(r["gb_s"] for r in mine)
            summary[f"{measure} beside {mode}"] = {"median_gb_s": med, "vs_idle": med / idle,
                                                   "median_steal": statistics.median(r["steal"] for r in mine)}

    print(f"reads: O_DIRECT, {PIECE >> 20} MiB pieces, {IO_THREADS} threads on core {second}; GEMV: batch 1, "
          f"{gemv.nbytes / 1e6:.0f} MB float32, 1 thread on core {first}; medians of {args.rounds} alternating rounds")
    print(f"{'measured':>9} {'other core':>11} {'GB/s':>7} {'vs idle':>8} {'steal':>6}   rounds")
    for key, s in summary.items():
        measure, _, mode = key.split()
        each = " ".join(f"{r['gb_s']:.2f}" for r in rows if r["measure"] == measure and r["beside"] == mode)
        print(f"{measure:>9} {mode:>11} {s['median_gb_s']:>7.2f} {s['vs_idle']:>8.2f} {s['median_steal']:>6.0%}   {each}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance("read_beside_compute.py", argv), "piece_bytes": PIECE,
                               "io_threads": IO_THREADS, "gemv_bytes": gemv.nbytes, "gemv_shape": GEMV_SHAPE,
                               "summary": summary, "rows": rows}, indent=2))
    _plot(summary, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (measure, modes, title) in zip(axes, (("read", READ_MODES, "O_DIRECT reads, the other core ..."),
                                                  ("gemv", GEMV_MODES, "batch-1 GEMV, the other core ..."))):
        values = [summary[f"{measure} beside {m}"]["median_gb_s"] for m in modes]
        ax.bar(modes, values, color=["#888"] + ["#c44"] * (len(modes) - 1))
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("GB/s")
    fig.suptitle("reads and a memory-bound GEMV on two cores of one machine (medians)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
