"""Summarise a step profile (see sitecustomize.py here): per step shape, the median step time of
each engine and their ratio, and VTENSOR's time on block updates.

    python benchmarks/step_profile/report.py DIR
"""
from __future__ import annotations

import collections
import glob
import os
import statistics
import sys


def load(directory: str) -> dict[str, list[tuple[float, float, float, str]]]:
    steps = collections.defaultdict(list)  # engine -> [(time, ms, update ms, shape)]
    for path in glob.glob(os.path.join(directory, "steps-*.txt")):
        with open(path) as f:
            for line in f:
                t, engine, ms, upd, *shape = line.split()
                steps[engine].append((float(t), float(ms), float(upd), " ".join(shape)))
    return steps


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    steps = load(argv[0])
    va, vt = steps.get("va", []), steps.get("vt", [])
    if not va or not vt:
        print(f"no steps of both engines under {argv[0]} (found: {sorted(steps)})")
        return 1
    by_shape = lambda rows: collections.Counter(r[3] for r in rows)  # noqa: E731
    common = [s for s, n in by_shape(va).items() if n >= 5 and by_shape(vt)[s] >= 5]
    print(f"{'step shape':40}{'n':>6}{'vanilla ms':>12}{'vtensor ms':>12}{'ratio':>8}{'updates ms':>12}")
    for shape in sorted(common, key=lambda s: -by_shape(va)[s]):
        a = [r[1] for r in va if r[3] == shape]
        b = [r for r in vt if r[3] == shape]
        ma, mb = statistics.median(a), statistics.median(r[1] for r in b)
        print(f"{shape:40}{len(a):>6}{ma:>12.2f}{mb:>12.2f}{mb / ma:>8.3f}{statistics.median(r[2] for r in b):>12.3f}")
    print(f"\nVTENSOR block updates: {sum(r[2] for r in vt) / 1e3:.3f} s over {len(vt)} steps; "
          f"slowest: " + ", ".join(f"{r[2]:.1f} ms ({r[3]})" for r in sorted(vt, key=lambda r: -r[2])[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
