"""The shared KV pool's ledger: engines in separate processes never commit past the pool together, a
killed engine's share comes back, and a pool that cannot be used is refused with its fix."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from vllm_vtensor.ledger import PoolError, list_pools, open_pool

MiB = 1 << 20
POOL = 64 * MiB


@pytest.fixture
def folder(tmp_path):
    os.chmod(tmp_path, 0o700)
    return tmp_path


def _join(ledger, pid=None):
    return ledger.join(engine_pid=pid or os.getpid(), worker_pid=pid, chunk_bytes=MiB, ceiling=POOL, label="t")


def test_commitments_are_bounded_by_the_pool(folder):
    a = open_pool("p", POOL, "cpu", folder)
    s = _join(a)
    assert a.commit(s, claim=40 * MiB) and a.commit(s, physical=30 * MiB)
    assert a.view().committed == 40 * MiB  # max(claim, physical)
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        b = open_pool("p", None, "cpu", folder)  # a later engine joins without naming the size
        t = _join(b, child.pid)
        assert b.commit(t, claim=24 * MiB) and not b.commit(t, claim=25 * MiB)
        assert b.commit(t, physical=20 * MiB)  # within its own claim: the commitment does not grow
        assert not a.commit(s, physical=41 * MiB)  # past the pool: refused, nothing written
        assert a.view().committed == POOL
        assert a.commit(s, claim=10 * MiB)  # giving back is always allowed
        assert a.view().free == 10 * MiB and b.commit(t, claim=34 * MiB)
        assert a.view().overdrawn == 0
        assert a.commit(s, physical=50 * MiB, force=True)  # a forced figure is the truth, counted even if over
        assert a.view().free == -20 * MiB and a.view().overdrawn == b.peek().overdrawn == 20 * MiB  # and remembered
    finally:
        child.kill()
        child.join()
    assert a.view().committed == 50 * MiB  # the dead engine's share is gone
    assert list_pools(folder) == ["p"]


def _killed_engine(folder, name):
    """An engine in a forked process holding 48 MiB of the pool, killed with SIGKILL (not yet reaped); returns
    the process and a ledger of the pool opened beside it."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()

    def engine():
        ledger = open_pool(name, POOL, "cpu", folder)
        ledger.commit(_join(ledger), claim=48 * MiB, physical=48 * MiB)
        ready.set()
        time.sleep(60)

    p = ctx.Process(target=engine)
    p.start()
    assert ready.wait(30)
    ledger = open_pool(name, None, "cpu", folder)
    assert ledger.view().free == 16 * MiB
    os.kill(p.pid, signal.SIGKILL)
    return p, ledger


def test_a_killed_engine_gives_its_share_back(folder):
    p, ledger = _killed_engine(folder, "k")
    p.join()
    view = ledger.view()
    assert view.free == POOL and not view.engines


def test_a_killed_engine_not_yet_reaped_gives_its_share_back(folder):
    """A killed worker whose parent died with it stays a zombie until the system's init reaps it: it has
    exited and holds no memory, so its share comes back at once (here: killed and not yet reaped)."""
    p, ledger = _killed_engine(folder, "z")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{p.pid}/stat").read_bytes().split(b") ")[1][:1] != b"Z" and time.monotonic() < deadline:
        time.sleep(0.01)  # exited, not reaped: a zombie
    view = ledger.view()
    p.join()
    assert view.free == POOL and not view.engines


def _churn(folder, name, seed, ops):
    """One engine: random claims, creations and releases; every view it takes must be within the pool
    (exit code 3 if one is not)."""
    rng = random.Random(seed)
    ledger = open_pool(name, None, "cpu", folder)
    slot = _join(ledger)
    claim = physical = 0
    for _ in range(ops):
        kind = rng.choice(("claim", "physical"))
        new = max(0, (claim if kind == "claim" else physical) + rng.choice((-3, -1, 1, 2, 5)) * MiB)
        if ledger.commit(slot, **{kind: new}):
            claim, physical = (new, physical) if kind == "claim" else (claim, new)
        view = ledger.view()
        if view.committed > view.pool_bytes:
            os._exit(3)
    os._exit(0)


@hsettings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=4), kill=st.sets(st.integers(0, 3), max_size=2),
       ops=st.integers(20, 120))
def test_concurrent_engines_never_pass_the_pool_and_leak_nothing(folder, seeds, kill, ops):
    name = f"h{random.randrange(1 << 30)}"
    open_pool(name, POOL, "cpu", folder)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_churn, args=(folder, name, s, ops)) for s in seeds]
    for p in procs:
        p.start()
    killed = [p for i, p in enumerate(procs) if i in kill]
    time.sleep(0.01)
    for p in killed:
        try:
            os.kill(p.pid, signal.SIGKILL)  # mid-sequence, holding whatever it had committed
        except ProcessLookupError:
            pass  # it had finished already (and was reaped)
    for p in procs:
        p.join(60)
    codes = [p.exitcode for p in procs]
    assert 3 not in codes, codes  # no engine ever saw the pool's total past its size
    assert all(p.exitcode == 0 for p in procs if p not in killed), codes
    view = open_pool(name, None, "cpu", folder).view()
    assert not view.engines and view.free == POOL  # every engine is gone, and so is every byte it held
    assert view.overdrawn == 0  # nor did the total pass the pool between the views


def test_a_size_that_differs_from_the_pool_in_use_is_refused(folder):
    ledger = open_pool("s", POOL, "cpu", folder)
    slot = _join(ledger)
    with pytest.raises(PoolError, match="give the same size, leave VTENSOR_POOL_BYTES unset"):
        open_pool("s", 2 * POOL, "cpu", folder)
    with pytest.raises(PoolError, match="joins the pool of its own device"):
        open_pool("s", None, "cuda:0", folder)
    ledger.leave(slot)
    assert open_pool("s", 2 * POOL, "cpu", folder).pool_bytes == 2 * POOL  # unused: the newcomer sizes it


def test_a_pool_file_others_can_read_or_own_is_refused(folder):
    open_pool("o", POOL, "cpu", folder)
    path = folder / "pool-o"
    assert (path.stat().st_mode & 0o777) == 0o600
    os.chmod(path, 0o644)
    with pytest.raises(PoolError, match="another user or others may read it"):
        open_pool("o", None, "cpu", folder)
    os.chmod(path, 0o600)
    if os.getuid() == 0:
        os.chown(path, 65534, 65534)
        with pytest.raises(PoolError, match="another user"):
            open_pool("o", None, "cpu", folder)


@pytest.mark.parametrize("name, size, match", [
    ("new", None, "the first engine on it sets VTENSOR_POOL_BYTES"),
    ("bad/name", POOL, "a pool name is 1-64 letters"),
    ("z", 0, "give the pool's size"),
])
def test_unusable_pool_settings_name_their_fix(folder, name, size, match):
    with pytest.raises(PoolError, match=match):
        open_pool(name, size, "cpu", folder)


def test_top_and_metrics_show_each_engine_on_the_pool(monkeypatch, capsys):
    """``python -m vllm_vtensor.top`` lists the pool's engines; an API server's /metrics reports the pool and
    its own engine (the one whose engine core is its child)."""
    from vllm_vtensor import metrics, top
    from vllm_vtensor.ledger import pool_path
    from vllm_vtensor.stats import private_folder

    name = f"top-{os.getpid()}-{random.randrange(1 << 20)}"
    ledger = open_pool(name, POOL, "cpu")
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        mine = ledger.join(engine_pid=child.pid, worker_pid=child.pid, chunk_bytes=MiB, ceiling=POOL, label="chat")
        other = _join(ledger)  # an engine core that is not this process's child
        ledger.commit(mine, claim=20 * MiB, used=12 * MiB, cached=8 * MiB, want=3 * MiB, preemptions=2, force=True)
        ledger.commit(other, physical=10 * MiB)
        assert top.main(["--pool", name, "--once"]) == 0
        out = capsys.readouterr().out
        assert f"pool {name} on cpu: 64 MiB, 30 MiB committed by 2 engine(s), 34 MiB free" in out
        assert any(line.split()[:2] == ["chat", str(child.pid)] and line.split()[2:8] == ["20.0", "12.0", "8.0", "64",
                                                                                          "3.0", "2"]
                   for line in out.splitlines()), out
        monkeypatch.setenv("VTENSOR_POOL", name)
        metrics._pool_view.clear()
        monkeypatch.setattr(metrics, "_ledger", None)
        got = {m.name: m.samples[0].value for m in metrics._Collector().collect() if m.name.startswith("vllm_vtensor_pool")}
        assert got == {"vllm_vtensor_pool_bytes": POOL, "vllm_vtensor_pool_committed_bytes": 30 * MiB,
                       "vllm_vtensor_pool_engines": 2, "vllm_vtensor_pool_engine_committed_bytes": 20 * MiB,
                       "vllm_vtensor_pool_engine_want_bytes": 3 * MiB}
    finally:
        child.kill()
        child.join()
        pool_path(private_folder(), name).unlink()


def test_a_workers_chunks_stay_within_the_pool_and_its_reserve_yields_to_waiting_engines(folder):
    """The worker's chunk pool on a shared pool: chunks made ahead of need (the reserve) only where the pool
    has room and no other engine waits for memory; idle chunks given back count at once."""
    from types import SimpleNamespace

    from vllm_vtensor.pool import ChunkPool
    from vllm_vtensor.shared_pool import WorkerShare
    from vllm_vtensor.vmm.host import HostBackend

    backend = HostBackend()
    chunk = 256 * backend.granularity
    ledger = open_pool("w", 8 * chunk, "cpu", folder)
    other = ledger.join(engine_pid=os.getpid(), worker_pid=os.getpid(), chunk_bytes=chunk, ceiling=8 * chunk,
                        label="other")
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    pool = ChunkPool(backend, 8 * chunk, chunk, low_watermark=2, high_watermark=4)
    try:
        slot = ledger.join(engine_pid=child.pid, worker_pid=os.getpid(), chunk_bytes=chunk, ceiling=8 * chunk,
                           label="me")
        in_flight = []  # chunks of a request whose unmap is still in flight (deferred unmaps, on CUDA)

        def wait_for_unmaps():
            done = list(in_flight)
            in_flight.clear()
            for c in done:
                pool.release(c)
            return bool(done)

        share = WorkerShare(ledger, slot, SimpleNamespace(chunk_bytes=chunk, pool=pool, wait_for_unmaps=wait_for_unmaps))

        def mine():
            return next(e for e in ledger.view().engines if e.slot == slot)

        deadline = time.monotonic() + 10
        while pool.stats().chunks_cached < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.stats().chunks_cached == 4 and mine().physical == 4 * chunk  # the reserve, counted
        assert ledger.commit(other, claim=4 * chunk, want=2 * chunk)  # the pool is full; the other engine waits
        assert not share.grow(5, reserve=True)  # no reserve while another engine waits
        got = pool.acquire(4)  # the reserve serves the worker's own blocks
        time.sleep(0.3)  # the chunk thread looks (every 0.1 s while refused)
        assert pool.stats().chunks_cached == 0 and mine().physical == 4 * chunk  # not refilled: no room, a waiter
        in_flight.append(got[-1])
        assert pool.acquire(1) == got[-1:]  # no room on the pool: the unmap in flight is waited for, its chunk taken
        assert mine().physical == 4 * chunk and ledger.view().overdrawn == 0
        got += pool.acquire(1)  # nothing comes back: made anyway (a step never fails), counted as such
        assert mine().physical == 5 * chunk and ledger.view().overdrawn == chunk
        for c in got:
            pool.release(c)
        pool.trim()
        assert mine().physical == 0 and ledger.view().free == 4 * chunk
    finally:
        pool.close()
        child.kill()
        child.join()
