"""Experts of a mixture-of-experts model read on demand, into a few slots per layer (CPU).

A decode step runs only the experts its router picks (gpt-oss-20b: 4 of 32 per layer), so an MoE
layer's experts are not streamed whole every pass: each layer keeps ``slots`` experts in vLLM's own
packed layout (the buffers vLLM's CPU MoE kernel reads, ``slots`` experts long instead of all of
them), and the experts a step needs that are not there are read from the weight store after routing,
packed into the least recently used slots, and the kernel is handed slot ids instead of expert ids.

Reading ahead (``expert_prefetch``): once a layer's experts are in place, the next MoE layer's router is
applied to this layer's input, and the experts it would pick that are not in the next layer's slots are
read while this layer (and the next one's attention) compute; the next layer packs those the router
then picks from where they landed instead of reading them. The residual stream changes little from one
layer to the next, so the guess is often right (the snapshot counts reads ahead and those used).

vLLM's CPU kernel packs every expert on its own (``prepack_moe_weight`` keeps the tensor's shape, and
expert ``e`` packed alone equals slice ``e`` of the whole tensor packed; checked by
tests/test_flexinfer_experts.py), so an expert is packed straight into its slot.  When a step needs
more distinct experts than a layer has slots (a prefill of many tokens), the kernel runs once per
group of at most ``slots`` experts over the tokens routed to one of them (their other experts weighted
0 in that run), and the runs are summed in float32: every token gets its experts' weighted sum (in
bf16 rounded once more than in one kernel run).

Packing an expert into the kernel's layout takes as long as reading it from memory twice (1.7 ms for a
4.5 MiB float32 expert on one core: a third of a token's time on a 1.1 GB random Qwen 3 MoE at half its
size), so with ``packed_experts`` the experts are packed once, at the first start, into a file beside
the weight store (:func:`packed_store`), and read from it straight into their slots (``O_DIRECT``; the
slots are page-aligned memory); those read ahead land in the staging buffer, packed already, and are
copied into their slots. Where vLLM pads the experts, or an expert is not whole pages, they are packed
as read.

A token decoded alone whose experts are not all in runs the kernel over those that are while the others
are read, then over those (:meth:`ExpertSlots._apply_beside_reads`).

The slot buffers are the layer's parameters (so vLLM's kernel, built over them, reads them); the
expert biases (gpt-oss) stay resident whole, and their slots are filled beside the weights.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import torch

from vllm_vtensor.log import get_logger

from .store import ALIGN, WeightStore, aligned, aligned_buffer

logger = get_logger("flexoffload.experts")

EXPERT_TENSORS = ("w13_weight", "w2_weight")  # [E, 2I, H] and [E, H, I], as vLLM's FusedMoE loads them
EXPERT_BIASES = ("w13_bias", "w2_bias")  # [E, 2I] and [E, H] (gpt-oss)
ROUTERS = ("gate", "router")  # the router's name beside the experts (Qwen, Mixtral, DeepSeek; gpt-oss)


@dataclasses.dataclass
class ExpertStats:
    hits: int = 0  # expert uses found in a slot
    misses: int = 0  # experts read from the store into a slot
    bytes_read: int = 0
    read_seconds: float = 0.0
    groups: int = 0  # kernel runs beyond one per layer call (steps needing more experts than slots)
    beside_reads: int = 0  # batch-1 steps whose experts in slots were computed while the others were read
    ahead: int = 0  # experts read ahead, the next layer's router applied to this layer's input
    ahead_used: int = 0  # of which its router then picked (read while the layers before computed)
    packed: bool = False  # experts read from a store of them packed for vLLM's kernel (packed_experts)


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


@dataclasses.dataclass
class _Loading:
    """What :meth:`ExpertSlots._start` started and :meth:`ExpertSlots._finish` completes."""
    misses: list  # (expert, slot) of the experts not in a slot
    ahead: dict  # expert -> (parts, futures): those read ahead for this layer
    into_slots: list  # packed: (expert, slot, futures) read straight into their slots
    batches: list  # not packed: the misses not read ahead, staging.count at a time
    staged: dict  # the first batch's reads, started
    packed_now: set  # those read ahead that had arrived, already in their slots


class Staging:
    """Page-aligned buffers the experts read from the store land in before they are packed into slots:
    room for ``count`` experts of the largest layer (a step's top-k misses of a layer are read at once,
    on ``io_threads`` reader threads), shared by every layer (layers run one after another); and as much
    again for the experts read ahead for the next layer, where layers read ahead. Experts read packed
    (:attr:`MoELayer.packed`) go straight into their slots: only those read ahead land here."""

    def __init__(self, store: WeightStore, layers: list["MoELayer"], io_threads: int):
        from concurrent.futures import ThreadPoolExecutor

        from vllm_vtensor.threads import move_to_helper_cores

        self.store = store
        self.count = max(min(m.num_experts, m.top_k) for m in layers)
        self.bytes = staging_bytes(layers)
        self.ahead_at = 0 if all_packed(layers) else region_bytes(layers)  # past the step's own
        self._ahead: tuple[ExpertSlots, dict] | None = None  # the layer read ahead for: expert -> (parts, futures)
        self._ahead_reads: list = []  # the futures of the last reads ahead, until their room is reused
        self.buffer = aligned_buffer(self.bytes) if self.bytes else None
        self._raw = torch.frombuffer(self.buffer, dtype=torch.uint8) if self.bytes else None
        self._pads: dict[tuple, torch.Tensor] = {}
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="flexinfer-experts",
                                       initializer=move_to_helper_cores)

    def pad(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed buffer an expert is padded in (one per shape; vLLM pads every layer alike)."""
        key = (shape, dtype)
        if key not in self._pads:
            self._pads[key] = torch.zeros(shape, dtype=dtype)
        return self._pads[key]

    def read(self, reads: list[tuple[WeightStore, int, memoryview]]) -> list:
        """Start ``(store, file offset, destination)`` reads on the reader threads, in order: ``O_DIRECT``
        where the store reads so and the piece is aligned (no page cache to count twice), buffered
        otherwise; returns their futures."""

        def one(read):
            store, offset, view = read
            direct = offset % ALIGN == 0 and len(view) % ALIGN == 0 and _address(view) % ALIGN == 0
            done = store.read_range(offset, view, direct)
            if done != len(view):
                raise OSError(f"short read of an expert from {store.path}: {done} of {len(view)} bytes")

        return [self.pool.submit(one, r) for r in reads]

    def view(self, at: int, size: int) -> memoryview:
        return memoryview(self.buffer)[at : at + size]

    def tensor(self, at: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        return self._raw[at : at + n].view(dtype).view(shape)

    def ahead_for(self, layer: "ExpertSlots", staged: dict) -> None:
        """Hold the reads ahead for ``layer`` (expert -> (parts, futures)) until it takes them."""
        self._ahead = (layer, staged)
        self._ahead_reads = [f for _, futures in staged.values() for f in futures]

    def take(self, layer: "ExpertSlots") -> dict:
        """The experts read ahead for ``layer`` (expert -> (parts, futures)); those read for another
        layer (the pass went elsewhere) are dropped."""
        ahead, self._ahead = self._ahead, None
        return ahead[1] if ahead is not None and ahead[0] is layer else {}

    def free_ahead(self) -> None:
        """Before new reads ahead reuse their room: the last ones done or cancelled (a wrong guess's)."""
        from concurrent.futures import wait

        wait(self._ahead_reads)
        self._ahead_reads = []


def kernel_isa(module: torch.nn.Module) -> str:
    """The instruction set of vLLM's CPU MoE kernel built over ``module``'s experts (what their slots are
    packed for); another kernel is refused."""
    experts = module.quant_method.moe_kernel.fused_experts
    if getattr(experts, "_use_zentorch", False) or not hasattr(experts, "isa"):
        raise RuntimeError(f"flexinfer reads experts into slots of vLLM's CPU MoE kernel, not "
                           f"{type(experts).__name__}: load this model without --load-format flexinfer")
    return experts.isa


class ExpertSlots:
    """One MoE layer's experts: ``slots`` of them packed in the layer's own parameters, the rest in the
    store, read when the router picks them."""

    def __init__(self, layer: "MoELayer", store: WeightStore, staging: Staging, stats: ExpertStats,
                 packed: WeightStore | None = None):
        self.module, self.staging, self.stats = layer.module, staging, stats
        self.isa = kernel_isa(layer.module)
        self.slots = self.module.w13_weight.shape[0]
        self.num_experts = layer.num_experts
        self.source = packed or store  # experts read from a store of them packed for the kernel, where one is
        self.packed = packed is not None
        self.entries = {t: self.source.index[f"{layer.prefix}.{t}"] for t in EXPERT_TENSORS}
        self.sizes = dict(zip(EXPERT_TENSORS, layer.part_bytes))
        self.biases = layer.biases  # the whole [E, ...] biases, resident
        self.inter = layer.inter
        self.padded = self.module.w2_weight.shape[2]  # the intermediate size vLLM's kernel runs (padded)
        self.expert_of = [-1] * self.slots  # slot -> expert held
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.used = [0] * self.slots  # slot -> when last used (LRU)
        self.clock = 0
        self.next: ExpertSlots | None = None  # the next MoE layer, whose experts this one reads ahead
        self.router = layer.router if layer.reads_ahead else None  # this layer's router (vLLM's gate module)
        self._pad13 = self._pad2 = None  # vLLM pads the intermediate size for its kernel: staged padded
        if self.padded != self.inter:
            w13, w2 = self.entries["w13_weight"], self.entries["w2_weight"]
            self._pad13 = staging.pad((1, 2 * self.padded, w13.shape[2]), w13.torch_dtype)
            self._pad2 = staging.pad((1, w2.shape[1], self.padded), w2.torch_dtype)
        self._slot_memory = {}  # packed: the slots' page-aligned memory, which experts are read straight into
        if self.packed:
            from .store import rehome

            for t in EXPERT_TENSORS:
                p = getattr(self.module, t)
                buf = aligned_buffer(p.numel() * p.element_size())
                rehome(p, torch.frombuffer(buf, dtype=p.dtype, count=p.numel()).view(p.shape))
                self._slot_memory[t] = memoryview(buf)

    # -- slots -----------------------------------------------------------------
    def _stage(self, experts: list[int], at: int) -> dict:
        """Start reading ``experts`` into the staging buffer from ``at`` on (all queued at once): expert ->
        (its parts, as views of where they land; the futures of their reads)."""
        reads, staged = [], {}
        for expert in experts:
            parts, first = {}, len(reads)
            for t, e in self.entries.items():
                size = self.sizes[t]
                reads.append((self.source, e.offset + expert * size, self.staging.view(at, size)))
                parts[t] = self.staging.tensor(at, (1, *e.shape[1:]), e.torch_dtype)
                at += aligned(size)
            staged[expert] = (parts, (first, len(reads)))
        pending = self.staging.read(reads)
        self.stats.bytes_read += sum(len(view) for *_, view in reads)
        return {expert: (parts, pending[a:b]) for expert, (parts, (a, b)) in staged.items()}

    def _read_to_slot(self, expert: int, slot: int) -> list:
        """Packed: start reading ``expert`` straight into ``slot``; returns the reads' futures."""
        reads = []
        for t, e in self.entries.items():
            size = self.sizes[t]
            reads.append((self.source, e.offset + expert * size, self._slot_memory[t][slot * size : (slot + 1) * size]))
        self.stats.bytes_read += sum(self.sizes.values())
        return self.staging.read(reads)

    def _pack(self, expert: int, slot: int, parts: dict | None, futures: list) -> None:
        """Pack an expert into its slot once its reads are done (padded as vLLM pads); one read packed
        already is copied (``parts``) or is there (read into the slot: ``parts`` None)."""
        for f in futures:
            f.result()
        if self.packed:
            for t, part in (parts or {}).items():
                getattr(self.module, t).data[slot].copy_(part[0])
            self._biases(expert, slot)
            return
        w13, w2 = parts["w13_weight"], parts["w2_weight"]
        if self._pad13 is not None:  # gate rows, then up rows at the padded offset, as vLLM pads
            self._pad13[0, : self.inter] = w13[0, : self.inter]
            self._pad13[0, self.padded : self.padded + self.inter] = w13[0, self.inter :]
            self._pad2[0, :, : self.inter] = w2[0]
            w13, w2 = self._pad13, self._pad2
        torch.ops._C.prepack_moe_weight(w13, self.module.w13_weight.data[slot : slot + 1], self.isa)
        torch.ops._C.prepack_moe_weight(w2, self.module.w2_weight.data[slot : slot + 1], self.isa)
        self._biases(expert, slot)

    def _biases(self, expert: int, slot: int) -> None:
        if "w13_bias" in self.biases:
            b = self.biases["w13_bias"][expert]
            self.module.w13_bias.data[slot, : self.inter] = b[: self.inter]
            self.module.w13_bias.data[slot, self.padded : self.padded + self.inter] = b[self.inter :]
        if "w2_bias" in self.biases:
            self.module.w2_bias.data[slot] = self.biases["w2_bias"][expert]

    def load(self, experts: list[int], ahead: dict | None = None) -> None:
        """Make ``experts`` (at most ``slots`` of them) resident, evicting the least recently used others:
        those read ahead (``ahead``: expert -> (parts, futures)) packed first, their reads started a layer
        ago; the others read ``staging.count`` at a time, each packed while the next is read, or, from a
        store of packed experts, straight into their slots."""
        self._finish(self._start(experts, ahead))

    def _start(self, experts: list[int], ahead: dict | None, pack_arrived: bool = False) -> "_Loading":
        """:meth:`load`'s first half: slots chosen, wrong guesses' reads not started cancelled, the misses'
        reads started (with ``pack_arrived``, those read ahead that are in packed into their slots now);
        returns what :meth:`_finish` waits for and packs."""
        t0 = time.perf_counter()
        self.clock += 1
        wanted = set(experts)
        misses = []
        for e in experts:
            s = self.slot_of.get(e)
            if s is not None:
                self.stats.hits += 1
                self.used[s] = self.clock
                continue
            s = min((s for s in range(self.slots) if self.expert_of[s] not in wanted and self.used[s] < self.clock),
                    key=lambda s: self.used[s])
            old = self.expert_of[s]
            if old >= 0:
                del self.slot_of[old]
            self.expert_of[s], self.slot_of[e], self.used[s] = e, s, self.clock
            misses.append((e, s))
        ahead = ahead or {}
        missed = {e for e, _ in misses}
        for e, (_, futures) in ahead.items():
            if e not in missed:  # a wrong guess: its reads not started yet are not made
                for f, size in zip(futures, self.sizes.values()):
                    if f.cancel():
                        self.stats.bytes_read -= size
        now = [(e, s) for e, s in misses if e not in ahead]
        # packed: straight into their slots, all at once (queued behind those read ahead)
        into_slots = [(e, s, self._read_to_slot(e, s)) for e, s in now] if self.packed else []
        now = [] if self.packed else now
        batches = [now[i : i + self.staging.count] for i in range(0, len(now), self.staging.count)]
        staged = self._stage([e for e, _ in batches[0]], 0) if batches else {}  # queued behind those read ahead
        packed_now = set()
        if pack_arrived:  # those read ahead whose reads are done: into their slots now
            for e, s in misses:
                if e in ahead and all(f.done() for f in ahead[e][1]):
                    self._pack(e, s, *ahead[e])
                    packed_now.add(e)
        self.stats.read_seconds += time.perf_counter() - t0 if misses else 0.0
        return _Loading(misses, ahead, into_slots, batches, staged, packed_now)

    def _finish(self, started: "_Loading") -> None:
        """:meth:`load`'s second half: the misses packed into their slots as their reads finish."""
        t0 = time.perf_counter()
        misses, ahead, staged = started.misses, started.ahead, started.staged
        for e, s in misses:
            if e in ahead and e not in started.packed_now:
                self._pack(e, s, *ahead[e])
        for i, batch in enumerate(started.batches):
            if i:
                staged = self._stage([e for e, _ in batch], 0)
            for e, s in batch:
                self._pack(e, s, *staged[e])
        for e, s, futures in started.into_slots:
            self._pack(e, s, None, futures)
        self.stats.misses += len(misses)
        self.stats.ahead_used += sum(e in ahead for e, _ in misses)
        self.stats.read_seconds += time.perf_counter() - t0 if misses else 0.0

    def _read_next(self, x: torch.Tensor) -> None:
        if self.next is not None and self.next.router is not None:
            self.next.read_ahead(x)  # while this layer computes

    def read_ahead(self, x: torch.Tensor) -> None:
        """Guess this layer's experts for the tokens ``x`` (the previous layer's input): its router applied
        to them, the experts with the most weight over the tokens; start reading those not in a slot."""
        out = self.router(x)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        score = logits[0] if logits.shape[0] == 1 else logits.softmax(-1).sum(0)
        guess = torch.topk(score, min(self.num_experts, self.staging.count)).indices.tolist()
        want = [e for e in guess if e not in self.slot_of]
        self.staging.free_ahead()
        if want:
            self.staging.ahead_for(self, self._stage(want, self.staging.ahead_at))
            self.stats.ahead += len(want)

    # -- the kernel call -------------------------------------------------------
    def apply(self, original, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None,
              **kwargs):
        """vLLM's ``quant_method.apply`` over the slots: the step's experts made resident, the kernel
        handed slot ids; in groups of at most ``slots`` experts when a step needs more, each run over the
        tokens routed to one of its experts (their other experts weighted 0), the runs summed in float32."""
        needed = torch.unique(topk_ids).tolist()
        ahead = self.staging.take(self)
        if topk_ids.shape[0] == 1 and len(needed) <= self.slots:  # all in already: one run, as below
            return self._apply_beside_reads(original, layer, x, topk_weights, topk_ids, needed, ahead,
                                            shared_experts, shared_experts_input, **kwargs)
        if len(needed) <= self.slots:
            self.load(needed, ahead)
            self._read_next(x)
            return original(layer=layer, x=x, topk_weights=topk_weights,
                            topk_ids=self._lookup(needed, topk_ids.dtype)[topk_ids],
                            shared_experts=shared_experts, shared_experts_input=shared_experts_input, **kwargs)
        out = torch.zeros(x.shape, dtype=torch.float32)
        # the experts read ahead in the first group (their room is reused once it ran), then those in slots
        needed.sort(key=lambda e: (e not in ahead, e not in self.slot_of))
        for i in range(0, len(needed), self.slots):
            group = needed[i : i + self.slots]
            self.load(group, ahead if i == 0 else None)
            if i == 0:
                self._read_next(x)
            lookup = self._lookup(group, topk_ids.dtype)
            inside = torch.zeros(self.num_experts, dtype=torch.bool)
            inside[group] = True
            routed = inside[topk_ids]
            rows = routed.any(dim=1).nonzero().squeeze(1)
            weights = torch.where(routed[rows], topk_weights[rows], torch.zeros((), dtype=topk_weights.dtype))
            first = i == 0  # shared experts (on their own input, every token) run once, with the first group
            part = original(layer=layer, x=x[rows], topk_weights=weights, topk_ids=lookup[topk_ids[rows]],
                            shared_experts=shared_experts if first else None,
                            shared_experts_input=shared_experts_input if first else None, **kwargs)
            out.index_add_(0, rows, part.float())
            self.stats.groups += i > 0
        return out.to(x.dtype)

    def _lookup(self, experts: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Expert id -> the slot holding it, for ``experts`` (0 for the others), to index ``topk_ids`` with."""
        lookup = torch.zeros(self.num_experts, dtype=dtype)
        lookup[experts] = torch.tensor([self.slot_of[e] for e in experts], dtype=dtype)
        return lookup

    def _apply_beside_reads(self, original, layer, x, topk_weights, topk_ids, needed, ahead, shared_experts,
                            shared_experts_input, **kwargs):
        """One token (a decode step at batch 1) whose experts are not all in: the kernel runs over those
        that are (in a slot, or read ahead and arrived) while the others are read, then over those; the
        two runs summed in float32 (the kernel runs as many expert products as in one run)."""
        started = self._start(needed, ahead, pack_arrived=True)
        waiting = {e for e, _ in started.misses} - started.packed_now
        later = torch.tensor([e in waiting for e in topk_ids[0].tolist()])
        slot_ids = self._lookup(needed, topk_ids.dtype)[topk_ids]
        out, cols = None, torch.arange(topk_ids.shape[1])  # the kernel never runs over no expert (it divides by k)
        if later.any() and not later.all():
            now = (~later).nonzero().squeeze(1)
            out = original(layer=layer, x=x, topk_weights=topk_weights[:, now], topk_ids=slot_ids[:, now],
                           shared_experts=shared_experts, shared_experts_input=shared_experts_input, **kwargs)
            shared_experts = shared_experts_input = None  # run once, with the first
            self.stats.beside_reads += 1
            cols = later.nonzero().squeeze(1)
        self._finish(started)
        self._read_next(x)
        rest = original(layer=layer, x=x, topk_weights=topk_weights[:, cols], topk_ids=slot_ids[:, cols],
                        shared_experts=shared_experts, shared_experts_input=shared_experts_input, **kwargs)
        return rest if out is None else (out.float() + rest.float()).to(x.dtype)


# -- planning and wiring (the loader's side) -----------------------------------------------------------
PAD = 32  # vLLM's CPU MoE kernels pad the intermediate size to a multiple of this (SwiGLU-OAI's excepted)


@dataclasses.dataclass
class MoELayer:
    prefix: str  # the MoE module's name
    module: torch.nn.Module
    num_experts: int
    top_k: int
    part_bytes: tuple[int, int]  # one expert's w13 and w2, as stored
    inter: int  # the intermediate size, as stored
    bias_bytes: int  # the whole expert biases, kept resident
    names: tuple[str, ...]  # the expert tensors' parameter names
    router: torch.nn.Module | None = None  # the layer's router (vLLM's gate), where one is found
    reads_ahead: bool = False  # the previous MoE layer reads this one's likely experts ahead
    packed: bool = False  # read from the experts packed once for vLLM's kernel (packed_experts; see packable)
    slots: int = 0
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # whole, resident

    @property
    def expert_bytes(self) -> int:
        """One slot: an expert as vLLM's kernel holds it (padded; at most that where it is not)."""
        return sum(self.part_bytes) * (-(-self.inter // PAD) * PAD) // self.inter

    @property
    def least_bytes(self) -> int:
        """The fewest slots a step can run in (its top-k experts at once), with the resident biases."""
        return min(self.num_experts, self.top_k) * self.expert_bytes + self.bias_bytes


def region_bytes(layers: list[MoELayer]) -> int:
    """Room for a layer's top-k experts as read (each part page-aligned), for the largest layer."""
    return max(min(m.num_experts, m.top_k) for m in layers) * max(sum(aligned(b) for b in m.part_bytes) for m in layers)


def staging_bytes(layers: list[MoELayer]) -> int:
    """:class:`Staging`'s memory: a layer's top-k experts as read (none where they are read packed,
    straight into their slots), as much again where layers read ahead, and one expert padded where vLLM
    pads."""
    padded = max((m.expert_bytes for m in layers if m.inter % PAD), default=0)
    regions = (not all_packed(layers)) + any(m.reads_ahead for m in layers)
    return region_bytes(layers) * regions + padded


def packable(layers) -> bool:
    """Whether the layers' experts can be packed once for vLLM's kernel and read straight into their
    slots: no expert padded by vLLM (a padded one is larger than stored) and every part whole pages
    (``O_DIRECT`` into a slot)."""
    return all(m.expert_bytes == sum(m.part_bytes) and not any(b % ALIGN for b in m.part_bytes) for m in layers)


def all_packed(layers) -> bool:
    """Whether the layers read their experts packed (:func:`mark_packed` marks all of them or none)."""
    return all(m.packed for m in layers)


def mark_packed(layers: dict[str, MoELayer], packed: bool) -> dict[str, MoELayer]:
    """With ``packed`` (the packed_experts option), the layers read from the experts packed once, where
    they can be (:func:`packable`); they then need no staging for the experts read when routed to."""
    use = packed and packable(layers.values())
    for m in layers.values():
        m.packed = use
    return layers


def least_bytes(layers: dict[str, MoELayer]) -> int:
    """What the experts need at the least: every layer's top-k slots, the biases and the staging."""
    return sum(m.least_bytes for m in layers.values()) + staging_bytes(list(layers.values()))


def has_experts(model: torch.nn.Module) -> bool:
    """Whether the model has MoE layers (vLLM's routed experts)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return any(isinstance(m, RoutedExperts) for m in model.modules())


def moe_layers(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], read_ahead: bool = False,
               packed: bool = False) -> dict[str, MoELayer]:
    """The model's MoE layers whose experts run on vLLM's CPU kernel (unquantized), by module name, in
    order; with ``read_ahead``, each one after the first whose router is found is read ahead for; with
    ``packed``, read from the experts packed once where they can be (:func:`mark_packed`)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    out = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, RoutedExperts):
            continue
        if getattr(module, "expert_map", None) is not None:
            from .config import FlexConfigError

            raise FlexConfigError("--load-format flexinfer reads experts into slots per rank without expert "
                                  "parallelism: drop --enable-expert-parallel (tensor parallelism shards each "
                                  "expert instead)")
        names = tuple(f"{prefix}.{t}" for t in EXPERT_TENSORS + EXPERT_BIASES if f"{prefix}.{t}" in params)
        if not all(f"{prefix}.{t}" in names for t in EXPERT_TENSORS):
            raise RuntimeError(f"flexinfer found an MoE layer {prefix} without {EXPERT_TENSORS}: please report this")
        w13, w2 = (params[f"{prefix}.{t}"] for t in EXPERT_TENSORS)
        experts = w13.shape[0]
        size = lambda p: p.numel() * p.element_size()  # noqa: E731
        router = _router(model, prefix, experts)
        out[prefix] = MoELayer(prefix, module, experts, module.top_k, (size(w13) // experts, size(w2) // experts),
                               w2.shape[2], sum(size(params[n]) for n in names if n.rpartition(".")[2] in EXPERT_BIASES),
                               names, router, reads_ahead=read_ahead and bool(out) and router is not None)
    return mark_packed(out, packed)


def _router(model: torch.nn.Module, prefix: str, experts: int) -> torch.nn.Module | None:
    """An MoE layer's router: vLLM's gate module (one logit per expert) beside its experts (vLLM's MoE
    runner holds it where the model passes it: Qwen) or in the MoE block above (gpt-oss); None if not
    found."""
    parts = prefix.split(".")
    for n in (len(parts) - 1, len(parts) - 2):
        owner = model.get_submodule(".".join(parts[:n]))
        for name in ROUTERS:
            r = getattr(owner, name, None)
            if isinstance(r, torch.nn.Module) and getattr(r, "output_size", None) == experts:
                return r
    return None


def assign_slots(layers: dict[str, MoELayer], room: int) -> int:
    """Slots per layer in ``room`` bytes: every layer its top-k experts, then one more expert per layer in
    turn while room is left (the same in every layer, give or take one), at most all of a layer's.
    Returns the bytes the experts take (slots, biases, staging)."""
    from .plan import BudgetError

    order = list(layers.values())
    least = least_bytes(layers)
    if room < least:
        raise BudgetError(f"the MoE layers' experts need {least / 2**20:.1f} MiB beside the other weights "
                          f"(each layer's top-k experts at once) and {room / 2**20:.1f} MiB is left for them: "
                          "raise memory_budget")
    room -= least
    for layer in order:
        layer.slots = min(layer.num_experts, layer.top_k)
    grew = True
    while grew:
        grew = False
        for layer in order:
            if layer.slots < layer.num_experts and room >= layer.expert_bytes:
                layer.slots += 1
                room -= layer.expert_bytes
                grew = True
    return sum(m.slots * m.expert_bytes + m.bias_bytes for m in order) + staging_bytes(order)


def plan_with_slots(tensors: list, layers: dict[str, MoELayer], budget: int, **plan_kw):
    """The plan for an MoE model: every layer's top-k slots first (a step needs them at once), the other
    tensors (``tensors``, the experts left out) planned in what they leave, then more slots in what that
    plan leaves (:func:`assign_slots`). The slots are recorded in the plan (``Plan.experts``)."""
    from .plan import BudgetError, SlotTier, plan_for_budget

    least = least_bytes(layers)
    if budget < least:
        assign_slots(layers, budget)  # refused, naming what the slots need
    try:
        plan = plan_for_budget(tensors, budget - least, **plan_kw)
    except BudgetError as e:
        raise BudgetError(f"{e}; that is what memory_budget leaves after {least / 2**20:.1f} MiB of expert slots "
                          "(each MoE layer's top-k experts, which a step needs at once)") from None
    plan.budget = budget
    plan.expert_bytes = assign_slots(layers, budget - plan.resident_bytes - plan.arena_bytes)
    plan.experts = {m.prefix: SlotTier(m.slots, m.num_experts, m.top_k, sum(m.part_bytes)) for m in layers.values()}
    return plan


def make_slots(layer: MoELayer, store: WeightStore) -> None:
    """Point the layer's expert parameters at empty slots (vLLM pads and packs them, and builds its kernel
    over them, as it would the whole tensors) and read its biases whole."""
    from .store import rehome

    for name in layer.names:
        tensor = name.rpartition(".")[2]
        p = getattr(layer.module, tensor)
        if tensor in EXPERT_BIASES:
            e = store.index[name]
            layer.biases[tensor] = whole = torch.empty(tuple(e.shape), dtype=e.torch_dtype)
            store.read_tensor(name, whole)
        rehome(p, torch.zeros((layer.slots, *p.shape[1:]), dtype=p.dtype))


def packed_store(store: WeightStore, layers: list[MoELayer], isa: str) -> WeightStore | None:
    """The layers' experts in vLLM's packed layout for ``isa``, in a file beside the weight store (made
    once, from the store, one expert at a time): an expert is then read straight into its slot and never
    packed while the model runs (packing one took as long as reading it from memory twice). None where
    vLLM pads the experts (padded ones are larger than stored) or an expert's part is not a whole number
    of pages (``O_DIRECT`` into a slot)."""
    import json
    import os

    from .store import _COMPLETE

    if not packable(layers):
        return None
    path = store.path.with_name(f"{store.path.stem}.experts-{isa}.bin")
    meta = path.with_suffix(".json")
    st = os.stat(store.path)
    source = [st.st_size, st.st_mtime_ns]  # the store it was made from
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get(_COMPLETE) and info.get("source") == source:
            return WeightStore.open(path, store.direct_io)
    t0 = time.perf_counter()
    names = [f"{m.prefix}.{t}" for m in layers for t in EXPERT_TENSORS]
    entries = {n: store.index[n] for n in names}
    index, size = WeightStore._layout({n: torch.empty(e.shape, dtype=e.torch_dtype, device="meta")
                                       for n, e in entries.items()})
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, max(size, ALIGN))
        except OSError as e:
            raise OSError(f"cannot make {path}, the experts packed for vLLM's kernel ({size / 2**30:.2f} GiB): {e}; "
                          "free disk space, point the \"cache_dir\" option at a disk that has it, or set the "
                          "flexinfer option packed_experts false (experts then packed as they are read)") from e
        largest = max(e.nbytes // e.shape[0] for e in entries.values())
        buf = aligned_buffer(largest)
        unsynced = 0
        for n, e in entries.items():
            per = e.nbytes // e.shape[0]
            one = torch.frombuffer(buf, dtype=e.torch_dtype, count=per // e.torch_dtype.itemsize).view(1, *e.shape[1:])
            out = torch.empty_like(one)
            for x in range(e.shape[0]):
                done = store.read_range(e.offset + x * per, memoryview(buf)[:per])
                if done != per:
                    raise OSError(f"short read of {n} from {store.path}: {done} of {per} bytes (file damaged?)")
                torch.ops._C.prepack_moe_weight(one, out, isa)
                os.pwrite(fd, out.view(torch.uint8).reshape(-1).numpy(), index[n]["offset"] + x * per)
                unsynced += per
                if unsynced >= 64 << 20:  # written back and dropped as it goes: a memory limit never holds it
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    unsynced = 0
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    WeightStore._publish(tmp, path, index, source=source)
    logger.info("flexinfer: packed %d MoE layers' experts for vLLM's %s kernel into %s (%.2f GiB, %.1f s)",
                len(layers), isa, path, size / 2**30, time.perf_counter() - t0)
    return WeightStore.open(path, store.direct_io)


def install(layers: dict[str, MoELayer], store: WeightStore, io_threads: int) -> ExpertStats:
    """After vLLM built its MoE kernels over the slots: each layer's ``quant_method.apply`` runs over them;
    layers marked ``packed`` read their experts from a store of them packed for the kernel (made if
    missing)."""
    stats = ExpertStats()
    order = list(layers.values())
    staging = Staging(store, order, io_threads)
    source = packed_store(store, order, kernel_isa(order[0].module)) if all_packed(order) else None
    stats.packed = source is not None
    seen, before = set(), None
    for layer in order:
        method = layer.module.quant_method
        if id(method) in seen:
            raise RuntimeError("flexinfer found MoE layers sharing one quant_method: please report this")
        seen.add(id(method))
        slots = ExpertSlots(layer, store, staging, stats, source)
        method.apply = functools.partial(slots.apply, method.apply)
        if before is not None:
            before.next = slots
        before = slots
    logger.info("flexinfer: %d MoE layers hold %s of their experts in slots; the others are read when routed to",
                len(layers), " or ".join(sorted({f"{m.slots} of {m.num_experts}" for m in layers.values()})))
    return stats
