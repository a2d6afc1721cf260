"""memory_budget "auto": free memory read as the kernel reports it (MemAvailable; cgroup v1 and v2
limits less usage less inactive page cache, the tightest of a cgroup and its ancestors), less the KV
cache vLLM will allocate and a margin; all the weights when they fit."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from flexoffload.config import FlexConfig, FlexConfigError
from flexoffload.memory import MIN_MARGIN, AutoBudget, cgroup_room, kv_reserve_bytes, mem_available

GiB = 1 << 30


def test_mem_available_is_read_from_meminfo(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:  24000000 kB\nMemFree:  1000 kB\nMemAvailable:  2048 kB\n")
    assert mem_available(tmp_path / "meminfo") == 2048 * 1024
    (tmp_path / "bad").write_text("MemTotal: 1 kB\n")
    with pytest.raises(OSError, match="no MemAvailable"):
        mem_available(tmp_path / "bad")


def _cgroup(root, rel, files):
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_cgroup_v1_limit_less_usage_less_inactive_cache_tightest_ancestor(tmp_path):
    root = tmp_path / "cg"
    (tmp_path / "self").write_text("9:pids:/\n4:memory:/jobs/one\n0::/\n")
    _cgroup(root, "memory/jobs/one", {"memory.limit_in_bytes": str(8 * GiB), "memory.usage_in_bytes": str(3 * GiB),
                                      "memory.stat": f"cache 5\ntotal_inactive_file {GiB}\n"})
    _cgroup(root, "memory/jobs", {"memory.limit_in_bytes": str(5 * GiB), "memory.usage_in_bytes": str(4 * GiB)})
    _cgroup(root, "memory", {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "1"})
    assert cgroup_room(tmp_path / "self", root) == (1 * GiB, "cgroup /jobs")  # the parent is tighter
    (root / "memory/jobs/memory.limit_in_bytes").write_text("9223372036854771712")  # unlimited
    assert cgroup_room(tmp_path / "self", root) == (6 * GiB, "cgroup /jobs/one")  # 8 - (3 - 1 inactive)


def test_cgroup_v2_and_no_limit(tmp_path):
    root = tmp_path / "cg"
    (tmp_path / "self").write_text("0::/user.slice/job\n")
    _cgroup(root, "user.slice/job", {"memory.max": str(2 * GiB), "memory.current": str(GiB // 2),
                                     "memory.stat": "anon 1\ninactive_file 0\n"})
    _cgroup(root, "user.slice", {"memory.max": "max", "memory.current": str(GiB)})
    assert cgroup_room(tmp_path / "self", root) == (GiB + GiB // 2, "cgroup /user.slice/job")
    (root / "user.slice/job/memory.max").write_text("max\n")
    assert cgroup_room(tmp_path / "self", root) is None
    # v2 mounted under "unified" beside v1 controllers (a hybrid hierarchy)
    hybrid = tmp_path / "hybrid"
    _cgroup(hybrid, "unified/user.slice/job", {"memory.max": str(GiB), "memory.current": "0"})
    assert cgroup_room(tmp_path / "self", hybrid) == (GiB, "cgroup /user.slice/job")


def test_auto_budget_leaves_the_kv_cache_and_a_margin():
    b = AutoBudget(free_bytes=10 * GiB, kv_bytes=2 * GiB, margin_bytes=MIN_MARGIN, where="MemAvailable")
    assert b.room_bytes == 8 * GiB - MIN_MARGIN and "for weights" in b.describe()
    assert AutoBudget(free_bytes=GiB, kv_bytes=2 * GiB, margin_bytes=0, where="x").room_bytes == 0


def test_a_draft_model_is_left_room_for(smollm2_path, tiny_llama_path, tmp_path):
    """A speculative-decoding draft model (or an EAGLE head) loads whole beside the target: its weights, in
    the dtype it runs in, read from its safetensors headers as vLLM's configuration names it (none for
    n-gram, nor for layers read from the target's own checkpoint)."""
    from vllm.engine.arg_utils import EngineArgs

    from flexoffload.memory import draft_weight_bytes
    from flexoffload.plan import checkpoint_tensors

    def config(spec):
        return EngineArgs(model=smollm2_path, dtype="float32", max_model_len=512, enforce_eager=True,
                          speculative_config=spec).create_engine_config()

    draft = config({"method": "draft_model", "model": tiny_llama_path, "num_speculative_tokens": 3})
    expected = sum(t.nbytes for t in checkpoint_tensors(tiny_llama_path, 4))  # float32
    assert draft_weight_bytes(draft) == expected > 50 << 20
    assert draft_weight_bytes(config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})) == 0
    # an EAGLE drafter's checkpoint (vLLM takes a llama checkpoint as one): counted the same way
    assert draft_weight_bytes(config({"method": "eagle", "model": tiny_llama_path, "num_speculative_tokens": 3})) == expected
    empty = draft.speculative_config.draft_model_config  # a folder without safetensors: not counted, logged
    draft.speculative_config.draft_model_config = SimpleNamespace(model=str(tmp_path), revision=None, dtype=empty.dtype)
    assert draft_weight_bytes(draft) == 0
    # a drafter read from the target's own checkpoint (MTP layers): not the whole target counted again
    draft.speculative_config.draft_model_config = SimpleNamespace(model=smollm2_path, revision=None, dtype=empty.dtype)
    assert draft_weight_bytes(draft) == 0
    b = AutoBudget(free_bytes=10 * GiB, kv_bytes=2 * GiB, margin_bytes=MIN_MARGIN, where="x", draft_bytes=GiB)
    assert b.room_bytes == 7 * GiB - MIN_MARGIN and "draft model 1024 MiB" in b.describe()


def test_auto_config_takes_all_the_weights_when_they_fit():
    cfg = FlexConfig.from_extra({"memory_budget": "auto"})
    assert cfg.auto and cfg.budget_bytes(3 * GiB, room=5 * GiB) == 3 * GiB
    assert cfg.budget_bytes(3 * GiB, room=GiB) == GiB
    with pytest.raises(FlexConfigError, match="sized from the free memory"):
        cfg.budget_bytes(3 * GiB)
    assert not FlexConfig.from_extra({"memory_budget": "1GiB"}).auto


def test_kv_reserve_is_the_set_kv_cache_else_one_max_model_len_request():
    """Per worker: under tensor parallelism a rank holds its share of the KV heads."""
    import torch

    model = SimpleNamespace(get_num_layers=lambda parallel: 30, get_head_size=lambda: 64, max_model_len=2048,
                            get_num_kv_heads=lambda parallel: max(1, 4 // parallel.tensor_parallel_size),
                            dtype=torch.float32)
    config = SimpleNamespace(cache_config=SimpleNamespace(kv_cache_memory_bytes=None, cache_dtype="auto"),
                             model_config=model, parallel_config=SimpleNamespace(tensor_parallel_size=1))
    assert kv_reserve_bytes(config) == 30 * 4 * 64 * 2 * 4 * 2048
    config.parallel_config.tensor_parallel_size = 2
    assert kv_reserve_bytes(config) == 30 * 2 * 64 * 2 * 4 * 2048
    config.cache_config.cache_dtype = "fp8"
    assert kv_reserve_bytes(config) == 30 * 2 * 64 * 2 * 1 * 2048
    config.cache_config.kv_cache_memory_bytes = 256 << 20
    assert kv_reserve_bytes(config) == 256 << 20


def test_workers_on_one_host_share_its_free_memory(monkeypatch):
    from flexoffload import memory

    monkeypatch.setattr(memory, "free_host_bytes", lambda: (8 << 30, "MemAvailable"))
    config = lambda n: SimpleNamespace(parallel_config=SimpleNamespace(local_world_size=n))  # noqa: E731
    assert memory.free_host_share(config(1)) == (8 << 30, "MemAvailable")
    assert memory.free_host_share(config(2)) == (4 << 30, "MemAvailable / 2 workers on this host")
