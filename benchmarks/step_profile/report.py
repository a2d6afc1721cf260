"""Summarise a step profile (see sitecustomize.py here): per step shape, the median step time of
each engine against vanilla's and their ratio, and VTENSOR's time on block updates. Engines are
labelled ``va``/``vt``, or by name where a benchmark runs several (``VTENSOR_STEP_PROFILE_LABEL``).

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
