"""One-token GEMMs on streamed weights: every path computes F.linear's result, and the fastest path
on this CPU is kept only when it is clearly faster than oneDNN's (the default)."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from flexoffload import loader


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", list(loader.GEMV_PATHS))
def test_every_path_computes_a_linear_layer(name, bias):
    torch.manual_seed(0)
    w, x = torch.randn(48, 32), torch.randn(1, 32)
    b = torch.randn(48) if bias else None
    try:
        got = loader.GEMV_PATHS[name](x, w, b)
    except RuntimeError as e:  # a PyTorch without oneDNN's matmul: choose_gemv skips it the same way
        pytest.skip(str(e).splitlines()[0])
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def _paths(seconds: dict[str, float]):
    def slow(name):
        def fn(x, w, b):
            time.sleep(seconds[name])
            return F.linear(x, w, b)
        return fn
    return {name: slow(name) for name in seconds}


@pytest.mark.parametrize("seconds, expected", [
    ({"onednn": 0.004, "linear": 0.0005, "mv": 0.002}, "linear"),  # clearly faster: taken
    ({"onednn": 0.002, "linear": 0.004, "mv": 0.0005}, "mv"),
    ({"onednn": 0.01, "linear": 0.0098, "mv": 0.02}, "onednn"),  # within 10%: oneDNN kept
])
def test_the_fastest_path_is_kept_only_when_clearly_faster(monkeypatch, seconds, expected):
    monkeypatch.setattr(loader, "GEMV_PATHS", _paths(seconds))
    monkeypatch.setattr(loader, "_ONEDNN_LINEAR", True)
    monkeypatch.setattr(loader, "_ONEDNN_DTYPES", (torch.float32,))
    assert loader.choose_gemv((8, 8), torch.float32, torch.empty(4 * 8 * 8 * 3, dtype=torch.uint8)) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_timing_weights_lie_in_the_memory_lent_and_hold_finite_values(monkeypatch, dtype):
    seen = []

    def record(x, w, b):
        seen.append(w)
        return F.linear(x, w, b)

    monkeypatch.setattr(loader, "GEMV_PATHS", {"linear": record})
    monkeypatch.setattr(loader, "_ONEDNN_LINEAR", False)
    memory = torch.full((3 * 16 * 8 * dtype.itemsize + 5,), 255, dtype=torch.uint8)  # NaNs in either dtype
    assert loader.choose_gemv((16, 8), dtype, memory) == "linear"
    start, end = memory.data_ptr(), memory.data_ptr() + memory.numel()
    assert {w.data_ptr() for w in seen} == {start + i * 16 * 8 * dtype.itemsize for i in range(3)}
    assert all(start <= w.data_ptr() and w.data_ptr() + w.numel() * w.element_size() <= end for w in seen)
    assert all(bool(w.isfinite().all()) and float(w.abs().max()) <= 0.051 for w in seen)


def test_memory_smaller_than_one_weight_keeps_the_default(monkeypatch):
    monkeypatch.setattr(loader, "_ONEDNN_LINEAR", False)
    assert loader.choose_gemv((64, 64), torch.float32, torch.empty(100, dtype=torch.uint8)) == "linear"
