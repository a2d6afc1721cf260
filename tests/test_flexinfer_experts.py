"""Expert slots (flexoffload.experts): vLLM's CPU MoE packing packs each expert on its own, so an expert
packed alone into a slot equals its slice of the whole tensor packed; slots are assigned every layer's
top-k experts first, then evenly; the LRU slot choice keeps the experts a step needs."""
from __future__ import annotations

import pytest
import torch

from flexoffload import experts
from flexoffload.plan import BudgetError


def _isas():
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    if not hasattr(torch.ops._C, "prepack_moe_weight"):
        pytest.skip("this vLLM build has no CPU MoE packing")
    return ["vec"] + (["amx"] if torch.cpu._is_amx_tile_supported() else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 128, 64), (4, 64, 256)])
def test_an_expert_packed_alone_equals_its_slice_of_the_whole_packed(dtype, shape):
    for isa in _isas():
        if isa == "amx" and dtype != torch.bfloat16:
            continue
        torch.manual_seed(0)
        whole = torch.randn(shape).to(dtype)
        packed = torch.empty_like(whole)
        torch.ops._C.prepack_moe_weight(whole, packed, isa)
        for e in range(shape[0]):
            alone = torch.empty_like(whole[e : e + 1])
            torch.ops._C.prepack_moe_weight(whole[e : e + 1].clone(), alone, isa)
            assert torch.equal(alone[0], packed[e]), (isa, e)


def _layer(name, experts_n=8, top_k=2, part_bytes=(64, 36), inter=64):
    return experts.MoELayer(name, None, experts_n, top_k, part_bytes, inter, 0, ())


def test_slots_give_every_layer_its_top_k_then_spread_evenly():
    layers = {n: _layer(n) for n in ("a", "b", "c")}
    staging = 2 * 2 * 4096  # two experts as read, each part page-aligned
    assert experts.least_bytes(layers) == 3 * 200 + staging
    taken = experts.assign_slots(layers, 3 * 200 + staging + 4 * 100 + 50)  # top-k everywhere, then 4 more
    assert [m.slots for m in layers.values()] == [4, 3, 3] and taken == 10 * 100 + staging
    experts.assign_slots(layers, 10**9)  # never more than a layer has
    assert [m.slots for m in layers.values()] == [8, 8, 8]
    with pytest.raises(BudgetError, match="each layer's top-k experts"):
        experts.assign_slots(layers, 3 * 200 + staging - 1)


def test_a_padded_layer_counts_its_slots_padded_and_a_padding_buffer():
    layer = _layer("a", part_bytes=(2 * 48 * 16, 48 * 16), inter=48)  # padded to 64 by vLLM's kernel
    assert layer.expert_bytes == 3 * 64 * 16
    assert experts.staging_bytes([layer]) == 2 * 2 * 4096 + 3 * 64 * 16


def test_experts_read_packed_need_staging_only_for_those_read_ahead():
    whole_pages = {n: _layer(n, part_bytes=(2 * 4096, 4096), inter=64) for n in ("a", "b")}
    region = 2 * 3 * 4096  # a layer's top-k experts as read
    assert experts.staging_bytes(list(whole_pages.values())) == region  # the step's misses, not packed
    experts.mark_packed(whole_pages, True)
    assert all(m.packed for m in whole_pages.values()) and experts.staging_bytes(list(whole_pages.values())) == 0
    whole_pages["b"].reads_ahead = True
    assert experts.staging_bytes(list(whole_pages.values())) == region  # only the room read ahead into
    assert experts.least_bytes(whole_pages) == 2 * 2 * 3 * 4096 + region
    experts.mark_packed(whole_pages, False)
    assert experts.staging_bytes(list(whole_pages.values())) == 2 * region
    for unpackable in (_layer("c", part_bytes=(2 * 48 * 16, 48 * 16), inter=48),  # padded by vLLM
                       _layer("d", part_bytes=(2 * 4096, 2048), inter=64)):  # a part not whole pages
        layers = {"a": _layer("a", part_bytes=(2 * 4096, 4096), inter=64), unpackable.prefix: unpackable}
        experts.mark_packed(layers, True)  # all or none: the packed file holds every layer's experts
        assert not any(m.packed for m in layers.values())



def _slots_over_a_store(tmp_path, packed, inter, layers_n=2, experts_n=6, slots=3, top_k=2, hidden=64, seed=0):
    """``layers_n`` MoE layers whose experts are in a weight store on disk, each with ``slots`` slots in a
    module laid out as vLLM's CPU kernel holds them (padded), the layers after the first reading ahead
    through a router whose logits the test sets; with ``packed``, the experts are read from a store of them
    packed for the kernel. Returns the layers, their ExpertSlots, the stats and the whole experts."""
    from types import SimpleNamespace

    from flexoffload.store import WeightStore

    _isas()
    g = torch.Generator().manual_seed(seed)
    whole = {f"l{i}.{t}": torch.randn(shape, generator=g)
             for i in range(layers_n)
             for t, shape in (("w13_weight", (experts_n, 2 * inter, hidden)), ("w2_weight", (experts_n, hidden, inter)))}
    WeightStore.write(tmp_path / "store.bin", whole)
    store = WeightStore.open(tmp_path / "store.bin", direct_io=True)
    padded = -(-inter // experts.PAD) * experts.PAD  # as vLLM's kernel holds it
    part_bytes = (2 * inter * hidden * 4, hidden * inter * 4)
    moe = [experts.MoELayer(f"l{i}", None, experts_n, top_k, part_bytes, inter, 0, (), reads_ahead=i > 0,
                            packed=packed, slots=slots) for i in range(layers_n)]
    source = experts.packed_store(store, moe, "vec") if packed else None
    assert (source is not None) == packed, "these shapes are packed whole pages"
    staging, stats, layers, before = experts.Staging(store, moe, io_threads=2), experts.ExpertStats(), [], None
    for m in moe:
        module = torch.nn.Module()
        module.w13_weight = torch.nn.Parameter(torch.zeros(slots, 2 * padded, hidden), requires_grad=False)
        module.w2_weight = torch.nn.Parameter(torch.zeros(slots, hidden, padded), requires_grad=False)
        module.quant_method = SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=SimpleNamespace(isa="vec")))
        m.module = module
        if m.reads_ahead:
            m.logits = torch.zeros(1, experts_n)
            m.router = lambda x, m=m: m.logits.expand(x.shape[0], -1)  # the guess the test sets
        layer = experts.ExpertSlots(m, store, staging, stats, source)
        if before is not None:
            before.next = layer
        layers.append(layer)
        before = layer
    return moe, layers, stats, whole


def _check_slots_hold_their_experts(layer, whole, name):
    """Every expert a layer's slots claim to hold is there, padded and packed as vLLM pads and packs it."""
    assert {s: e for e, s in layer.slot_of.items()} == {s: e for s, e in enumerate(layer.expert_of) if e >= 0}
    inter, padded = layer.inter, layer.padded
    for e, s in layer.slot_of.items():
        w13, w2 = whole[f"{name}.w13_weight"][e], whole[f"{name}.w2_weight"][e]
        pad13 = torch.zeros(1, 2 * padded, w13.shape[1])  # gate rows, then up rows at the padded offset
        pad13[0, :inter], pad13[0, padded : padded + inter] = w13[:inter], w13[inter:]
        pad2 = torch.zeros(1, w2.shape[0], padded)
        pad2[0, :, :inter] = w2
        for expert, param in ((pad13, layer.module.w13_weight), (pad2, layer.module.w2_weight)):
            packed = torch.empty_like(param.data[s : s + 1])
            torch.ops._C.prepack_moe_weight(expert, packed, "vec")
            assert torch.equal(param.data[s], packed[0]), (name, e, s)


@pytest.mark.parametrize("packed, inter", [(False, 32), (False, 48), (True, 32)])  # 48: padded to 64 by vLLM
def test_experts_read_on_demand_and_ahead_land_in_slots_packed_as_vllm_packs_them(tmp_path, packed, inter):
    import random

    moe, (first, second), stats, whole = _slots_over_a_store(tmp_path, packed, inter)
    rng = random.Random(0)
    x = torch.zeros(1, 64)
    for step in range(40):
        first.load(rng.sample(range(6), 2), first.staging.take(first))
        guess = rng.sample(range(6), 2)
        moe[1].logits = torch.zeros(1, 6)
        moe[1].logits[0, guess] = torch.tensor([2.0, 1.0])
        before = dict(second.slot_of)
        first._read_next(x)  # the second layer's guesses not in its slots start reading
        assert second.slot_of == before
        picked = guess[:1] + rng.sample([e for e in range(6) if e not in guess], 1) if step % 2 else guess
        second.load(picked, second.staging.take(second))  # one guess right and one wrong, or both right
        assert set(picked) <= set(second.slot_of)
        _check_slots_hold_their_experts(first, whole, "l0")
        _check_slots_hold_their_experts(second, whole, "l1")
    assert 20 <= stats.ahead_used <= stats.ahead and stats.ahead_used <= stats.misses
    assert stats.hits + stats.misses == 40 * 4


def test_the_packed_experts_are_made_once_and_remade_for_a_new_store(tmp_path):
    import os

    moe, layers, stats, whole = _slots_over_a_store(tmp_path, True, 32)
    packed = layers[0].source.path
    made = os.stat(packed).st_mtime_ns
    assert experts.packed_store(layers[0].staging.store, moe, "vec").path == packed
    assert os.stat(packed).st_mtime_ns == made  # kept
    moe, layers, stats, whole = _slots_over_a_store(tmp_path, True, 32, seed=1)  # the store rewritten
    assert os.stat(packed).st_mtime_ns != made
    layers[1].load([0, 5])
    _check_slots_hold_their_experts(layers[1], whole, "l1")


def test_padded_experts_are_packed_as_read():
    layer = _layer("a", part_bytes=(2 * 48 * 16 * 4, 48 * 16 * 4), inter=48)
    assert experts.packed_store(None, [layer], "vec") is None


@pytest.mark.parametrize("packed", [False, True])
def test_a_token_computes_its_experts_in_slots_while_the_others_are_read_and_gets_the_whole_sum(tmp_path, packed):
    """At batch 1 the kernel runs over the experts already in (in a slot, or read ahead and arrived)
    while the others are read, then over those: the sum is what vLLM's kernel gives over all the
    experts packed whole."""
    import random

    from vllm import _custom_ops as ops

    moe, (first, second), stats, whole = _slots_over_a_store(tmp_path, packed, 32)

    def kernel(w13, w2, x, topk_weights, topk_ids):
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, w13, w2, None, None, topk_weights, topk_ids.to(torch.int32), "silu", "vec")
        return out

    def original(layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        assert shared_experts is None and shared_experts_input is None
        return kernel(layer.w13_weight.data, layer.w2_weight.data, x, topk_weights, topk_ids)

    packed_whole = {}
    for name, w in whole.items():
        packed_whole[name] = torch.empty_like(w)
        torch.ops._C.prepack_moe_weight(w, packed_whole[name], "vec")
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    for step in range(30):
        x = torch.randn(1, 64, generator=g) * 0.1
        moe[1].logits = torch.zeros(1, 6)
        moe[1].logits[0, rng.sample(range(6), 2)] = torch.tensor([2.0, 1.0])
        for layer, name in ((first, "l0"), (second, "l1")):
            ids = torch.tensor([rng.sample(range(6), 2)], dtype=torch.int32)
            weights = torch.softmax(torch.randn(1, 2, generator=g), -1)
            got = layer.apply(original, layer.module, x, weights, ids)
            want = kernel(packed_whole[f"{name}.w13_weight"], packed_whole[f"{name}.w2_weight"], x, weights, ids)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert set(ids[0].tolist()) <= set(layer.slot_of)
    assert stats.beside_reads > 0 and stats.misses > 0 and stats.ahead_used > 0, stats
