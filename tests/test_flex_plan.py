"""FlexInfer planner: the plan never exceeds its budget, follows Algorithm 1 at its thresholds,
balances the resident share across layers, and refuses budgets below the minimum (saying it)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from flexoffload.config import FlexConfig, FlexConfigError
from flexoffload.plan import (BudgetError, TensorInfo, assign_host_tier, checkpoint_tensors, ffn_tier, make_plan,
                              plan_for_budget)

MiB = 1 << 20


def llama_table(n=8, ffn=4 * MiB, attn=MiB, head=0, small=4096, untied=False):
    """llama.cpp-style granularity: 3 equal FFN matrices, q/o of size attn, k/v a quarter of it; with
    ``untied`` an lm_head of its own beside the embedding table."""
    t = []
    for i in range(n):
        p = f"model.layers.{i}."
        t += [TensorInfo(p + f"mlp.{m}.weight", ffn, i, "ffn") for m in ("gate_proj", "up_proj", "down_proj")]
        t += [TensorInfo(p + "self_attn.q_proj.weight", attn, i, "attn"), TensorInfo(p + "self_attn.o_proj.weight", attn, i, "attn"),
              TensorInfo(p + "self_attn.k_proj.weight", attn // 4, i, "attn"), TensorInfo(p + "self_attn.v_proj.weight", attn // 4, i, "attn"),
              TensorInfo(p + "input_layernorm.weight", small, i, "small")]
    if head:
        t.append(TensorInfo("model.embed_tokens.weight", head, None, "head"))
        if untied:
            t.append(TensorInfo("lm_head.weight", head, None, "head"))
    return t


def ffn_kept_everywhere(plan, n=8):
    kinds = ("gate_proj", "up_proj", "down_proj")
    return sum(all(f"model.layers.{i}.mlp.{k}.weight" in plan.resident for i in range(n)) for k in kinds)


@pytest.mark.parametrize(
    "room, kept",
    [
        (3 * 4 * 8 + 2 * 1 * 8, 3),  # all FFN plus two attention matrices per layer
        (3 * 4 * 8 + 2 * 1 * 8 - 1, 2),  # all FFN would fit, but no room for attention: keep 2
        (2 * 4 * 8, 2),
        (2 * 4 * 8 - 1, 1),
        (1 * 4 * 8, 1),
        (1 * 4 * 8 - 1, 0),
    ],
)
def test_algorithm1_thresholds(room, kept):
    assert ffn_tier(room, [4, 4, 4], 1, 8) == kept


def test_flexinfer_keeps_two_ffn_and_attention_where_ffn_first_keeps_three():
    """Between the top thresholds FlexInfer prefers 2 FFN + attention over 3 FFN + none."""
    table = llama_table(8, 4 * MiB, MiB)
    budget = 112 * MiB  # room ~ 3 FFN x 8 layers (96 MiB) + a little: below the +2 attention threshold
    p = make_plan(table, budget, window=0)
    assert ffn_kept_everywhere(p) == 2 and any("q_proj" in x or "o_proj" in x for x in p.resident)
    p2 = make_plan(table, budget, window=0, policy="ffn_first")
    assert ffn_kept_everywhere(p2) == 3


def test_attention_first_keeps_attention_before_ffn():
    table = llama_table()
    p = make_plan(table, 40 * MiB, window=1, policy="attention_first")
    assert all(f"model.layers.{i}.self_attn.q_proj.weight" in p.resident for i in range(8))


def test_no_balance_fills_early_layers_first():
    table = llama_table()
    p = make_plan(table, 60 * MiB, window=1, policy="no_balance")
    assert p.layer_streamed_bytes(0) == 0 and p.layer_streamed_bytes(7) > p.layer_streamed_bytes(0)


def test_full_budget_streams_nothing():
    table = llama_table(head=10 * MiB)
    p = make_plan(table, sum(t.nbytes for t in table))
    assert p.streamed_bytes_per_forward == 0 and p.arena_bytes == 0 and not p.head_streamed


def test_an_untied_embedding_table_is_read_by_rows_whenever_the_model_does_not_fit():
    """An embedding table of its own is only looked up: below 100% it is not held, so its bytes go to
    layers; the lm_head alone is the head (resident here, streamed when it does not fit)."""
    table = llama_table(head=20 * MiB, untied=True)
    total = sum(t.nbytes for t in table)
    whole = make_plan(table, total)
    assert whole.embed_rows is None and whole.resident == {t.name for t in table}
    p = make_plan(table, total - MiB, window=1)
    assert p.embed_rows == "model.embed_tokens.weight" and p.head_names == ["lm_head.weight"]
    assert "lm_head.weight" in p.resident and p.streamed_bytes_per_forward == 0  # the table's room holds all else
    assert p.touched_bytes == total - 20 * MiB
    tied = make_plan(llama_table(head=20 * MiB), total - 20 * MiB - MiB, window=1)  # the same room, tied
    assert tied.embed_rows is None and tied.streamed_bytes_per_forward > 0
    low = make_plan(table, 40 * MiB, window=1)
    assert low.head_streamed and low.head_names == ["lm_head.weight"] and low.arena_bytes < 40 * MiB
    assert "embedding table (20.0 MiB) not held" in low.table()


def test_a_model_computing_no_logits_reads_its_tied_table_by_rows():
    """A pooling model never uses its lm_head: a tied embedding table is then only looked up, so below
    100% it is read by rows, not streamed whole as a head would be every forward pass."""
    table = llama_table(head=20 * MiB)
    budget = sum(t.nbytes for t in table) - MiB
    tied = make_plan(table, budget, window=1)
    assert tied.head_names == ["model.embed_tokens.weight"] and tied.streamed_bytes_per_forward > 0
    pooling = make_plan(table, budget, window=1, logits=False)
    assert pooling.embed_rows == "model.embed_tokens.weight" and pooling.head_names == []
    assert pooling.streamed_bytes_per_forward == 0 and "model.embed_tokens.weight" not in pooling.resident
    assert "no lm_head (no logits computed)" in pooling.table()


def test_head_streams_when_it_does_not_fit_in_runs_no_larger_than_a_layer():
    """A streamed head goes in runs of rows: the arena holds window + 1 of them (or of the layers'
    units), not the whole head, and what it does not need stays for resident layer tensors."""
    table = llama_table(head=40 * MiB)  # a layer: 14.5 MiB
    p = make_plan(table, 60 * MiB, window=1)
    assert p.head_streamed and p.head_chunk_bytes == 14.5 * MiB
    assert p.arena_bytes == 2 * p.head_chunk_bytes < 40 * MiB
    assert p.resident_bytes + p.arena_bytes <= p.budget
    big = make_plan(llama_table(head=400 * MiB), 120 * MiB, window=1)  # an eighth of the head is more
    assert big.head_chunk_bytes == 50 * MiB and big.arena_bytes == 100 * MiB


def test_budget_below_minimum_says_the_minimum():
    with pytest.raises(BudgetError, match=r"below the minimum \d+\.\d MiB"):
        make_plan(llama_table(), 10 * MiB)


def test_default_window_shrinks_to_fit_a_tight_budget_but_an_explicit_one_is_kept():
    table = llama_table(8, 4 * MiB, MiB)  # a layer: 14.5 MiB; 4 layer buffers (window 3) need 58 MiB
    budget = 40 * MiB  # holds the buffers of window 1 (29 MiB) plus some resident tensors
    p = plan_for_budget(table, budget)
    assert p.window == 1 and p.resident_bytes + p.arena_bytes <= budget
    assert plan_for_budget(table, 200 * MiB).window == 3  # room: the default window
    with pytest.raises(BudgetError, match="lower prefetch_window"):
        plan_for_budget(table, budget, window=3)
    with pytest.raises(BudgetError, match=r"buffers for 1 layers"):  # below window 0's minimum: the smallest is named
        plan_for_budget(table, 10 * MiB)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 12), ffn=st.integers(1, 64), attn=st.integers(1, 32), head=st.integers(0, 200),
    window=st.integers(0, 4), frac=st.floats(0.0, 1.2),
    policy=st.sampled_from(["flexinfer", "ffn_first", "attention_first", "no_balance"]),
)
def test_plans_respect_budget_and_cover_every_tensor(n, ffn, attn, head, window, frac, policy):
    table = llama_table(n, ffn * 65536, attn * 65536, head * 65536)
    total = sum(t.nbytes for t in table)
    budget = int(frac * total)
    try:
        p = make_plan(table, budget, window=window, policy=policy)
    except BudgetError:
        return
    assert p.resident_bytes + p.arena_bytes <= budget
    streamed = {x for names in p.streamed.values() for x in names}
    layer_tensors = {t.name for t in table if t.layer is not None and t.kind != "small"}
    assert streamed.isdisjoint(p.resident) and layer_tensors <= streamed | p.resident
    if p.streamed:
        biggest = max(p.layer_streamed_bytes(i) for i in range(n))
        assert p.arena_bytes >= (window + 1) * biggest
    if policy == "flexinfer":  # balanced: a kind's resident count differs by at most one across layers
        per_layer = [sum(t.nbytes for t in table if t.layer == i and t.name in p.resident) for i in range(n)]
        kinds = {t.name.split(f"layers.{t.layer}.")[1]: t.nbytes for t in table if t.layer is not None}
        assert max(per_layer) - min(per_layer) <= sum(kinds.values())
        streams = [p.layer_streamed_bytes(i) for i in range(n)]
        assert max(streams) - min(streams) <= sum(kinds.values())


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 12), ffn=st.integers(1, 64), attn=st.integers(1, 32), head=st.integers(0, 200),
    frac=st.floats(0.0, 1.0), host_frac=st.floats(0.0, 1.2), untied=st.booleans(),
)
def test_three_tiers_respect_their_budgets_place_every_tensor_once_and_balance(n, ffn, attn, head, frac, host_frac,
                                                                               untied):
    """Device (resident + arena), host tier and disk: no tier over its budget, every tensor in exactly one
    (the host tier only streamed ones; an untied embedding table in none, read by rows, whenever the
    model does not fit whole), and each layer's disk bytes within one tensor kind of the others'."""
    table = llama_table(n, ffn * 65536, attn * 65536, head * 65536, untied=untied)
    total = sum(t.nbytes for t in table)
    try:
        p = make_plan(table, int(frac * total), window=2)
    except BudgetError:
        return
    streamed = {x for names in p.streamed.values() for x in names} | (set(p.head_names) if p.head_streamed else set())
    host_budget = int(host_frac * sum(p.sizes[x] for x in streamed))
    assign_host_tier(p, host_budget)
    assert p.host_bytes <= host_budget and p.host <= streamed and p.host.isdisjoint(p.resident)
    disk = streamed - p.host
    rows = {p.embed_rows} if p.embed_rows else set()
    assert p.embed_rows == ("model.embed_tokens.weight" if untied and head and int(frac * total) < total else None)
    assert p.resident | streamed | rows == {t.name for t in table} and p.resident.isdisjoint(streamed | rows)
    assert rows.isdisjoint(streamed) and p.resident_bytes + p.arena_bytes <= p.budget
    assert p.disk_bytes_per_forward == sum(p.sizes[x] for x in disk)
    assert p.disk_bytes_per_forward + p.host_streamed_bytes_per_forward == p.streamed_bytes_per_forward
    if host_budget >= sum(p.sizes[x] for x in streamed):
        assert p.disk_bytes_per_forward == 0  # a host tier as large as what streams takes all of it
    kinds = {t.name.split(f"layers.{t.layer}.")[1]: t.nbytes for t in table if t.layer is not None}
    per_layer_disk = [p.layer_streamed_bytes(i) - p.layer_host_bytes(i) for i in range(n)]
    assert max(per_layer_disk) - min(per_layer_disk) <= sum(kinds.values())


def test_host_tier_takes_the_largest_kinds_first_spread_over_the_layers():
    table = llama_table(8, 4 * MiB, MiB)
    p = make_plan(table, 30 * MiB, window=1)
    assert p.streamed_bytes_per_forward > 0
    gate = [n for names in p.streamed.values() for n in names if "gate_proj" in n]
    assign_host_tier(p, 4 * 4 * MiB)  # room for four of the largest tensors: every other layer's
    held = sorted(int(n.split("layers.")[1].split(".")[0]) for n in p.host)
    assert len(p.host) == 4 and all(n in gate or "mlp" in n for n in p.host) and held == [0, 2, 4, 6], held
    with pytest.raises(BudgetError, match="host_budget"):
        assign_host_tier(p, -1)
    assert "host tier 16.0 MiB" in p.table() and "*" in p.table()


def test_host_budget_option():
    cfg = FlexConfig.from_extra({"memory_budget": 0.5, "host_budget": 0.25})
    assert cfg.host_budget_bytes(1000, free_host=None) == 250
    assert FlexConfig.from_extra({"memory_budget": 0.5}).host_budget_bytes(1000, None, "cpu") == 0
    assert FlexConfig.from_extra({"memory_budget": 0.5}).host_budget_bytes(1000, 8 << 30, "cuda") > 7 << 30  # auto
    with pytest.raises(FlexConfigError, match="more than the host can spare"):
        FlexConfig.from_extra({"memory_budget": 0.5, "host_budget": "10GiB"}).host_budget_bytes(1, free_host=1 << 30)
    for bad, msg in (("-1GiB", "host_budget"), ("lots", "host_budget 'lots'"), (1.5, r"in \[0, 1\]")):
        with pytest.raises(FlexConfigError, match=msg):
            FlexConfig.from_extra({"memory_budget": 0.5, "host_budget": bad})
    with pytest.raises(FlexConfigError, match="host_budget applies to streamed weights"):
        FlexConfig.from_extra({"memory_budget": 0.5, "policy": "mmap", "host_budget": "1GiB"})


def test_config_validation():
    with pytest.raises(FlexConfigError, match="needs a memory budget"):
        FlexConfig.from_extra({})
    with pytest.raises(FlexConfigError, match="unknown flexinfer option"):
        FlexConfig.from_extra({"memory_budget": "1GiB", "prefetch": 2})
    with pytest.raises(FlexConfigError, match=r"in \(0, 1\]"):
        FlexConfig.from_extra({"memory_budget": 1.5})
    with pytest.raises(FlexConfigError, match="KiB/MiB/GiB"):
        FlexConfig.from_extra({"memory_budget": "lots"})
    with pytest.raises(FlexConfigError, match=r"\['io_threads', 'prefetch_window'\] apply to streamed weights"):
        FlexConfig.from_extra({"memory_budget": 0.5, "policy": "mmap", "prefetch_window": 2, "io_threads": 4})
    assert FlexConfig.from_extra({"memory_budget": 0.5, "policy": "mmap", "cache_dir": "/tmp"}).policy == "mmap"
    with pytest.raises(FlexConfigError, match=r"io_engine 'uring' is not one of \('auto', 'aio', 'threads'\)"):
        FlexConfig.from_extra({"memory_budget": 0.5, "io_engine": "uring"})
    with pytest.raises(FlexConfigError, match=r"\['io_engine'\] apply to streamed weights"):
        FlexConfig.from_extra({"memory_budget": 0.5, "policy": "mmap", "io_engine": "aio"})
    with pytest.raises(FlexConfigError, match=r"gemv 'blas' is not one of \('auto', 'onednn', 'linear', 'mv'\)"):
        FlexConfig.from_extra({"memory_budget": 0.5, "gemv": "blas"})
    with pytest.raises(FlexConfigError, match=r"\['gemv'\] apply to streamed weights"):
        FlexConfig.from_extra({"memory_budget": 0.5, "policy": "mmap", "gemv": "mv"})
    assert FlexConfig.from_extra({"memory_budget": 0.5, "gemv": "mv"}).gemv == "mv"
    cfg = FlexConfig.from_extra({"memory_budget": 0.5})
    assert cfg.budget_bytes(1000) == 500 and FlexConfig.from_extra({"memory_budget": "25%"}).budget_bytes(1000) == 250
    assert FlexConfig.from_extra({"memory_budget": "800MB"}).budget_bytes(1) == 800_000_000


def test_checkpoint_table_of_smollm2(smollm2_path):
    table = checkpoint_tensors(smollm2_path, dtype_bytes=4)
    assert sum(t.kind == "ffn" for t in table) == 90 and sum(t.kind == "attn" for t in table) == 120
    assert [t.name for t in table if t.kind == "head"] == ["model.embed_tokens.weight"]


def test_the_loader_refuses_pipeline_parallelism_naming_the_fix():
    """Tensor parallelism runs (each rank its own shard); pipeline or context parallelism is refused
    before anything is built."""
    from types import SimpleNamespace

    from vllm.config import CompilationMode, LoadConfig

    from flexoffload.loader import FlexInferLoader

    loader = FlexInferLoader(LoadConfig(load_format="flexinfer", model_loader_extra_config={"memory_budget": 0.5}))
    config = SimpleNamespace(device_config=SimpleNamespace(device="cpu"),
                             compilation_config=SimpleNamespace(mode=CompilationMode.NONE),
                             parallel_config=SimpleNamespace(world_size=4, tensor_parallel_size=2),
                             speculative_config=None)
    with pytest.raises(FlexConfigError, match="--pipeline-parallel-size 1"):
        loader.load_model(config, SimpleNamespace(is_moe=False, quantization=None, is_multimodal_model=False, model="m",
                                                     hf_config=SimpleNamespace(), get_num_experts=lambda: 0))


def test_the_loader_picks_its_read_engine_by_device_and_names_the_fix_where_it_cannot():
    """auto: glibc's AIO on a CPU (reader threads where glibc has none), Python reader threads on a GPU;
    aio asked for where it cannot run is refused with the fix."""
    from types import SimpleNamespace

    import torch

    from flexoffload import aio
    from flexoffload.loader import FlexInferLoader

    def pick(engine, device, reason=None):
        aio._checked, aio._unavailable = True, reason
        loader = SimpleNamespace(cfg=FlexConfig.from_extra({"memory_budget": 0.5, "io_engine": engine}))
        return FlexInferLoader._io_engine(loader, torch.device(device))

    checked, unavailable = aio._checked, aio._unavailable
    try:
        assert pick("auto", "cpu") == "aio" and pick("auto", "cuda") == "threads"
        assert pick("threads", "cpu") == "threads" and pick("aio", "cpu") == "aio"
        assert pick("auto", "cpu", "not glibc's POSIX AIO (musl)") == "threads"
        with pytest.raises(FlexConfigError, match=r"not available here \(not glibc's.*use io_engine 'auto' or 'threads'"):
            pick("aio", "cpu", "not glibc's POSIX AIO (musl)")
        with pytest.raises(FlexConfigError, match="streaming to a GPU uses reader threads"):
            pick("aio", "cuda")
    finally:
        aio._checked, aio._unavailable = checked, unavailable


def test_the_plan_command_prints_a_plan_and_refuses_what_the_loader_refuses(tmp_path, capsys):
    """`python -m flexoffload.plan`: a plan for a dense checkpoint and for a mixture of experts (its experts
    in slots); for quantized weights or a multimodal model, the loader's refusal (exit status 1) instead of a
    plan it would never run."""
    import json
    import os

    from flexoffload.plan import main
    from vllm_vtensor.models import build_tiny_llama, build_tiny_model

    rates = ["--budget", "50%", "--disk-gbps", "2", "--mem-gbps", "10"]
    dense = build_tiny_llama()
    assert main([str(dense), *rates]) == 0
    assert "predicted decode bound" in capsys.readouterr().out

    assert main([str(build_tiny_model("gpt_oss")), *rates]) == 0
    out = capsys.readouterr().out
    assert "experts: 6 MoE layers keep" in out and "of 4 experts in slots" in out and "predicted decode bound" in out

    quantized = tmp_path / "awq"
    quantized.mkdir()
    for f in dense.glob("*.safetensors"):
        os.symlink(f, quantized / f.name)
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (quantized / "config.json").write_text(json.dumps(config))
    assert main([str(quantized), *rates]) == 1
    assert "this model's weights are quantized (awq)" in capsys.readouterr().err

    config.pop("quantization_config")
    config["vision_config"] = {"model_type": "siglip_vision_model"}  # as a Gemma 3 4B+ checkpoint has
    (quantized / "config.json").write_text(json.dumps(config))
    assert main([str(quantized), *rates]) == 1
    assert "is multimodal (its decoder is nested under language_model)" in capsys.readouterr().err


def test_a_drafter_sharing_a_streamed_lm_head_is_refused_naming_the_fix():
    """EAGLE/MTP drafters compute with the target's lm_head: refused when it streams (its runs are read in
    step with the target's forward pass only), allowed when it is resident or the drafter is its own."""
    from types import SimpleNamespace

    from flexoffload.loader import check_drafter

    table = llama_table(head=20 * MiB)
    streamed = make_plan(table, 40 * MiB, window=1)
    resident = make_plan(table, sum(t.nbytes for t in table) - MiB, window=1)
    assert streamed.head_streamed and not resident.head_streamed
    with pytest.raises(FlexConfigError, match="speculative method 'eagle3' computes its drafts' logits with the "
                                              "target's lm_head, which streams"):
        check_drafter(streamed, SimpleNamespace(method="eagle3"))
    check_drafter(resident, SimpleNamespace(method="eagle3"))
    for ok in (None, SimpleNamespace(method="ngram"), SimpleNamespace(method="draft_model")):
        check_drafter(streamed, ok)


def test_an_moe_checkpoint_is_read_as_layers_of_experts():
    """Per-expert tensors (Qwen 3 MoE) and all experts in one tensor per projection (gpt-oss, with biases):
    each layer's experts, top-k, one expert's bytes and intermediate size, as vLLM's MoE layer holds them."""
    from flexoffload.plan import checkpoint_experts
    from vllm_vtensor.models import build_tiny_llama, build_tiny_model

    layers, names = checkpoint_experts(build_tiny_model("qwen3_moe"), 4)
    assert len(layers) == 6 and len(names) == 6 * 8 * 3
    m = layers["model.layers.3.mlp.experts"]
    assert (m.num_experts, m.top_k, m.part_bytes, m.inter, m.bias_bytes) == (8, 2, (2 * 512 * 256 * 4, 256 * 512 * 4),
                                                                             512, 0)
    layers, names = checkpoint_experts(build_tiny_model("gpt_oss"), 4)
    m = layers["model.layers.0.mlp.experts"]
    assert len(layers) == 6 and len(names) == 6 * 4
    assert (m.num_experts, m.top_k, m.part_bytes, m.inter, m.bias_bytes) == (4, 2, (256 * 1024 * 4, 512 * 256 * 4),
                                                                             512, (4 * 1024 + 4 * 256) * 4)
    assert checkpoint_experts(build_tiny_llama(), 4) == ({}, set())
    # every layer after the first is read ahead for (its router applied to the layer before's input)
    assert [m.reads_ahead for m in layers.values()] == [False] + [True] * 5
    assert not any(m.reads_ahead for m in checkpoint_experts(build_tiny_model("gpt_oss"), 4, False)[0].values())
    # read packed once (whole pages, none padded: 512 is a multiple of vLLM's 32), unless told otherwise
    assert all(m.packed for m in layers.values())
    assert not any(m.packed for m in checkpoint_experts(build_tiny_model("gpt_oss"), 4, True, False)[0].values())


def test_routers_stay_resident_and_gate_projections_do_not():
    """An MoE router (Qwen/Mixtral/DeepSeek's ``gate``, gpt-oss's ``router``) is small and read a layer ahead:
    always resident; a dense FFN's gate projection is an FFN tensor like the others."""
    from flexoffload.plan import classify

    assert classify("model.layers.3.mlp.gate.weight", 8 * 256 * 4, 2).kind == "small"
    assert classify("model.layers.3.mlp.router.weight", 8 * 256 * 4, 2).kind == "small"
    assert classify("model.layers.3.block_sparse_moe.gate.weight", 8 * 256 * 4, 2).kind == "small"
    assert classify("model.layers.3.mlp.gate_proj.weight", MiB, 2).kind == "ffn"
    assert classify("model.layers.3.mlp.gate_up_proj.weight", MiB, 2).kind == "ffn"


@settings(max_examples=40, deadline=None)
@given(frac=st.floats(0.3, 0.99), layers=st.integers(1, 6), experts=st.integers(2, 16), k=st.integers(1, 4),
       packed=st.booleans())
def test_expert_slots_and_the_dense_plan_share_the_budget(frac, layers, experts, k, packed):
    """Every layer gets at least its top-k slots and the layers' slots differ by at most one; the dense plan,
    the slots (with staging) and the arena fit the budget together; no expert is in the dense plan; a
    budget below the slots' minimum is refused naming it."""
    from flexoffload.experts import MoELayer, mark_packed, plan_with_slots

    dense = llama_table(n=layers, ffn=MiB // 4, attn=MiB // 4, head=2 * MiB)
    moe = {f"model.layers.{i}.mlp.experts": MoELayer(f"model.layers.{i}.mlp.experts", None, experts, k,
                                                     (MiB // 2, MiB // 4), 512, 0, ()) for i in range(layers)}
    mark_packed(moe, packed)  # read straight into their slots: no staging for the misses
    total = sum(t.nbytes for t in dense) + layers * experts * 3 * MiB // 4
    budget = int(frac * total)
    try:
        plan = plan_with_slots(dense, moe, budget, window=1)
    except BudgetError as e:
        assert "expert slots" in str(e) or "the MoE layers' experts need" in str(e)
        return
    slots = [t.slots for t in plan.experts.values()]
    assert min(slots) >= min(k, experts) and max(slots) - min(slots) <= 1 and max(slots) <= experts
    assert plan.resident_bytes + plan.arena_bytes + plan.expert_bytes <= budget
    assert plan.budget == budget and set(plan.sizes) == {t.name for t in dense}
    if min(slots) < experts:  # a layer reads experts: what is left is less than one more slot per layer
        assert budget - plan.resident_bytes - plan.arena_bytes - plan.expert_bytes < layers * 3 * MiB // 4


def test_uniform_routing_misses_are_what_an_lru_of_slots_sees():
    """The planner's expert reads per token (top-k x (E - slots) / E) against an LRU cache of slots fed
    uniformly random routing, evicting as ExpertSlots does (never an expert the same step needs)."""
    import random
    from collections import OrderedDict

    from flexoffload.plan import SlotTier

    rng = random.Random(0)
    for experts, k, slots in ((16, 4, 5), (16, 4, 11), (8, 2, 2), (32, 4, 9)):
        lru, misses, steps = OrderedDict(), 0, 20000
        for _ in range(steps):
            step = rng.sample(range(experts), k)
            for e in step:
                if e in lru:
                    lru.move_to_end(e)
                    continue
                misses += 1
                if len(lru) == slots:  # the least recently used slot this step does not need
                    del lru[next(old for old in lru if old not in step)]
                lru[e] = None
        assert misses / steps == pytest.approx(SlotTier(slots, experts, k, 1).misses_per_token, rel=0.03)


def test_the_plan_of_an_moe_checkpoint_counts_the_experts_a_token_reads(capsys):
    """The predicted decode bound of a mixture of experts: only the routed experts are touched (held whole at
    100%), the experts missing from the slots are read after routing; so it rises with the budget."""
    from flexoffload.plan import main
    from vllm_vtensor.models import build_tiny_model

    model = str(build_tiny_model("qwen3_moe"))
    bounds, reads = [], []
    for budget in ("0.5", "0.75", "1.0"):
        assert main([model, "--budget", budget, "--disk-gbps", "1", "--mem-gbps", "10"]) == 0
        out = capsys.readouterr().out
        bounds.append(float(out.split("predicted decode bound: ")[1].split()[0]))
        reads.append(float(out.split("read the others when routed to: ")[1].split()[0]) if "experts:" in out else None)
    assert reads[0] > reads[1] >= 0 and reads[2] is None  # at 100% the model is held whole: no slots
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    # whole at 100%: 2 of the 8 experts touched per layer, at memory bandwidth
    dense = sum(t.nbytes for t in checkpoint_tensors(model, 4)) - 6 * 8 * 3 * 512 * 256 * 4
    assert bounds[-1] == pytest.approx(10e9 / (dense + 6 * 2 * 3 * 512 * 256 * 4), rel=0.01)
