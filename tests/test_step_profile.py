"""The step profile's VMM call timing (benchmarks/step_profile/vmm_ops.py): a step's block updates are
split into the backend calls they made, each outermost call counted once, and calls made meanwhile
on other threads are counted apart; the step lines it writes parse back."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from vllm_vtensor.kv_space import KVSpace
from vllm_vtensor.vmm import base
from vllm_vtensor.vmm.host import HostBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "step_profile"))
from report import describe_ops, load, op_totals, step_kind  # noqa: E402
from vmm_ops import OPS, OpTimes, format_ops, parse_ops  # noqa: E402

PAGE, B = 4096, 16


@pytest.fixture
def ops(monkeypatch):
    """An OpTimes wrapping the host backend's calls for this test only."""
    for cls in (base.VMMBackend, HostBackend):
        for name in OPS:
            if name in cls.__dict__:
                monkeypatch.setattr(cls, name, cls.__dict__[name])  # restored after the test
    t = OpTimes()
    for cls in (base.VMMBackend, HostBackend):
        t.wrap(cls)
    return t


def test_a_steps_calls_are_its_own_and_other_threads_calls_are_beside_it(ops):
    backend = HostBackend()
    kv = KVSpace(backend, num_blocks=8, num_slots=2, blocks_per_slot=4, block_bytes=PAGE, block_size=B,
                 keep_full_blocks=False)
    try:
        ops.take()  # the reservation's calls
        with ops.updating():
            kv.add_request("a", [1, 2, 3])  # three chunks made on demand, mapped in one map_many
        kv.note_tokens("a", 40)
        worker = threading.Thread(target=kv.remove_request, args=("a",))
        worker.start()
        worker.join()
        own, beside = ops.take()
    finally:
        kv.close()
        backend.close()
    # map_many maps each chunk through map(): counted once, as map_many
    assert own["map_many"][0] == 1 and "map" not in own
    assert own["create_chunk"][0] == 3
    assert all(s > 0 for _, s in own.values())
    assert beside["unmap"][0] == 1 and "unmap" not in own
    assert ops.take() == ({}, {})


def test_step_lines_parse_back_and_sum_per_engine(tmp_path):
    own = {"map_many": (3, 0.00019), "create_chunk": (2, 0.0004)}
    field = format_ops(own)
    assert parse_ops(field) == {k: pytest.approx(v) for k, v in own.items()}
    assert parse_ops(format_ops({})) == {}
    (tmp_path / "steps-1.txt").write_text(
        f"1.0 vt 3.000 1.000 ops={field} beside=unmap:1:0.064 tok=32 new=0 fin=0 sched=32\n"
        f"2.0 vt 2.000 0.500 ops=- beside=- tok=32 new=0 fin=0 sched=32\n"
        "3.0 va 2.000 0.000 ops=- beside=- tok=32 new=0 fin=0 sched=32\n"
        "4.0 va 2.500 0.000 tok=16 new=1 fin=0 sched=16\n")  # a line written before calls were recorded
    steps = load(str(tmp_path))
    assert {r[3] for r in steps["vt"] + steps["va"]} == {"tok=32 new=0 fin=0 sched=32", "tok=16 new=1 fin=0 sched=16"}
    assert op_totals(steps["vt"]) == {"map_many": [3, pytest.approx(0.00019)], "create_chunk": [2, pytest.approx(0.0004)]}
    assert op_totals(steps["vt"], 5) == {"unmap": [1, pytest.approx(0.000064)]}
    text = describe_ops(steps["vt"])
    # 1.5 ms of updates, 0.59 of them in calls: the rest is bookkeeping and waits
    assert "create_chunk 2 x 200 us" in text and "bookkeeping and waits 0.001 s" in text and "unmap 1 x 64 us" in text
    # both steps only decoded (no request started or finished): one kind, all of the time
    kind_line = next(line for line in text.splitlines() if "steps neither" in line)
    assert kind_line.strip().startswith("steps neither (2, updates 0.00") and "create_chunk 2 x 200 us" in kind_line
    assert "steps starting" not in text
    assert describe_ops(steps["va"]) == ""


def test_steps_are_told_apart_by_what_their_updates_had_to_do():
    assert step_kind("tok=4096 new=15 fin=0 sched=16") == "starting requests"
    assert step_kind("tok=0 new=0 fin=7 sched=0") == "finishing requests"
    assert step_kind("tok=243 new=7 fin=1 sched=7") == "starting and finishing requests"
    assert step_kind("tok=32 new=0 fin=0 sched=32") == "neither"
