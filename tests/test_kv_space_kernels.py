"""The Triton kernels read requests' KV straight out of a KVSpace (the layer views VTENSOR's worker
builds), on the host backend (interpreter) and on CUDA VMM: physical blocks in any order land
consecutively in each request's slot, a prefix hit reads the first request's chunks (mapped, not
copied), and on CUDA a graph captured before a request grows reads the grown KV after replay -
the virtual addresses never move. Expected values come from SDPA over the tokens as written."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' @triton.jit

from vllm_vtensor.kernels.attention import context_attention, decode_attention  # noqa: E402
from vllm_vtensor.kv_space import KVSpace  # noqa: E402
from vllm_vtensor.vmm import make_backend  # noqa: E402
from vllm_vtensor.worker import layer_views  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LAYERS, HKV, GQA, B, D = 3, 2, 2, 16, 64
HQ = HKV * GQA
DTYPE = {"cpu": torch.float32, "cuda": torch.float16}
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


class Space:
    """A KVSpace with per-layer K and V views ``[virtual blocks, HKV, B, D]`` (a layer's page of a
    block: its K heads, then its V heads) and the tokens written, kept aside for the expected values."""

    def __init__(self, device: str, num_blocks=12, slots=3, per_slot=6):
        self.device, self.dtype = device, DTYPE[device]
        self.backend = make_backend(device)
        elt = torch.finfo(self.dtype).bits // 8
        page = (2 * HKV, B, D * elt)
        self.kv = KVSpace(self.backend, num_blocks=num_blocks, num_slots=slots, blocks_per_slot=per_slot,
                          block_bytes=LAYERS * 2 * HKV * B * D * elt, block_size=B, keep_full_blocks=True)
        views = layer_views(self.kv, LAYERS, page, self.dtype)
        self.k = [v[:, :HKV] for v in views]
        self.v = [v[:, HKV:] for v in views]
        self.tokens: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # req -> per layer (K, V) [T, HKV, D]
        self.gen = torch.Generator().manual_seed(0)

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.device, self.dtype)

    def write(self, req: str, virtual_blocks: list[int], start: int, n: int, copy_from: str | None = None):
        """Write tokens ``start .. start+n`` of ``req`` into its virtual blocks (random, or
        remembered from ``copy_from``'s tokens when they are a shared prefix already in place)."""
        have = self.tokens.setdefault(req, [(self.rand(0, HKV, D), self.rand(0, HKV, D)) for _ in range(LAYERS)])
        t = torch.arange(start, start + n)
        vb = torch.tensor(virtual_blocks, device=self.device)[(t // B).to(self.device)]
        off = (t % B).to(self.device)
        for l in range(LAYERS):
            if copy_from is not None:
                k, v = (x[start : start + n] for x in self.tokens[copy_from][l])
            else:
                k, v = self.rand(n, HKV, D), self.rand(n, HKV, D)
                self.k[l][vb, :, off] = k
                self.v[l][vb, :, off] = v
            have[l] = (torch.cat([have[l][0], k]), torch.cat([have[l][1], v]))

    def expected(self, req: str, layer: int, q: torch.Tensor) -> torch.Tensor:
        """SDPA of ``q``'s ``len(q)`` last positions over everything written for ``req``."""
        k, v = (x.float().repeat_interleave(GQA, dim=1).transpose(0, 1) for x in self.tokens[req][layer])
        seq = k.shape[1]
        pos_q = torch.arange(seq - q.shape[0], seq, device=q.device)[:, None]
        mask = torch.arange(seq, device=q.device)[None, :] <= pos_q
        o = F.scaled_dot_product_attention(q.float().transpose(0, 1), k, v, attn_mask=mask, scale=D ** -0.5)
        return o.transpose(0, 1)

    def close(self):
        self.kv.close()
        self.backend.close()


def start_block(space: Space, req: str) -> int:
    return space.kv.virtual_block(space.kv.slot_of(req), 0)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_read_each_request_from_its_slot_and_a_prefix_hit_from_the_shared_chunks(device):
    s = Space(device)
    try:
        # "a": 40 tokens on physical blocks 5, 2, 9 (any order); "b" hits a's first two blocks (32 tokens,
        # mapped, not copied) and writes 16 tokens of its own into block 7.
        s.write("a", s.kv.add_request("a", [5, 2, 9]), 0, 40)
        vb = s.kv.add_request("b", [5, 2, 7], num_cached_tokens=32)
        s.write("b", vb, 0, 32, copy_from="a")
        s.write("b", vb, 32, 16)
        st = s.kv.stats()
        assert st.prefix_hit_bytes == 2 * s.kv.chunk_bytes and st.copied_bytes == 0
        assert st.shared_bytes == 2 * s.kv.chunk_bytes

        starts = torch.tensor([start_block(s, "a"), start_block(s, "b")], dtype=torch.int32, device=device)
        seq = torch.tensor([40, 48], dtype=torch.int32, device=device)
        for l in range(LAYERS):
            # prefill of the last 7 and 16 tokens (a prefix read from the cache, causal new tokens) ...
            q = s.rand(7 + 16, HQ, D)
            out = torch.full_like(q, float("nan"))
            qsl = torch.tensor([0, 7, 23], dtype=torch.int32, device=device)
            context_attention(q=q, k_cache=s.k[l], v_cache=s.v[l], out=out, query_start_loc=qsl, seq_lens=seq,
                              kv_start_block=starts, scale=D ** -0.5)
            want = torch.cat([s.expected("a", l, q[:7]), s.expected("b", l, q[7:])])
            torch.testing.assert_close(out.float(), want, atol=TOL[s.dtype], rtol=TOL[s.dtype])
            # ... and a decode step of each, split over the keys
            qd = s.rand(2, HQ, D)
            out = torch.full_like(qd, float("nan"))
            decode_attention(q=qd, k_cache=s.k[l], v_cache=s.v[l], out=out, seq_lens=seq, kv_start_block=starts,
                             scale=D ** -0.5, num_splits=2)
            want = torch.cat([s.expected("a", l, qd[:1]), s.expected("b", l, qd[1:])])
            torch.testing.assert_close(out.float(), want, atol=TOL[s.dtype], rtol=TOL[s.dtype])
        s.kv.remove_request("a")
        s.kv.remove_request("b")
    finally:
        s.close()


@pytest.mark.gpu
def test_a_cuda_graph_captured_before_growth_reads_the_grown_kv_after_replay():
    s = Space("cuda")
    try:
        vb = s.kv.add_request("a", [3])
        s.write("a", vb, 0, 10)
        base = s.k[0].data_ptr()
        q = s.rand(1, HQ, D)
        out = torch.empty_like(q)
        seq = torch.tensor([10], dtype=torch.int32, device="cuda")
        starts = torch.tensor([start_block(s, "a")], dtype=torch.int32, device="cuda")

        def step():
            decode_attention(q=q, k_cache=s.k[0], v_cache=s.v[0], out=out, seq_lens=seq, kv_start_block=starts,
                             scale=D ** -0.5, num_splits=2, max_seq_len=B * s.kv.blocks_per_slot)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.testing.assert_close(out.float(), s.expected("a", 0, q), atol=3e-3, rtol=3e-3)

        # grow by three blocks: new chunks are mapped after the first, in the same virtual range
        vb += s.kv.append_blocks("a", [8, 0, 11])
        s.write("a", vb, 10, 50)
        assert s.k[0].data_ptr() == base
        seq.fill_(60)
        q.copy_(s.rand(1, HQ, D))
        graph.replay()
        torch.testing.assert_close(out.float(), s.expected("a", 0, q), atol=3e-3, rtol=3e-3)
        assert s.kv.stats().mapped_bytes == 4 * s.kv.chunk_bytes
        s.kv.remove_request("a")
        torch.cuda.synchronize()
    finally:
        s.close()
