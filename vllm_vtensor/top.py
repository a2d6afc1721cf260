"""``python -m vllm_vtensor.top``: the engines on each shared KV pool (``VTENSOR_POOL``), live.

For every engine: what it has committed on the pool (its claim or what its worker holds, whichever is
more), what its running requests use, what its prefix cache keeps, its own ceiling, what it could not
get in its last step (want) and its preemptions.  Reads the pools' ledgers; starts nothing.

    python -m vllm_vtensor.top              # every pool of this user, refreshed every second
    python -m vllm_vtensor.top --pool chat --once
    python -m vllm_vtensor.top --json --once
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .ledger import PoolError, PoolView, list_pools, open_pool

MiB = 1 << 20


def _status(path: str) -> dict[str, int]:
    """The first fields of a process's /proc stat (for the parent pid)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}
    rest = data[data.rindex(b")") + 2:].split()
    return {"ppid": int(rest[1])}


def engines_of(pid: int, view: PoolView) -> list:
    """The engines on ``view`` whose engine core is a child of process ``pid`` (an API server's own)."""
    return [e for e in view.engines if _status(f"/proc/{e.engine_pid}/stat").get("ppid") == pid]


def table(view: PoolView) -> str:
    rows = [f"pool {view.name} on {view.device}: {view.pool_bytes / MiB:.0f} MiB, {view.committed / MiB:.0f} MiB "
            f"committed by {len(view.engines)} engine(s), {view.free / MiB:.0f} MiB free",
            f"{'engine':<24} {'pid':>7} {'committed':>10} {'used':>8} {'cached':>8} {'ceiling':>8} {'want':>7} "
            f"{'preempt':>8}   (MiB)"]
    for e in sorted(view.engines, key=lambda e: e.slot):
        rows.append(f"{e.label[:24]:<24} {e.engine_pid:>7} {e.committed / MiB:>10.1f} {e.used / MiB:>8.1f} "
                    f"{e.cached / MiB:>8.1f} {e.ceiling / MiB:>8.0f} {e.want / MiB:>7.1f} {e.preemptions:>8}")
    if view.overdrawn:
        rows.append(f"the commitments once summed {view.overdrawn / MiB:.1f} MiB past the pool (a miscount: please "
                    "report it with the engines' logs)")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_vtensor.top", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", action="append", help="a pool name (default: every pool of this user)")
    ap.add_argument("--once", action="store_true", help="print once and exit")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    ap.add_argument("--json", action="store_true", help="one JSON object per pool and refresh")
    ap.add_argument("--all", action="store_true", help="also pools no engine uses now")
    args = ap.parse_args(argv)
    while True:
        names = args.pool or list_pools()
        if not names:
            print("no shared KV pool: start engines with VTENSOR_POOL=<name> (see docs/user-guide/shared-pool.md)")
            return 1
        out = []
        for name in names:
            try:
                view = open_pool(name, None, None).view()
            except PoolError as e:
                print(e, file=sys.stderr)
                return 2
            if not view.engines and not (args.all or args.pool):
                continue
            if args.json:
                out.append(json.dumps({"pool": view.name, "device": view.device, "pool_bytes": view.pool_bytes,
                                       "committed_bytes": view.committed, "overdrawn_bytes": view.overdrawn,
                                       "engines": [e.as_dict() for e in view.engines]}))
            else:
                out.append(table(view))
        if not out:
            out.append(f"no engine on {', '.join(names)} now")
        if not args.once and not args.json and sys.stdout.isatty():
            print("\033[H\033[J", end="")
        print("\n\n".join(out), flush=True)
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
