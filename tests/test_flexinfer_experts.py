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
