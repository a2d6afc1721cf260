"""Summarise a step profile (see sitecustomize.py here): per step shape, the median step time of
each engine against vanilla's and their ratio, VTENSOR's time on block updates, and which VMM
backend calls that time went to (and those made beside the steps on other threads). Engines are
labelled ``va``/``vt``, or by name where a benchmark runs several (``VTENSOR_STEP_PROFILE_LABEL``).

    python benchmarks/step_profile/report.py DIR
"""
from __future__ import annotations

import collections
import glob
import os
import statistics
import sys

from vmm_ops import add_ops, parse_ops


def load(directory: str) -> dict[str, list[tuple]]:
    """engine -> [(time, ms, update ms, shape, the update's VMM calls, calls beside it)] (the calls as
    ``{op: (calls, seconds)}``; empty in profiles written before they were recorded)."""
    steps = collections.defaultdict(list)
    for path in glob.glob(os.path.join(directory, "steps-*.txt")):
        with open(path) as f:
            for line in f:
                t, engine, ms, upd, *rest = line.split()
                fields = {k: v for k, _, v in (w.partition("=") for w in rest if w.startswith(("ops=", "beside=")))}
                shape = " ".join(w for w in rest if not w.startswith(("ops=", "beside=")))
                steps[engine].append((float(t), float(ms), float(upd), shape, parse_ops(fields.get("ops", "")),
                                      parse_ops(fields.get("beside", ""))))
    return steps


def op_totals(rows, which: int = 4) -> dict[str, list]:
    """``{op: [calls, seconds]}`` over ``rows`` (``which``: 4 the updates' own calls, 5 those beside)."""
    total: dict[str, list] = {}
    for r in rows:
        if len(r) > which:
            add_ops(total, r[which])
    return total


STEP_KINDS = ("starting requests", "finishing requests", "starting and finishing requests", "neither")


def step_kind(shape: str) -> str:
    """A step by what its block updates had to do (one of :data:`STEP_KINDS`): map new requests' ranges,
    unmap finished ones', both, or neither (only running requests growing)."""
    fields = dict(w.split("=", 1) for w in shape.split() if "=" in w)
    new, fin = int(fields.get("new", 0)), int(fields.get("fin", 0))
    return STEP_KINDS[2] if new and fin else STEP_KINDS[0] if new else STEP_KINDS[1] if fin else STEP_KINDS[3]


def by_kind(rows) -> dict[str, list]:
    """``rows`` grouped by :func:`step_kind`, in the order of :data:`STEP_KINDS` (kinds with no step left out)."""
    kinds = {kind: [] for kind in STEP_KINDS}
    for r in rows:
        kinds[step_kind(r[3])].append(r)
    return {kind: rs for kind, rs in kinds.items() if rs}


def describe_ops(rows) -> str:
    """The block updates' time by VMM call, what those calls leave (bookkeeping, waits), the same for each
    kind of step (:func:`step_kind`), and the calls other threads made beside the steps; empty when the
    profile has no calls recorded."""
    own, beside = op_totals(rows, 4), op_totals(rows, 5)
    if not own and not beside:
        return ""
    fmt = lambda ops: ", ".join(f"{k} {n} x {s * 1e6 / max(n, 1):.0f} us = {s:.3f} s"  # noqa: E731
                                for k, (n, s) in sorted(ops.items(), key=lambda kv: -kv[1][1])) or "none"
    rest = lambda rs, ops: sum(r[2] for r in rs) / 1e3 - sum(s for _, s in ops.values())  # noqa: E731
    lines = [f"  block updates by VMM call: {fmt(own)}; bookkeeping and waits {rest(rows, own):.3f} s"]
    for kind, rs in by_kind(rows).items():
        ops = op_totals(rs, 4)
        lines.append(f"    steps {kind} ({len(rs)}, updates {sum(r[2] for r in rs) / 1e3:.3f} s): "
                     f"{fmt(ops)}; bookkeeping and waits {rest(rs, ops):.3f} s")
    lines.append(f"  VMM calls beside the steps (other threads): {fmt(beside)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    steps = load(argv[0])
    base = next((b for b in ("va", "vanilla") if b in steps), None)
    others = [e for e in sorted(steps) if e != base]
    if base is None or not others:
        print(f"no steps of vanilla and another engine under {argv[0]} (found: {sorted(steps)})")
        return 1
    by_shape = lambda rows: collections.Counter(r[3] for r in rows)  # noqa: E731
    va = steps[base]
    for engine in others:
        vt = steps[engine]
        common = [s for s, n in by_shape(va).items() if n >= 5 and by_shape(vt)[s] >= 5]
        print(f"\n{engine} against {base}")
        print(f"{'step shape':40}{'n':>6}{'vanilla ms':>12}{engine[:11] + ' ms':>15}{'ratio':>8}{'updates ms':>12}")
        for shape in sorted(common, key=lambda s: -by_shape(va)[s]):
            a = [r[1] for r in va if r[3] == shape]
            b = [r for r in vt if r[3] == shape]
            ma, mb = statistics.median(a), statistics.median(r[1] for r in b)
            print(f"{shape:40}{len(a):>6}{ma:>12.2f}{mb:>15.2f}{mb / ma:>8.3f}"
                  f"{statistics.median(r[2] for r in b):>12.3f}")
        print(f"{engine}: block updates {sum(r[2] for r in vt) / 1e3:.3f} s, step time {sum(r[1] for r in vt) / 1e3:.3f} s "
              f"over {len(vt)} steps ({base}: {sum(r[1] for r in va) / 1e3:.3f} s over {len(va)}); slowest updates: "
              + ", ".join(f"{r[2]:.1f} ms ({r[3]})" for r in sorted(vt, key=lambda r: -r[2])[:5]))
        if ops := describe_ops(vt):
            print(ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
