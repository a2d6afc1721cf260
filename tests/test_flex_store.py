"""FlexInfer's first load of a checkpoint: the weight store is written by loading straight into the
file's shared mapping (WeightStore.build), and vLLM's model is built with its parameters on the
meta device, so neither step holds the model in anonymous memory."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flexoffload.store import WeightStore


def _anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _meta_params(shapes: dict[str, tuple[int, ...]], dtype=torch.float32) -> dict[str, nn.Parameter]:
    return {n: nn.Parameter(torch.empty(s, dtype=dtype, device="meta"), requires_grad=False) for n, s in shapes.items()}


def test_build_writes_what_the_load_puts_in_the_parameters(tmp_path):
    shapes = {"a": (300, 64), "b": (7,), "c": (0, 5), "d": (1000, 33)}
    params = _meta_params(shapes)
    want = {n: torch.randn(s) for n, s in shapes.items()}

    def load():  # what vLLM's weight loaders do: write into param.data in place
        for n, p in params.items():
            assert p.device.type == "cpu" and p.shape == shapes[n]
            p.data.copy_(want[n])

    path = tmp_path / "w.bin"
    WeightStore.build(path, params, load)
    assert all(p.is_meta for p in params.values())  # no view of the mapping is left behind
    assert WeightStore.exists(path) and not list(tmp_path.glob("*.tmp"))
    store = WeightStore.open(path, direct_io=False)
    for n, t in want.items():
        e = store.index[n]
        assert e.offset % 4096 == 0 and e.shape == tuple(t.shape) and e.torch_dtype == t.dtype
        got = torch.frombuffer(bytearray(store.read_rows(n, [0], e.nbytes)) or bytearray(1), dtype=torch.uint8)
        assert torch.equal(got[: e.nbytes].view(t.dtype).view(t.shape), t)
    store.close()


def test_build_holds_the_weights_in_the_file_not_in_anonymous_memory(tmp_path):
    params = _meta_params({f"w{i}": (1024, 1024) for i in range(48)})  # 192 MiB of fp32
    grew = []

    def load():
        for p in params.values():
            p.data.fill_(1.5)  # every page written
        grew.append(_anon() - base)

    base = _anon()
    WeightStore.build(tmp_path / "w.bin", params, load)
    assert grew[0] < 16 << 20, f"the load grew anonymous memory by {grew[0] >> 20} MiB"


def test_a_failed_load_leaves_no_store(tmp_path):
    params = _meta_params({"a": (64, 64)})

    def load():
        raise RuntimeError("checkpoint unreadable")

    path = tmp_path / "w.bin"
    try:
        WeightStore.build(path, params, load)
    except RuntimeError as e:
        assert "unreadable" in str(e)
    else:
        raise AssertionError("the error was swallowed")
    assert not WeightStore.exists(path) and not list(tmp_path.iterdir())
    assert params["a"].is_meta


def test_parameters_move_to_meta_as_they_are_registered_keeping_their_attributes():
    from flexoffload.loader import _parameters_on_meta

    with _parameters_on_meta():
        layer = nn.Linear(256, 512)
        weight = layer.weight
        weight.weight_loader = "set after registration"  # as vLLM's set_weight_attrs does
        norm = nn.LayerNorm(8)
    assert layer.weight.is_meta and layer.bias.is_meta and norm.weight.is_meta
    assert layer.weight is weight and layer.weight.weight_loader == "set after registration"
    assert layer.weight.shape == (512, 256) and layer.weight.dtype == torch.float32
    assert not nn.Linear(4, 4).weight.is_meta  # only inside the context


class _LoaderParameter(nn.Parameter):
    """Like vLLM's BasevLLMParameter: the weight loader is a property of the class."""

    @property
    def weight_loader(self):
        return self._weight_loader


def test_rehome_keeps_the_parameter_class_and_its_attributes():
    from flexoffload.store import rehome

    p = _LoaderParameter(torch.empty(3, 4, device="meta"), requires_grad=False)
    p._weight_loader = "load"
    same = p
    for t in (torch.arange(12.0).view(3, 4), torch.empty(3, 4, device="meta"), torch.zeros(0)):
        rehome(p, t)
        assert p is same and type(p) is _LoaderParameter and p.weight_loader == "load"
        assert p.device == t.device and p.shape == t.shape and not p.requires_grad
    rehome(p, torch.ones(2))
    assert torch.equal(p.data, torch.ones(2))


def test_each_tensor_parallel_shard_has_its_own_store_and_snapshot(tmp_path):
    from flexoffload.loader import rank_path
    from flexoffload.store import store_key

    names = ["model.layers.0.mlp.down_proj.weight"]
    whole, rank0, rank1 = (store_key(str(tmp_path), torch.float32, names, s) for s in ("", "tp0of2", "tp1of2"))
    assert len({whole, rank0, rank1}) == 3 and whole == store_key(str(tmp_path), torch.float32, names)
    assert rank_path("/x/flex.json", "") == rank_path("/x/flex.json", "tp0of2") == "/x/flex.json"
    assert rank_path("/x/flex.json", "tp1of2") == "/x/flex.tp1of2.json" and rank_path(None, "tp1of2") is None


def test_streaming_buffers_ask_for_huge_pages(tmp_path):
    """O_DIRECT reads pin every page they land in: the arena and host tier ask the kernel for
    transparent huge pages (VmFlags 'hg' in /proc/self/smaps), small buffers do not; reads into them land
    intact."""
    import mmap
    import os

    from flexoffload.store import HUGE_PAGE, aligned_buffer

    if not hasattr(mmap, "MADV_HUGEPAGE") or "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
        pytest.skip("no transparent huge pages here")

    def flags(buf) -> list[str]:
        addr = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
        inside = False
        for line in open("/proc/self/smaps"):
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
        raise AssertionError("mapping not found")

    big, small = aligned_buffer(4 * HUGE_PAGE), aligned_buffer(64 << 10)
    assert "hg" in flags(big) and "hg" not in flags(small)
    data = os.urandom(3 * HUGE_PAGE)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [memoryview(big)[:len(data)]], 0) == len(data)
    finally:
        os.close(fd)
    assert big[:len(data)] == data
