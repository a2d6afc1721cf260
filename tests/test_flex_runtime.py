"""Prefetch streamer, with reader threads and with glibc's AIO: units arrive intact in forward order
with O_DIRECT and buffered reads, synchronously (window 0) or ahead; a unit the model skips (no
logits this pass) never deadlocks the ring; the arena bounds memory; a damaged store is reported,
not hidden; AIO starts no Python thread and its reader threads run on the helper cores."""
from __future__ import annotations

import os
import random
import threading

import pytest
import torch
import torch.nn.functional as F

from flexoffload import aio
from flexoffload.runtime import HostTier, Streamer, Unit
from flexoffload.store import WeightStore, aligned


@pytest.fixture
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.w{j}": torch.randn(100 + 37 * j, 64, generator=g) for i in range(4) for j in range(2)}
    tensors["head"] = torch.randn(300, 64, generator=g)
    path = tmp_path / "w.bin"
    WeightStore.write(path, tensors)
    return path, tensors


ENGINES = ["threads", pytest.param("aio", marks=pytest.mark.skipif(aio.unavailable_reason() is not None,
                                                                   reason=str(aio.unavailable_reason())))]


def streamer(engine: str, *args, **kw) -> Streamer:
    return (aio.AioStreamer if engine == "aio" else Streamer)(*args, **kw)


def units():
    return [Unit(f"layer.{i}", [f"layers.{i}.w0", f"layers.{i}.w1"]) for i in range(4)] + [Unit("head", ["head"])]


def read_intact(s: Streamer, tensors: dict, order) -> None:
    """One forward pass over the units in ``order``: each arrives holding exactly its tensors."""
    for u in order:
        slot = s.acquire(u)
        for name, t in s.tensors(slot).items():
            assert torch.equal(t, tensors[name]), name
        s.release(slot)


def run_with_timeout(fn, seconds=20):
    errors = []

    def target():
        try:
            fn()
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "streamer deadlocked"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("window, direct", [(0, True), (1, True), (3, False)])
def test_units_arrive_intact_in_order(store, window, direct, engine):
    path, tensors = store
    us = units()
    arena = 2 * max(sum(aligned(tensors[n].numel() * 4) for n in u.names) for u in us)
    s = streamer(engine, WeightStore.open(path, direct), us, arena, window=window, io_threads=2, lock_memory=False)

    def forward_passes():
        for step in range(3):
            read_intact(s, tensors, range(5) if step != 1 else range(4))  # step 1 computes no logits
        rng = random.Random(window)
        for _ in range(25):  # random skips exercise every wrap-around of the ring
            read_intact(s, tensors, [u for u in range(5) if rng.random() > 0.2])

    run_with_timeout(forward_passes)
    consumed = 3 * sum(tensors[n].numel() * 4 for u in us[:4] for n in u.names) + 2 * tensors["head"].numel() * 4
    assert s.stats.units_read >= 14 and s.stats.bytes_streamed >= consumed and s.capacity >= arena
    s.close()


def test_units_of_one_tensor_are_read_several_at_a_time(store):
    """Read-ahead keeps up to io_threads units' reads in flight (a unit of one tensor alone would leave
    the disk idle between reads); units the model skips while they are still being read never have
    their space handed out under the read."""
    import time

    path, tensors = store
    names = sorted(tensors)
    us = [Unit(n, [n]) for n in names]
    st = WeightStore.open(path, True)
    read, lock, running, most = st.read_into, threading.Lock(), [0], [0]

    def slow_read(name, buf):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        try:
            return read(name, buf)
        finally:
            with lock:
                running[0] -= 1

    st.read_into = slow_read
    arena = 4 * max(aligned(t.numel() * 4) for t in tensors.values())
    s = Streamer(st, us, arena, window=3, io_threads=2, lock_memory=False)

    def forward_passes():
        rng = random.Random(0)
        for step in range(20):
            read_intact(s, tensors, range(len(us)) if step < 2 else [u for u in range(len(us)) if rng.random() > 0.3])

    run_with_timeout(forward_passes, 60)
    s.close()
    assert most[0] == 2 and s.stats.units_skipped > 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("window", [0, 2])
def test_units_with_tensors_in_the_host_tier_arrive_intact(store, window, engine):
    """Some tensors from a host tier, the rest of the same units from disk: every unit intact, each
    source's bytes counted, the host tier read from the store once."""
    path, tensors = store
    us = units()
    host_names = ["layers.0.w0", "layers.1.w1", "layers.3.w0", "head"]
    st = WeightStore.open(path, True)
    host = HostTier(st, host_names, lock_memory=False)
    assert "head" in host and "layers.0.w1" not in host and host.nbytes >= sum(tensors[n].numel() * 4 for n in host_names)
    arena = 2 * max(sum(aligned(tensors[n].numel() * 4) for n in u.names) for u in us)
    s = streamer(engine, st, us, arena, window=window, io_threads=2, lock_memory=False, host=host)

    def forward_passes():
        for _ in range(3):
            read_intact(s, tensors, range(5))

    run_with_timeout(forward_passes)
    from_host = sum(tensors[n].numel() * 4 for n in host_names)
    from_disk = sum(t.numel() * 4 for n, t in tensors.items() if n not in host_names)
    assert s.stats.bytes_from_host >= 3 * from_host and s.stats.bytes_streamed >= 3 * from_disk
    assert s.stats.bytes_from_host < 5 * from_host  # a bounded read-ahead, not a flood
    s.close()


def test_arena_smaller_than_a_unit_is_refused(store):
    path, _ = store
    with pytest.raises(ValueError, match="cannot hold a unit"):
        Streamer(WeightStore.open(path, True), units(), 4096, window=1, io_threads=1, lock_memory=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_store_is_reported(store, engine):
    """Cut short while in use: the read that misses its bytes fails with the tensor's name."""
    path, _ = store
    opened = WeightStore.open(path, False)
    last = max(opened.index.values(), key=lambda e: e.offset)
    with open(path, "r+b") as f:
        f.truncate(last.offset + 10)
    s = streamer(engine, opened, units(), 1 << 20, window=0, io_threads=1, lock_memory=False)
    for u in range(4):
        s.release(s.acquire(u))
    with pytest.raises(RuntimeError, match="could not read head"):
        s.acquire(4)
    s.close()


def test_truncated_store_is_refused_when_opened(store):
    """Cut short before a load (disk full, partial copy): refused up front with the fix, before any
    read, and before the mmap baseline could map pages past the file's end (SIGBUS)."""
    path, _ = store
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    with pytest.raises(OSError, match="is damaged.*delete .* and the next load rebuilds them"):
        WeightStore.open(path, False)


def test_unknown_device_is_refused(store):
    path, _ = store
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        Streamer(WeightStore.open(path, False), units(), 1 << 20, window=1, io_threads=1, lock_memory=False,
                 device="meta")


_AIO_THREADS_CHECK = """
import os, sys, threading
from pathlib import Path
from flexoffload.aio import AioStreamer
from flexoffload.runtime import Unit
from flexoffload.store import WeightStore

path, compute, helper = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.sched_setaffinity(0, {compute})  # the computing thread, pinned as vLLM pins a CPU worker
tasks = lambda: set(os.listdir("/proc/self/task"))
before, py_before = tasks(), threading.active_count()
st = WeightStore.open(path, True)
units = [Unit(n, [n]) for n in sorted(st.index)]
s = AioStreamer(st, units, 1 << 20, window=3, io_threads=2, lock_memory=False)
started = tasks() - before
cores = sorted({c for t in started for c in os.sched_getaffinity(int(t))})
for _ in range(20):
    for u in range(len(units)):
        s.release(s.acquire(u))
now = tasks() - before
print(len(started), cores, len(now - started), len(now), threading.active_count() - py_before, s.stats.units_read)
s.close()
"""


@pytest.mark.skipif(aio.unavailable_reason() is not None, reason=str(aio.unavailable_reason()))
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_aio_reads_on_reader_threads_of_the_helper_cores_and_no_python_thread(store):
    """The computing thread pinned to one core: glibc's reader threads (one per lane) start on the helper
    cores and stay at one per lane, and no Python thread is started at all. (glibc ends a reader woken
    with no work left, a race under load, and starts one again from the thread that reads next, on its
    cores: a thread started later replaces one that ended, and never more run than lanes.)"""
    import subprocess
    import sys

    path, _ = store
    compute, helper = sorted(os.sched_getaffinity(0))[:2]
    env = {**os.environ, "VTENSOR_HELPER_CORES": str(helper), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _AIO_THREADS_CHECK, str(path), str(compute), str(helper)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    started, cores, later, live, python_threads, units_read = out.stdout.split("\n")[-2].split(" ", 5)
    assert (int(started), cores, int(python_threads)) == (2, f"[{helper}]", 0)
    assert int(live) <= 2, out.stdout  # capped at the lanes (later: started again after one ended, almost always 0)
    assert int(units_read) >= 20 * 9


@pytest.mark.skipif(aio.unavailable_reason() is not None, reason=str(aio.unavailable_reason()))
def test_aio_reads_a_large_tensor_in_one_piece_per_lane(tmp_path):
    """A tensor of 256 KiB or more per lane is split across the lanes (so one lane never trails with a unit's
    largest tensor): pieces on every lane, every byte where it belongs (sizes not multiples of a page, the
    last tensor ending the file), every byte counted once; a store cut inside a piece is reported."""
    g = torch.Generator().manual_seed(1)
    tensors = {"layers.0.big": torch.randn(1001, 300, generator=g), "layers.0.small": torch.randn(7, 33, generator=g),
               "layers.1.big": torch.randn(777, 413, generator=g)}
    path = tmp_path / "w.bin"
    WeightStore.write(path, tensors)
    us = [Unit("layer.0", ["layers.0.big", "layers.0.small"]), Unit("layer.1", ["layers.1.big"])]
    st = WeightStore.open(path, True)
    s = aio.AioStreamer(st, us, 3 << 20, window=1, io_threads=2, lock_memory=False)
    lanes, read = [], s._lanes.read
    s._lanes.read = lambda lane, addr, n, off: lanes.append((lane, n)) or read(lane, addr, n, off)
    for _ in range(3):
        read_intact(s, tensors, range(2))
    s.close()
    biggest = max(aligned(t.numel() * 4) for t in tensors.values())
    assert {lane for lane, n in lanes if n > 256 << 10} == {0, 1} and max(n for _, n in lanes) <= biggest // 2 + 4096
    assert s.stats.bytes_streamed % sum(t.numel() * 4 for t in tensors.values()) == 0 and s.stats.bytes_streamed > 0
    opened = WeightStore.open(path, False)
    with open(path, "r+b") as f:  # cut inside the second piece of the last tensor
        f.truncate(st.index["layers.1.big"].offset + st.index["layers.1.big"].nbytes - 5000)
    s = aio.AioStreamer(opened, us, 3 << 20, window=0, io_threads=2, lock_memory=False)
    s.release(s.acquire(0))
    with pytest.raises(RuntimeError, match="could not read layer.1") as err:
        s.acquire(1)
    assert "short read of layers.1.big" in str(err.value.__cause__)
    s.close()


@pytest.mark.skipif(aio.unavailable_reason() is not None, reason=str(aio.unavailable_reason()))
def test_aio_streamer_refuses_a_gpu(store):
    path, _ = store
    with pytest.raises(ValueError, match="io_engine 'threads'"):
        aio.AioStreamer(WeightStore.open(path, False), units(), 1 << 20, window=1, io_threads=1, lock_memory=False,
                        device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("window, with_host", [(0, False), (1, False), (3, False), (0, True), (3, True)])
def test_cuda_units_arrive_intact_while_the_gpu_lags(store, window, with_host):
    """Streaming to a GPU: pinned staging, side-stream copies, the compute stream waiting on events.
    The GPU is kept busy (spin kernels) so it runs far behind the host: were a device or host region
    reused before the compute reading it (or the copy out of it) finished, checksums would differ.
    With a host tier, its tensors go to the device straight from it, never through the ring."""
    path, tensors = store
    us = units()
    arena = 2 * max(sum(aligned(tensors[n].numel() * 4) for n in u.names) for u in us)
    st = WeightStore.open(path, False)
    host = None
    if with_host:
        host = HostTier(st, ["layers.0.w1", "layers.2.w0", "head"], lock_memory=False)
        host.read_into = None  # the CPU path (a copy into the ring): calling it would fail the test
    s = Streamer(st, us, arena, window=window, io_threads=2, lock_memory=False, device="cuda", host=host)
    assert s.pinned and (s._host_addr is not None) == with_host
    sums, expected = [], []

    def forward_passes():
        rng = random.Random(window)
        for step in range(12):
            order = [u for u in range(5) if step < 2 or rng.random() > 0.2]
            for u in order:
                slot = s.acquire(u)
                torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time before the weights are read
                for name, t in s.tensors(slot).items():
                    assert t.is_cuda
                    sums.append(t.double().sum())
                    expected.append(tensors[name].double().sum())
                s.release(slot)

    run_with_timeout(forward_passes, 60)
    torch.cuda.synchronize()
    assert torch.stack(sums).cpu().tolist() == pytest.approx(torch.stack(expected).tolist(), rel=1e-9, abs=1e-9)
    assert s.stats.bytes_copied_to_device >= s.stats.bytes_streamed > 0
    assert (s.stats.bytes_from_host > 0) == with_host
    s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7])
def test_gemm_on_a_live_weight_equals_f_linear(dtype, tokens):
    """Streamed weights (views of the arena, never packed) run through oneDNN's matmul where PyTorch
    has it: the same result as F.linear, also on a parameter of vLLM's class and a 3-D input."""
    from vllm.model_executor.parameter import BasevLLMParameter

    from flexoffload.loader import _ONEDNN_DTYPES, _ONEDNN_LINEAR, _live_gemm

    g = torch.Generator().manual_seed(tokens)
    # vLLM's parameter class (its __torch_function__ on the way), made without a tensor-parallel group
    weight = BasevLLMParameter.__new__(BasevLLMParameter, torch.randn(96, 64, generator=g).to(dtype))
    bias = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(2, tokens, 64, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for b in (bias, None):
        torch.testing.assert_close(_live_gemm(x, weight, b), F.linear(x, weight.data, b), rtol=tol, atol=tol)
    if _ONEDNN_LINEAR and dtype in _ONEDNN_DTYPES:  # the fast path taken, not the fallback
        import unittest.mock as mock

        with mock.patch.object(F, "linear", side_effect=AssertionError("fell back")):
            _live_gemm(x, weight, bias)
    torch.testing.assert_close(_live_gemm(x.double(), weight.data.double(), None),  # no oneDNN float64: F.linear
                               F.linear(x.double(), weight.data.double()))


def test_gemm_on_a_live_weight_falls_back_to_f_linear_when_onednn_refuses(monkeypatch):
    import flexoffload.loader as loader

    def refuse(*args):
        raise RuntimeError("itensor_view_from_dense: unsupported")

    monkeypatch.setattr(loader, "_ONEDNN_LINEAR", True)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    torch.testing.assert_close(loader._live_gemm(x, w, None), F.linear(x, w))
    assert loader._ONEDNN_LINEAR is False  # asked once, not at every call


def test_host_tier_tensors_are_copied_to_the_device_from_the_host_tier(store):
    """What the CUDA copy takes for a unit mixing both sources: the ring's runs its disk reads filled
    (adjacent ones in one copy) and each host-tier tensor from the host tier itself, together covering
    the slot once. Checked on the CPU by assembling those sources (the ring's host-tier regions zeroed
    first, so a byte taken from the ring instead would show)."""
    path, tensors = store
    names = ["layers.0.w0", "layers.0.w1", "layers.1.w0", "layers.1.w1", "layers.2.w0"]
    host_names = ["layers.0.w1", "layers.2.w0"]
    st = WeightStore.open(path, True)
    host = HostTier(st, host_names, lock_memory=False)
    unit = Unit("layers", names)
    s = Streamer(st, [unit], 2 * sum(aligned(tensors[n].numel() * 4) for n in names), window=0, io_threads=2,
                 lock_memory=False, host=host)
    with s._cond:
        slot = s._enqueue()
    s._finish(s._submit(slot))  # the CPU way: host-tier tensors copied into the ring
    off = slot.start
    for name in names:
        if name in host_names:
            slot.direct[off] = host.bytes_of(name)  # the CUDA way
            s._byte_tensor[off : off + st.index[name].padded] = 0
        off += st.index[name].padded

    sources = s._copy_sources(slot)
    assert [(start, src.numel()) for start, src, _ in sources] == [
        (slot.start, st.index["layers.0.w0"].padded),
        (slot.start + st.index["layers.0.w0"].padded, st.index["layers.0.w1"].padded),
        (slot.start + sum(st.index[n].padded for n in names[:2]), st.index["layers.1.w0"].padded + st.index["layers.1.w1"].padded),
        (slot.start + sum(st.index[n].padded for n in names[:4]), st.index["layers.2.w0"].padded),
    ]
    device = torch.zeros(s.capacity, dtype=torch.uint8)
    for start, src, _ in sources:
        device[start : start + src.numel()] = src
    off = slot.start
    for name in names:
        e = st.index[name]
        got = device[off : off + e.nbytes].view(torch.float32).view(e.shape)
        assert torch.equal(got, tensors[name]), name
        off += e.padded
    s.close()


def test_metrics_read_every_tensor_parallel_ranks_snapshot(tmp_path, monkeypatch):
    """/metrics reports each rank's FlexInfer figures under its tp_rank (rank 0: the named file, which
    says how many ranks run; rank r: ``<name>.tp<r>of<n>.json``), counters as totals; a rank whose file
    is half-written, and files of another run's ranks, are left out."""
    import json

    from prometheus_client import CollectorRegistry, generate_latest

    from flexoffload import metrics
    from flexoffload.loader import rank_path

    path = str(tmp_path / "flex.json")
    for rank, forwards in ((0, 7), (1, 7)):
        with open(rank_path(path, f"tp{rank}of3"), "w") as f:
            json.dump({"budget_bytes": 100 + rank, "forwards": forwards, "bytes_streamed": 10 * (rank + 1),
                       "overlap": 0.5, "shard": f"tp{rank}of3"}, f)
    (tmp_path / "flex.tp2of3.json").write_text('{"forwards": ')  # being written
    (tmp_path / "flex.tp3of4.json").write_text('{"forwards": 1}')  # an earlier run's
    monkeypatch.setenv("FLEXOFFLOAD_STATS_FILE", path)
    metrics._read_cached.clear()
    registry = CollectorRegistry()
    registry.register(metrics._Collector())
    text = generate_latest(registry).decode()
    assert 'vllm_flexinfer_budget_bytes{tp_rank="0"} 100.0' in text
    assert 'vllm_flexinfer_budget_bytes{tp_rank="1"} 101.0' in text
    assert 'vllm_flexinfer_disk_read_bytes_total{tp_rank="1"} 20.0' in text
    assert 'vllm_flexinfer_forwards_total{tp_rank="0"} 7.0' in text
    assert 'tp_rank="2"' not in text and 'tp_rank="3"' not in text
    assert "vllm_flexinfer_arena_bytes{" not in text  # not in the snapshot: no sample
    # without tensor parallelism (no shard) only the named file counts
    with open(path, "w") as f:
        json.dump({"budget_bytes": 5, "shard": ""}, f)
    assert list(metrics.snapshots(path)) == ["0"] and metrics.snapshots(None) == {}
