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


def _slots_over_a_store(tmp_path, layers_n=2, experts_n=6, slots=3, top_k=2, hidden=64, inter=32, seed=0):
    """``layers_n`` MoE layers whose experts are in a weight store on disk, each with ``slots`` slots in a
    module laid out as vLLM's CPU kernel holds them, the layers after the first reading ahead through a
    router whose logits the test sets; returns the layers' ExpertSlots, the stats and the whole experts."""
    from types import SimpleNamespace

    from flexoffload.store import WeightStore

    _isas()
    g = torch.Generator().manual_seed(seed)
    whole = {f"l{i}.{t}": torch.randn(shape, generator=g)
             for i in range(layers_n)
             for t, shape in (("w13_weight", (experts_n, 2 * inter, hidden)), ("w2_weight", (experts_n, hidden, inter)))}
    WeightStore.write(tmp_path / "store.bin", whole)
    store = WeightStore.open(tmp_path / "store.bin", direct_io=True)
    stats, layers, before = experts.ExpertStats(), [], None
    part_bytes = (2 * inter * hidden * 4, hidden * inter * 4)
    moe = [experts.MoELayer(f"l{i}", None, experts_n, top_k, part_bytes, inter, 0, (), reads_ahead=i > 0,
                            slots=slots) for i in range(layers_n)]
    staging = experts.Staging(store, moe, io_threads=2)
    for m in moe:
        module = torch.nn.Module()
        module.w13_weight = torch.nn.Parameter(torch.zeros(slots, 2 * inter, hidden), requires_grad=False)
        module.w2_weight = torch.nn.Parameter(torch.zeros(slots, hidden, inter), requires_grad=False)
        module.quant_method = SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=SimpleNamespace(isa="vec")))
        m.module = module
        if m.reads_ahead:
            m.router = lambda x, m=m: m.logits.expand(x.shape[0], -1)  # the guess the test sets
            m.logits = torch.zeros(1, experts_n)
        layer = experts.ExpertSlots(m, store, staging, stats)
        if before is not None:
            before.next = layer
        layers.append(layer)
        before = layer
    return moe, layers, stats, whole


def _check_slots_hold_their_experts(layer, whole, name):
    """Every expert a layer's slots claim to hold is there, packed as vLLM packs it."""
    assert {s: e for e, s in layer.slot_of.items()} == {s: e for s, e in enumerate(layer.expert_of) if e >= 0}
    for e, s in layer.slot_of.items():
        for t, param in (("w13_weight", layer.module.w13_weight), ("w2_weight", layer.module.w2_weight)):
            packed = torch.empty_like(param.data[s : s + 1])
            torch.ops._C.prepack_moe_weight(whole[f"{name}.{t}"][e : e + 1].clone(), packed, "vec")
            assert torch.equal(param.data[s], packed[0]), (name, e, s, t)


def test_experts_read_ahead_land_packed_in_the_next_layers_slots_and_wrong_guesses_keep_theirs(tmp_path):
    import random

    moe, (first, second), stats, whole = _slots_over_a_store(tmp_path)
    rng = random.Random(0)
    x = torch.zeros(1, 64)
    for step in range(40):
        first.load(rng.sample(range(6), 2))
        guess = rng.sample(range(6), 2)
        moe[1].logits = torch.zeros(1, 6)
        moe[1].logits[0, guess] = torch.tensor([2.0, 1.0])
        before = dict(second.slot_of)
        first._read_next(x)  # the second layer's guessed experts read and packed by the reader threads
        assert set(guess) <= set(second.slot_of), (guess, second.slot_of)
        assert all(before.get(e) == s for e, s in second.slot_of.items() if e not in guess)  # only guesses moved in
        picked = guess[:1] + rng.sample([e for e in range(6) if e not in guess], 1) if step % 2 else guess
        second.load(picked)  # one guess right and one wrong, or both right
        assert set(picked) <= set(second.slot_of)
        _check_slots_hold_their_experts(first, whole, "l0")
        _check_slots_hold_their_experts(second, whole, "l1")
    assert 0 < stats.ahead_used <= stats.ahead and stats.ahead_used <= stats.misses
    assert stats.ahead_used >= 20  # every step's first guess was picked (unless already in a slot)


def test_a_read_ahead_for_a_layer_that_never_ran_is_settled_before_the_next_guess(tmp_path):
    moe, (first, second), stats, whole = _slots_over_a_store(tmp_path)
    x = torch.zeros(1, 64)
    first.load([0, 1])
    moe[1].logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, 1.0]])
    first._read_next(x)
    moe[1].logits = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    first._read_next(x)  # the pass went elsewhere: the first guesses are done or dropped, consistently
    second.load([0, 3])
    _check_slots_hold_their_experts(second, whole, "l1")
    assert {0, 3} <= set(second.slot_of)
