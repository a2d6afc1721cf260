"""The FlexInfer plan: which weight tensors stay resident under one memory budget.

Budget layout::

    budget = small tensors (norms)            always resident
           + head (embedding / lm_head)       resident, or streamed when it does not fit
           + stream arena                     holds the layers being read ahead (and runs of the
                                              head's rows, when it streams)
           + resident layer tensors           chosen by the policy below

An embedding table that is not also the lm_head (untied weights), or whose model computes no logits
(a pooling model), is only looked up: whenever the model does not fit the budget whole, it is
neither resident nor streamed, and each lookup reads its rows from the weight store
(``embed_rows``): a few KB per token instead of the whole table in memory (1 GB of bf16 for
Llama-3.1-8B's).

Policies (``flexinfer`` is the paper's; the others are its ablations):

* ``flexinfer`` - flexible tensor preservation (Algorithm 1): keep all FFN tensors of
  every layer if the rest still leaves room for two attention matrices per layer,
  else the two (then one) largest FFN tensors per layer; fill what is left with
  attention tensors, then FFN.  A tensor kind that fits only in some layers is
  spread evenly over the layers (balanced memory locking), so every layer
  streams the same bytes, give or take one tensor.
* ``ffn_first`` - FFN tensors first with no room kept for attention.
* ``attention_first`` - attention tensors first.
* ``no_balance`` - whole layers resident from the first one on (what a plain
  "offload the rest" does), so late layers stream everything.

Tiers: what does not stay resident is streamed into the arena for every forward pass, from a host
tier (``host_budget`` bytes of pinned host memory holding streamed tensors: on a GPU server, RAM
beside the device) or else from the weight store on disk. :func:`assign_host_tier` fills the host
tier largest tensor kind first, each kind spread evenly over the layers that stream it, so every
layer reads about the same bytes from disk.

``python -m flexoffload.plan MODEL --budget 1GiB [--host-budget 2GiB]`` prints a plan for a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

_LAYER = re.compile(r"layers\.(\d+)\.")
_ATTN = ("self_attn", "attention")
_FFN = ("mlp", "feed_forward")
_ROUTER = (".gate.weight", ".router.weight")  # an MoE layer's router


class BudgetError(ValueError):
    """The budget cannot run the model; the message says the minimum."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    nbytes: int
    layer: int | None = None  # decoder layer, or None (embedding, final norm, lm_head)
    kind: str = "small"  # "attn", "ffn", "head" or "small"


def classify(name: str, nbytes: int, ndim: int) -> TensorInfo:
    m = _LAYER.search(name)
    if m is None:
        kind = "head" if ndim >= 2 else "small"
        return TensorInfo(name, nbytes, None, kind)
    layer = int(m.group(1))
    if ndim < 2 or name.endswith(_ROUTER):  # a router is small, and read a layer ahead (flexoffload.experts)
        return TensorInfo(name, nbytes, layer, "small")
    if any(k in name for k in _ATTN):
        return TensorInfo(name, nbytes, layer, "attn")
    if any(k in name for k in _FFN):
        return TensorInfo(name, nbytes, layer, "ffn")
    return TensorInfo(name, nbytes, layer, "small")


@dataclass(frozen=True)
class SlotTier:
    """An MoE layer's experts in slots (flexoffload.experts): the others are read when routed to."""
    slots: int
    experts: int
    top_k: int
    read_bytes: int  # one expert as read from the weight store

    @property
    def misses_per_token(self) -> float:
        """Experts read per decoded token if the router picks uniformly at random (the worst case for a
        cache of experts: a trained router's favourites stay in the slots)."""
        return self.top_k * (self.experts - self.slots) / self.experts


@dataclass
class Plan:
    budget: int
    policy: str
    window: int
    num_layers: int
    resident: set[str] = field(default_factory=set)
    streamed: dict[int, list[str]] = field(default_factory=dict)  # layer -> tensor names, in order
    head_streamed: bool = False
    head_names: list[str] = field(default_factory=list)
    arena_bytes: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    host: set[str] = field(default_factory=set)  # streamed tensors kept in the host tier (not read from disk)
    host_budget: int = 0
    embed_rows: str | None = None  # an embedding table only looked up, read by rows from the store (see above)
    head_chunk_bytes: int = 0  # a streamed head is read and computed in runs of rows of at most this size
    experts: dict[str, SlotTier] = field(default_factory=dict)  # an MoE model's layers: experts in slots
    expert_bytes: int = 0  # memory the expert slots take (slots, resident biases, staging)
    unrouted_bytes: int = 0  # of ``sizes``, experts held whole (the model fits) that a token's router skips

    @property
    def resident_bytes(self) -> int:
        return sum(self.sizes[n] for n in self.resident)

    def layer_streamed_bytes(self, layer: int) -> int:
        return sum(self.sizes[n] for n in self.streamed.get(layer, []))

    @property
    def streamed_bytes_per_forward(self) -> int:
        head = sum(self.sizes[n] for n in self.head_names) if self.head_streamed else 0
        return sum(self.layer_streamed_bytes(i) for i in range(self.num_layers)) + head

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def touched_bytes(self) -> int:
        """Weight bytes a forward pass reads (an embedding table read by rows: a few rows of it; of experts held
        whole, those its router picks)."""
        return self.total_bytes - (self.sizes[self.embed_rows] if self.embed_rows else 0) - self.unrouted_bytes

    @property
    def host_bytes(self) -> int:
        return sum(self.sizes[n] for n in self.host)

    def layer_host_bytes(self, layer: int) -> int:
        return sum(self.sizes[n] for n in self.streamed.get(layer, []) if n in self.host)

    @property
    def host_streamed_bytes_per_forward(self) -> int:
        """Bytes copied from the host tier into the arena per forward pass."""
        head = sum(self.sizes[n] for n in self.head_names if n in self.host) if self.head_streamed else 0
        return sum(self.layer_host_bytes(i) for i in range(self.num_layers)) + head

    @property
    def disk_bytes_per_forward(self) -> int:
        return self.streamed_bytes_per_forward - self.host_streamed_bytes_per_forward

    @property
    def expert_reads_per_token(self) -> float:
        """Expert bytes read from the store per decoded token under uniform routing."""
        return sum(e.misses_per_token * e.read_bytes for e in self.experts.values())

    def predicted_tokens_per_s(self, disk_bytes_per_s: float, mem_bytes_per_s: float,
                               host_bytes_per_s: float | None = None) -> float:
        """Decode bound: each link carries its bytes at its bandwidth, overlapped: t >= the slowest of
        weights touched / memory bandwidth, disk bytes / disk bandwidth, host-tier bytes / host-to-device
        bandwidth (``host_bytes_per_s``; on a CPU a copy at memory bandwidth). An MoE model's expert reads
        add to that: an expert is read only once its layer's router picked it."""
        touched = self.touched_bytes + sum(e.top_k * e.read_bytes for e in self.experts.values())
        t = max(touched / mem_bytes_per_s, self.disk_bytes_per_forward / disk_bytes_per_s,
                self.host_streamed_bytes_per_forward / (host_bytes_per_s or mem_bytes_per_s))
        return 1.0 / (t + self.expert_reads_per_token / disk_bytes_per_s)

    def table(self, disk_bps: float | None = None, mem_bps: float | None = None,
              host_bps: float | None = None) -> str:
        mib = 1 << 20
        lines = [
            f"policy {self.policy}, budget {self.budget / mib:.1f} MiB, prefetch window {self.window} layers",
            f"  resident weights {self.resident_bytes / mib:.1f} MiB + stream arena {self.arena_bytes / mib:.1f} MiB "
            + (f"+ expert slots {self.expert_bytes / mib:.1f} MiB " if self.experts else "")
            + f"= {(self.resident_bytes + self.arena_bytes + self.expert_bytes) / mib:.1f} MiB of "
            f"{(self.total_bytes + sum(e.experts * e.read_bytes for e in self.experts.values())) / mib:.1f} MiB weights",
            f"  host tier {self.host_bytes / mib:.1f} MiB of a {self.host_budget / mib:.1f} MiB host budget",
            (f"  head ({'lm_head' if self.embed_rows else 'embedding/lm_head'}) "
             f"{'streamed' if self.head_streamed else 'resident'}"
             f"{' from the host tier' if self.head_streamed and set(self.head_names) <= self.host else ''}; "
             if self.head_names else "  no lm_head (no logits computed); ") +
            f"streamed per forward pass {self.streamed_bytes_per_forward / mib:.1f} MiB "
            f"({self.host_streamed_bytes_per_forward / mib:.1f} from the host tier, "
            f"{self.disk_bytes_per_forward / mib:.1f} from disk)",
            f"  {'layer':>5} {'resident MiB':>13} {'host MiB':>9} {'disk MiB':>9}  streamed tensors (* from the host tier)",
        ]
        if self.experts:
            tiers = list(self.experts.values())
            slots = sorted({e.slots for e in tiers})
            lines.insert(4, f"  experts: {len(tiers)} MoE layers keep {'-'.join(map(str, sorted({slots[0], slots[-1]})))} of "
                            f"{max(e.experts for e in tiers)} experts in slots ({self.expert_bytes / mib:.1f} MiB with "
                            f"staging and biases), read the others when routed to: "
                            f"{self.expert_reads_per_token / mib:.1f} MiB per token if routing is uniform")
        if self.embed_rows:
            lines.insert(4, f"  embedding table ({self.sizes[self.embed_rows] / mib:.1f} MiB) not held: lookups read "
                            "its rows from the store")
        for i in range(self.num_layers):
            names = self.streamed.get(i, [])
            res = sum(s for n, s in self.sizes.items() if n in self.resident and _layer_of(n) == i)
            short = ", ".join(n.split(f"layers.{i}.")[-1] + ("*" if n in self.host else "") for n in names) or "-"
            host = self.layer_host_bytes(i)
            lines.append(f"  {i:>5} {res / mib:>13.2f} {host / mib:>9.2f} "
                         f"{(self.layer_streamed_bytes(i) - host) / mib:>9.2f}  {short}")
        if disk_bps and mem_bps:
            link = f", host to device {host_bps / 1e9:.2f} GB/s" if host_bps else ""
            lines.append(f"  predicted decode bound: {self.predicted_tokens_per_s(disk_bps, mem_bps, host_bps):.2f} "
                         f"forward passes/s (disk {disk_bps / 1e9:.2f} GB/s, memory {mem_bps / 1e9:.2f} GB/s{link})")
        return "\n".join(lines)


def assign_host_tier(plan: Plan, host_budget: int) -> Plan:
    """Keep streamed tensors in a host tier of ``host_budget`` bytes: tensor kinds largest first, each
    spread evenly over the layers streaming it (the host tier saves the same disk bytes whichever
    tensors it holds; spreading keeps every layer's disk read alike), then the head if it streams."""
    if host_budget < 0:
        raise BudgetError(f"host_budget {host_budget} must be >= 0")
    plan.host, plan.host_budget = set(), host_budget
    room = host_budget
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for layer, names in sorted(plan.streamed.items()):
        for name in names:
            by_kind.setdefault(name.split(f"layers.{layer}.", 1)[1], []).append((layer, name))
    for kind in sorted(by_kind, key=lambda k: -plan.sizes[by_kind[k][0][1]]):
        entries = by_kind[kind]
        size = plan.sizes[entries[0][1]]
        k = min(len(entries), room // size) if size else len(entries)
        for j in _spread(k, len(entries)):
            if plan.sizes[entries[j][1]] <= room:
                plan.host.add(entries[j][1])
                room -= plan.sizes[entries[j][1]]
    head = sum(plan.sizes[n] for n in plan.head_names)
    if plan.head_streamed and plan.head_names and head <= room:
        plan.host |= set(plan.head_names)
        room -= head
    assert plan.host_bytes <= host_budget, "host tier exceeds its budget"
    return plan


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _spread(k: int, n: int) -> list[int]:
    """``k`` of ``n`` layers, evenly spaced."""
    return sorted({(i * n) // k for i in range(k)}) if k else []


def ffn_tier(room: int, ffn_sizes: list[int], attn_matrix: int, n: int) -> int:
    """Algorithm 1: how many FFN tensors (largest first) to keep in every layer.

    All of them if ``room`` also leaves two attention matrices per layer; else the
    largest ``j`` that fit in every layer.
    """
    if room >= sum(ffn_sizes) * n + 2 * attn_matrix * n:
        return len(ffn_sizes)
    for j in range(len(ffn_sizes) - 1, 0, -1):
        if room >= sum(ffn_sizes[:j]) * n:
            return j
    return 0


DEFAULT_WINDOW = 3  # layers read ahead when the user names no prefetch_window
HEAD_CHUNKS = 8  # a streamed head is read in at most this many runs of rows, unless a layer is larger


def plan_for_budget(tensors: list[TensorInfo], budget: int, *, window: int | None = None,
                    policy: str = "flexinfer", logits: bool = True) -> Plan:
    """``make_plan`` with the default window (None) shrunk until its buffers fit the budget: a tight budget
    reads fewer layers ahead rather than failing.  An explicit window is kept as given."""
    if window is not None:
        return make_plan(tensors, budget, window=window, policy=policy, logits=logits)
    for w in range(DEFAULT_WINDOW, 0, -1):
        try:
            return make_plan(tensors, budget, window=w, policy=policy, logits=logits)
        except BudgetError:
            continue
    return make_plan(tensors, budget, window=0, policy=policy, logits=logits)


def make_plan(tensors: list[TensorInfo], budget: int, *, window: int = DEFAULT_WINDOW,
              policy: str = "flexinfer", logits: bool = True) -> Plan:
    """The plan for ``budget``; ``logits`` False for a model that computes none (a pooling model)."""
    layers = sorted({t.layer for t in tensors if t.layer is not None})
    n = len(layers)
    if n == 0 or layers != list(range(n)):
        raise BudgetError("flexinfer needs a decoder whose layers are named '...layers.<i>....'")
    by_layer: dict[int, list[TensorInfo]] = {i: [] for i in range(n)}
    small, head = [], []
    for t in tensors:
        if t.kind == "small":
            small.append(t)
        elif t.kind == "head":
            head.append(t)
        else:
            by_layer[t.layer].append(t)
    sizes = {t.name: t.nbytes for t in tensors}
    if budget >= sum(sizes.values()):  # everything fits: nothing streams, no buffers, no slowdown
        return Plan(budget=budget, policy=policy, window=window, num_layers=n, sizes=sizes,
                    head_names=[t.name for t in head], resident=set(sizes))
    # untied: the input embedding (vLLM's model.embed_tokens) is only looked up; so is a tied one in a
    # model that computes no logits (a pooling model's lm_head is never used)
    table = [t for t in head if "embed_tokens" in t.name][:1] if len(head) > 1 or not logits else []
    head = [t for t in head if t not in table]
    plan = Plan(budget=budget, policy=policy, window=window, num_layers=n, sizes=sizes, head_names=[t.name for t in head],
                embed_rows=table[0].name if table else None)
    plan.resident |= {t.name for t in small}
    small_bytes = sum(t.nbytes for t in small)
    head_bytes = sum(t.nbytes for t in head)

    layer_full = max(sum(t.nbytes for t in ts) for ts in by_layer.values())
    # A streamed head goes in runs of rows no larger than a whole layer (or an eighth of it, if that is
    # more: fewer, larger GEMMs), so the arena need not hold it at once and it overlaps like a layer.
    # (A head of several tensors goes whole, beside the last layer's unit.)
    chunk = min(head_bytes, max(layer_full, -(-head_bytes // HEAD_CHUNKS))) if len(head) == 1 else 0

    def arena(max_unit: int, head_streamed: bool) -> int:
        if not head_streamed:
            return (window + 1) * max_unit
        return (window + 1) * max(max_unit, chunk) if chunk else max((window + 1) * max_unit, max_unit + head_bytes)

    minimum = small_bytes + arena(layer_full, True)
    if budget < minimum:
        raise BudgetError(
            f"memory_budget {budget / 2**20:.1f} MiB is below the minimum {minimum / 2**20:.1f} MiB for this model "
            f"(norms {small_bytes / 2**20:.1f} MiB + buffers for {window + 1} layers or runs of the lm_head's rows"
            f"{'' if chunk or not plan.head_names else ' and the embedding/lm_head'}); "
            f"raise the budget or lower prefetch_window"
        )
    # head resident if it fits next to the worst-case arena
    plan.head_streamed = budget - small_bytes - arena(layer_full, False) < head_bytes
    if not plan.head_streamed:
        plan.resident |= set(plan.head_names)
    else:
        plan.head_chunk_bytes = chunk
    fixed = small_bytes + (0 if plan.head_streamed else head_bytes)

    # Representative layer (llama layers are uniform): tensor kinds sorted largest first.
    proto = by_layer[0]
    ffn = sorted([t for t in proto if t.kind == "ffn"], key=lambda t: -t.nbytes)
    attn = sorted([t for t in proto if t.kind == "attn"], key=lambda t: -t.nbytes)
    suffix = lambda t: t.name.split(f"layers.{t.layer}.", 1)[1]  # noqa: E731
    o_proj = next((t.nbytes for t in attn if "o_proj" in t.name), min((t.nbytes for t in attn), default=0))

    def choose(room: int) -> dict[str, list[int]]:
        """suffix -> layers where it stays resident."""
        keep: dict[str, list[int]] = {}

        def fill(order):
            nonlocal room
            for t in order:
                s = suffix(t)
                if s in keep:
                    continue
                k = min(n, room // t.nbytes) if t.nbytes else n
                if k <= 0:
                    continue
                keep[s] = _spread(k, n)
                room -= k * t.nbytes

        if policy == "no_balance":
            for i in range(n):
                for t in sorted(by_layer[i], key=lambda t: -t.nbytes):
                    if t.nbytes <= room:
                        keep.setdefault(suffix(t), []).append(i)
                        room -= t.nbytes
            return keep
        if policy == "attention_first":
            fill(attn + ffn)
            return keep
        if policy == "ffn_first":
            fill(ffn + attn)
            return keep
        # flexinfer: Algorithm 1's tiers over the FFN tensors
        tier = ffn[: ffn_tier(room, [t.nbytes for t in ffn], o_proj, n)]
        for t in tier:
            keep[suffix(t)] = list(range(n))
            room -= t.nbytes * n
        fill(attn + ffn)  # then attention, then what FFN is left, balanced
        return keep

    def apply(room: int) -> None:
        keep = choose(room)
        plan.resident -= {t.name for ts in by_layer.values() for t in ts}
        plan.streamed = {}
        for i, ts in by_layer.items():
            for t in ts:
                if i in keep.get(suffix(t), ()):
                    plan.resident.add(t.name)
                else:
                    plan.streamed.setdefault(i, []).append(t.name)

    def needed_arena() -> int:
        max_unit = max((plan.layer_streamed_bytes(i) for i in range(n)), default=0)
        return arena(max_unit, plan.head_streamed) if (max_unit or plan.head_streamed) else 0

    worst = arena(layer_full, plan.head_streamed)
    apply(budget - fixed - worst)
    # The arena only needs to hold what is actually streamed; give the difference back once, unless
    # the new choice streams a bigger unit (a tier or spread change) and no longer fits.
    smaller = needed_arena()
    if smaller < worst:
        apply(budget - fixed - smaller)
        if plan.resident_bytes + needed_arena() > budget:
            apply(budget - fixed - worst)
    plan.arena_bytes = needed_arena()
    assert plan.resident_bytes + plan.arena_bytes <= budget, "plan exceeds its budget"
    return plan


# ---------------------------------------------------------------------------- checkpoint tables
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1}


@dataclass
class Checkpoint:
    """A folder's safetensors headers and config.json, read once: (name, shape, dtype) of every tensor."""

    path: Path
    headers: list[tuple[str, list[int], str]]
    config: dict

    @classmethod
    def of(cls, model_dir: str | Path | Checkpoint) -> Checkpoint:
        if isinstance(model_dir, Checkpoint):
            return model_dir
        path, headers = Path(model_dir), []
        for file in sorted(path.glob("*.safetensors")):
            with open(file, "rb") as f:
                (hlen,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(hlen))
            headers += [(name, meta["shape"], meta["dtype"]) for name, meta in header.items() if name != "__metadata__"]
        config = path / "config.json"
        return cls(path, headers, json.loads(config.read_text()) if config.exists() else {})

    def sizes(self, dtype_bytes: int | None):
        """(name, shape, bytes) of every tensor (bytes at ``dtype_bytes`` per element, or as stored)."""
        for name, shape, dtype in self.headers:
            yield name, shape, math.prod(shape) * (dtype_bytes or _DTYPE_BYTES.get(dtype, 2))


def checkpoint_tensors(model_dir: str | Path | Checkpoint, dtype_bytes: int | None = None) -> list[TensorInfo]:
    """Tensor table from a folder's safetensors headers (sizes converted to ``dtype_bytes`` per element)."""
    ckpt = Checkpoint.of(model_dir)
    out = [classify(name, nbytes, len(shape)) for name, shape, nbytes in ckpt.sizes(dtype_bytes)]
    if not out:
        raise BudgetError(f"no safetensors weights in {ckpt.path}: flexinfer streams safetensors checkpoints only")
    return out


# an expert's projections, one tensor each (Qwen MoE, DeepSeek, OLMoE: gate/up/down_proj; Mixtral: w1/w3/w2), or
# all of a layer's experts in one tensor per projection (gpt-oss: gate_up_proj [E, H, 2I], down_proj [E, I, H])
_EXPERT = re.compile(r"(.*layers\.\d+\..*\.experts)\.(?:\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight|"
                     r"(gate_up_proj|down_proj)(_bias)?)$")
_TOP_K = ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k")


def checkpoint_experts(model_dir: str | Path | Checkpoint, dtype_bytes: int | None = None,
                       read_ahead: bool = True, packed: bool = True) -> tuple[dict, set[str]]:
    """An MoE checkpoint's layers as :class:`flexoffload.experts.MoELayer` (sizes at ``dtype_bytes`` per
    element; the top-k from config.json; with ``read_ahead``, each after the first with a router is read
    ahead for, as the loader's ``expert_prefetch``; with ``packed``, read from the experts packed once where
    they can be, as its ``packed_experts``), and the names of the expert tensors; ({}, set()) for a dense
    one."""
    ckpt = Checkpoint.of(model_dir)
    found: dict[str, dict] = {}
    names = set()
    for name, shape, nbytes in ckpt.sizes(dtype_bytes):
        names.add(name)
        m = _EXPERT.fullmatch(name)
        if m is None:
            continue
        prefix, part, fused, bias = m.groups()
        layer = found.setdefault(prefix, {"experts": set(), "w13": 0, "w2": 0, "bias": 0, "inter": 0, "names": set()})
        layer["names"].add(name)
        if bias:
            layer["bias"] += nbytes
            continue
        down = (part or fused) in ("down_proj", "w2")
        layer["w2" if down else "w13"] += nbytes
        if fused:
            layer["experts"] |= set(range(shape[0]))
        else:
            layer["experts"].add(int(name[len(prefix) + 1:].split(".", 1)[0]))
        if down:
            layer["inter"] = shape[1]  # [H, I] one expert's, [E, I, H] all of them
    if not found:
        return {}, set()
    from .experts import MoELayer, mark_packed

    text = ckpt.config.get("text_config") or ckpt.config
    top_k = next((text[k] for k in _TOP_K if text.get(k)), None)
    if top_k is None:
        raise BudgetError(f"{ckpt.path}/config.json names no experts per token ({' or '.join(_TOP_K)})")
    layers = {}
    for prefix, f in sorted(found.items(), key=lambda kv: _layer_of(kv[0])):
        e = len(f["experts"])
        router = any(f"{prefix.rpartition('.')[0]}{r}" in names for r in _ROUTER)
        layers[prefix] = MoELayer(prefix, None, e, top_k, (f["w13"] // e, f["w2"] // e), f["inter"], f["bias"],
                                  tuple(sorted(f["names"])), reads_ahead=read_ahead and bool(layers) and router)
    return mark_packed(layers, packed), {n for f in found.values() for n in f["names"]}


def checkpoint_refusal(model_dir: str | Path | Checkpoint) -> str | None:
    """What the loader would refuse this checkpoint for (a multimodal model, quantized weights), read from
    its config.json, or None (a mixture of experts is planned with its experts in slots, as on CPUs)."""
    from .config import refusal_for

    ckpt = Checkpoint.of(model_dir)
    config = ckpt.config
    text = config.get("text_config") or config
    quant = (config.get("quantization_config") or text.get("quantization_config") or {}).get("quant_method")
    experts = next((text[k] for k in ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts")
                    if text.get(k)), 0)
    arch = ", ".join(config.get("architectures") or [str(ckpt.path)])
    return refusal_for(arch, quant, max(experts) if isinstance(experts, list) else experts, "vision_config" in config,
                       experts_in_slots=True)


def measure_disk_bandwidth(path: Path, nbytes: int = 256 << 20) -> float:
    """``O_DIRECT`` sequential read bandwidth of ``path`` in bytes/s (buffered if O_DIRECT is refused)."""
    import mmap
    import os
    import time

    buf = mmap.mmap(-1, 4 << 20)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    try:
        done, t0 = 0, time.perf_counter()
        while done < min(nbytes, os.fstat(fd).st_size - (4 << 20)):
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
        return done / max(time.perf_counter() - t0, 1e-9)
    finally:
        os.close(fd)


def measure_memory_bandwidth(nbytes: int = 256 << 20) -> float:
    """Copy bandwidth (bytes read + written per second / 2) of a large buffer."""
    import time

    import numpy as np

    a = np.ones(nbytes, dtype=np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    t0 = time.perf_counter()
    np.copyto(b, a)
    return nbytes / (time.perf_counter() - t0)


def _cli_size(text: str) -> str | float:
    """A budget as given on the command line: "0.5" or "1" is a fraction of the weights, else a size."""
    return float(text) if re.fullmatch(r"0?\.\d+|1(\.0)?", text) else text


def main(argv=None) -> int:
    from .config import FlexConfig

    p = argparse.ArgumentParser(prog="python -m flexoffload.plan", description="Print a FlexInfer plan for a checkpoint")
    p.add_argument("model", help="a Hugging Face folder with *.safetensors")
    p.add_argument("--budget", required=True,
                   help='"1GiB", "800MB", bytes, a fraction like 0.5, or auto (free host memory less --kv-bytes and a margin)')
    p.add_argument("--kv-bytes", default="0", help="with --budget auto: the KV cache the engine will hold (e.g. 4GiB)")
    p.add_argument("--host-budget", default="0",
                   help="host memory for streamed tensors (a size or a fraction of the weights; default 0: all from disk)")
    p.add_argument("--host-gbps", type=float, default=None,
                   help="host-to-device bandwidth of the host tier (default: memory bandwidth, a copy on a CPU)")
    p.add_argument("--dtype-bytes", type=int, default=4, help="bytes per element when served (4: float32)")
    p.add_argument("--window", type=int, default=None,
                   help=f"layers read ahead (default {DEFAULT_WINDOW}, fewer where the budget cannot hold the buffers)")
    p.add_argument("--policy", default="flexinfer")
    p.add_argument("--no-expert-prefetch", action="store_true",
                   help="a mixture of experts: plan without the staging buffer of the experts read ahead "
                        "(flexinfer option expert_prefetch false)")
    p.add_argument("--no-packed-experts", action="store_true",
                   help="a mixture of experts: plan the staging buffer of the experts packed as they are read "
                        "(flexinfer option packed_experts false)")
    p.add_argument("--disk-gbps", type=float, default=None, help="disk read bandwidth (default: measured)")
    p.add_argument("--mem-gbps", type=float, default=None, help="memory bandwidth (default: measured)")
    args = p.parse_args(argv)
    disk = args.disk_gbps * 1e9 if args.disk_gbps else measure_disk_bandwidth(next(Path(args.model).glob("*.safetensors")))
    mem = args.mem_gbps * 1e9 if args.mem_gbps else measure_memory_bandwidth()
    ckpt = Checkpoint.of(args.model)
    tensors = checkpoint_tensors(ckpt, args.dtype_bytes)
    refusal = checkpoint_refusal(ckpt)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    room = None
    if args.budget.strip().lower() == "auto":
        from vllm_vtensor.settings import parse_bytes

        from .memory import budget_from, free_host_bytes

        auto = budget_from(*free_host_bytes(), parse_bytes(args.kv_bytes))
        room = auto.room_bytes
        print(f"memory_budget auto: {auto.describe()}")
    budget = FlexConfig(memory_budget=_cli_size(args.budget)).budget_bytes(sum(t.nbytes for t in tensors), room)
    try:
        moe, expert_names = checkpoint_experts(ckpt, args.dtype_bytes, not args.no_expert_prefetch,
                                                 not args.no_packed_experts)
        if moe and budget < sum(t.nbytes for t in tensors):
            from .experts import plan_with_slots

            print("experts in slots, read when routed to: as on CPUs (on CUDA --load-format flexinfer refuses a "
                  "mixture of experts)")
            plan = plan_with_slots([t for t in tensors if t.name not in expert_names], moe, budget,
                                   window=args.window, policy=args.policy)
        else:
            plan = plan_for_budget(tensors, budget, window=args.window, policy=args.policy)
            plan.unrouted_bytes = sum((m.num_experts - m.top_k) * sum(m.part_bytes) for m in moe.values())
        host = FlexConfig(memory_budget=1.0, host_budget=_cli_size(args.host_budget)).host_budget_bytes(
            sum(t.nbytes for t in tensors), free_host=None)
        assign_host_tier(plan, host)
    except (BudgetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(plan.table(disk, mem, args.host_gbps * 1e9 if args.host_gbps else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
