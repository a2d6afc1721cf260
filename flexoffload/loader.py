"""``--load-format flexinfer``: a memory-budgeted vLLM model loader (FlexInfer).

Load path: the model is built by vLLM with its parameters on the meta device
(no memory), the plan picks what stays resident, only those tensors are
materialised and read from an aligned weight store, and the decoder layers get
hooks that swap each layer's streamed tensors in from the prefetch arena while
it computes.  The store holds the tensors in their final dtype (before CPU
weight packing); the first load of a checkpoint writes it with vLLM's default
weight loading aimed straight into the file's shared mapping
(:meth:`WeightStore.build`), so not even that load holds the model in memory.
Weight memory is resident tensors + arena <= ``memory_budget``, while loading
too (up to a tensor being converted: measured in the stats snapshot).

Supported: CPU and CUDA, dense decoders whose layers are ``model.model.layers``, eager
mode (``--enforce-eager``: forward hooks must run on every pass).  On CUDA the
budget is device memory: resident tensors and the device arena stay on the
GPU, streamed tensors are read into a pinned host arena and copied on a side
stream (:class:`~flexoffload.runtime.Streamer`); each parameter is allocated on
the device for a moment as vLLM's layer creates it, then moved to meta.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding, get_masked_input_and_mask
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.utils.torch_utils import set_default_torch_dtype

from vllm_vtensor import settings
from vllm_vtensor.log import get_logger
from vllm_vtensor.stats import Publisher, server_gone, write_snapshot_json

from . import aio, experts
from .config import FlexConfig, FlexConfigError, check_model
from .memory import AutoBudget, auto_budget, free_host_share
from .plan import BudgetError, assign_host_tier, classify, plan_for_budget
from .runtime import HostTier, Streamer, Unit, mlock
from .store import WeightStore, aligned, aligned_buffer, rehome, store_key

logger = get_logger(__name__)
STATS_ENV = "FLEXOFFLOAD_STATS_FILE"  # read through vllm_vtensor.settings


@register_model_loader("flexinfer")
class FlexInferLoader(BaseModelLoader):
    def __init__(self, load_config):
        super().__init__(load_config)
        self.cfg = FlexConfig.from_extra(load_config.model_loader_extra_config)
        settings.check_all()  # every setting, once, with its fix
        inner = dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        self.inner = DefaultModelLoader(inner)
        self.streamer: Streamer | None = None
        self.auto: AutoBudget | None = None  # what memory_budget "auto" found free
        self.io_engine: str | None = None  # "aio" or "threads" once something streams
        self.gemv: str | None = None  # how one-token GEMMs on streamed CPU weights run (choose_gemv)
        self.head_packed = False  # the resident lm_head packed from the store (see _pack_head)
        self.head_runs = 0  # runs of rows a streamed lm_head is read and computed in (see _HeadInRuns)

    def download_model(self, model_config: ModelConfig) -> None:
        self.inner.download_model(model_config)

    def load_weights(self, model, model_config: ModelConfig) -> None:
        self.inner.load_weights(model, model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> torch.nn.Module:
        spec = vllm_config.speculative_config
        if spec is not None and model_config is spec.draft_model_config:
            # A draft model runs several forward passes per step: streamed, it would read its weights
            # each time; it is small beside the target, so vLLM loads it whole, and the stats snapshot
            # stays the target's.
            logger.info("flexinfer: the draft model %s (speculative decoding) is loaded whole by vLLM's default "
                        "loader, outside memory_budget", model_config.model)
            return self.inner.load_model(vllm_config, model_config, prefix)
        check_model(model_config)  # also refused in the user's process (engine-config-check), before the engine starts
        device_type = torch.device(vllm_config.device_config.device).type
        if device_type not in ("cpu", "cuda"):
            raise FlexConfigError(f"--load-format flexinfer streams weights on CPU and CUDA devices, not {device_type}")
        if device_type == "cuda" and self.cfg.policy == "mmap":
            raise FlexConfigError("the mmap baseline (policy 'mmap') maps weights from the page cache for the CPU; "
                                  "on CUDA use another policy")
        from vllm.config import CompilationMode

        if vllm_config.compilation_config.mode != CompilationMode.NONE:
            raise FlexConfigError("--load-format flexinfer needs --enforce-eager (its per-layer hooks must run on "
                                  "every forward pass; compiled graphs skip them)")
        parallel = vllm_config.parallel_config
        if parallel.world_size != parallel.tensor_parallel_size:
            raise FlexConfigError("--load-format flexinfer runs with tensor parallelism (each rank streams its own "
                                  "shard of the weights) but not with pipeline or context parallelism: set "
                                  "--pipeline-parallel-size 1 (and --prefill-context-parallel-size 1)")
        self.shard = _tp_shard()
        self.stats_path = rank_path(settings.get(STATS_ENV), self.shard)
        t0 = time.perf_counter()
        target = torch.device(vllm_config.device_config.device)
        if self.cfg.auto:  # measured before any weight exists: the model is built on meta
            self.auto = auto_budget(vllm_config, target)
        self.vllm_config = vllm_config
        # as in vLLM's loader: the model is built on the device, and built, loaded and processed with
        # its dtype as the default; its parameters go to meta as they are registered
        with set_default_torch_dtype(model_config.dtype), _LoadPeak(target) as peak:
            with target, _parameters_on_meta():
                model = self.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            model = self._load_into(model, model_config, target, t0)
        _write_stats(self.stats_path, {**peak.figures(), "store_path": str(self.store_path)})
        return model

    def _load_into(self, model, model_config: ModelConfig, target: torch.device, t0: float) -> torch.nn.Module:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise FlexConfigError(f"flexinfer streams decoders whose layers are model.model.layers; "
                                  f"{type(model).__name__} has none (a multimodal model's decoder is nested "
                                  "deeper): load it without --load-format flexinfer")
        params = dict(model.named_parameters())  # tied lm_head/embedding appear once
        tensors = [classify(n, aligned(p.numel() * p.element_size()), p.dim()) for n, p in params.items()]
        weight_bytes = sum(t.nbytes for t in tensors)  # the plan's (4096-aligned) sizes: 100% streams nothing
        budget = self.cfg.budget_bytes(weight_bytes, self.auto.room_bytes if self.auto else None)
        if self.auto:
            logger.info("flexinfer: memory_budget auto: %s; %s", self.auto.describe(),
                        "the whole model fits: nothing streams" if budget >= weight_bytes else
                        f"{budget / 2**20:.0f} MiB of the {weight_bytes / 2**20:.0f} MiB of weights")
        path = self.cfg.store_dir() / f"{store_key(model_config.model, model_config.dtype, list(params), self.shard)}.bin"
        self.store_path = path  # in the stats snapshot
        if self.cfg.policy == "mmap":
            if experts.has_experts(model):
                raise FlexConfigError("the mmap baseline (policy 'mmap') maps whole tensors, which vLLM repacks "
                                      "for its MoE kernel into memory of its own: use another policy for a "
                                      "mixture of experts")
            mapped = [n for n, p in params.items() if p.dim() >= 2]
            self._fill(model, model_config, params, path, target, lambda n: n not in mapped)
            del params  # see below: no reference may outlive CPU weight packing
            return self._load_mmap_baseline(model, model_config, target, mapped, path)
        moe = {}
        if budget < weight_bytes:
            moe = experts.moe_layers(model, params, self.cfg.expert_prefetch, self.cfg.packed_experts)
        expert_names = {n for layer in moe.values() for n in layer.names}
        try:
            if moe:  # experts in slots per layer; the dense tensors planned in what the slots leave
                plan = experts.plan_with_slots([t for t in tensors if t.name not in expert_names], moe, budget,
                                               window=self.cfg.prefetch_window, policy=self.cfg.policy,
                                               logits=model_config.runner_type != "pooling")
            else:
                plan = plan_for_budget(tensors, budget, window=self.cfg.prefetch_window, policy=self.cfg.policy,
                                       logits=model_config.runner_type != "pooling")
        except BudgetError as e:
            if self.auto is None:
                raise
            raise BudgetError(f"memory_budget 'auto' found too little memory ({self.auto.describe()}): {e}; or free "
                              "memory, lower --kv-cache-memory-bytes or --max-model-len") from None
        if plan.streamed or plan.head_streamed:
            host_budget = self.cfg.host_budget_bytes(weight_bytes, free_host_share(self.vllm_config)[0],
                                                      target.type)
            assign_host_tier(plan, host_budget)
        logger.info("flexinfer plan (weights %.1f MiB):\n%s", weight_bytes / 2**20, plan.table())
        check_drafter(plan, self.vllm_config.speculative_config)
        streamed = [n for names in plan.streamed.values() for n in names] + (plan.head_names if plan.head_streamed else [])
        partial = bool(streamed) or plan.embed_rows is not None or bool(moe)  # the model is not held whole
        # When anything streams on a CPU, the resident lm_head is packed from the store's pages as vLLM
        # packs it (see _pack_head); its unpacked weight is never loaded.
        packed_head = _packable_head(model, plan, target) if partial else None
        if partial:
            self._fill(model, model_config, params, path, target, lambda n: n in plan.resident and n != packed_head)
            store = WeightStore.open(path, self.cfg.direct_io)
        else:  # the whole model fits: vLLM's own weight loading, no store
            for p in params.values():
                rehome(p, torch.empty(p.shape, dtype=p.dtype, device=target))
            self.load_weights(model, model_config)

        # When anything streams, vLLM's CPU packing is kept off the resident embedding and lm_head: it
        # packs them beside the original (a second copy the budget has no room for).  The lm_head is
        # packed here instead, with no original kept (_pack_head); an embedding table that is not also
        # the lm_head stays as it lies (it is only looked up).  Resident linear layers are packed as
        # vLLM packs them (the packed copy replaces the weight): vLLM's own speed.
        kept = {n: params[n].data for n in plan.resident if partial and params[n].dim() >= 2
                and isinstance(_module(model, n), VocabParallelEmbedding) and n != packed_head}
        # CPU weight packing replaces packed layers' Parameters: a reference kept here would hold
        # every original weight alive beside its packed copy (a second model's worth of memory).
        del params
        not_held = [n for n in (packed_head, plan.embed_rows) if n]
        _drop(model, streamed + list(kept) + not_held, target)
        for layer in moe.values():  # the slots, empty: vLLM's MoE kernel is built over them
            experts.make_slots(layer, store)
        _check_materialised(model)
        process_weights_after_loading(model, model_config, target)
        for name, data in kept.items():
            _param(model, name).data = data
        _gemm_on_live_weights(model, list(kept))
        self.head_packed = packed_head is not None and _pack_head(model, packed_head, store)
        table = _table_read_by_rows(model, plan, packed_head if self.head_packed else None)
        if table:
            _stream_embedding_rows(model, table, store)
        _give_back_freed_memory()  # the weights CPU packing replaced, before the arena is made
        self._reported = _Reported(time.monotonic())
        if streamed:
            self._install(model, layers, plan, store, streamed)
        if moe:
            self._reported.experts = experts.install(moe, store, self.cfg.io_threads)
            if not streamed and self.stats_path:  # no layer hooks to publish the figures after each pass
                path, reported = self.stats_path, self._reported
                model.register_forward_hook(lambda *_: _publisher.request(path, None, reported))
        if target.type == "cuda":
            torch.cuda.empty_cache()  # the dropped tensors' device memory, back to the driver
        if self.cfg.lock_memory and target.type == "cpu":  # on CUDA resident weights are device memory
            locked = sum(mlock(p.data_ptr(), p.numel() * p.element_size()) for n, p in model.named_parameters()
                         if n in plan.resident and p.numel())
            logger.info("flexinfer: mlocked %d resident tensors", locked)
        slot_bytes = plan.expert_bytes
        logger.info("flexinfer: loaded in %.1fs; resident %.1f MiB + arena %.1f MiB%s <= budget %.1f MiB; "
                    "streaming %.1f MiB per forward pass%s", time.perf_counter() - t0, plan.resident_bytes / 2**20,
                    plan.arena_bytes / 2**20, f" + expert slots {slot_bytes / 2**20:.1f} MiB" if moe else "",
                    budget / 2**20, plan.streamed_bytes_per_forward / 2**20,
                    f" ({self.io_engine} reads)" if streamed else "")
        model.flexinfer_plan = plan
        stats_path = self.stats_path
        if stats_path and os.path.exists(stats_path):
            os.remove(stats_path)  # a fresh snapshot per engine
        _write_stats(stats_path, {
            "budget_bytes": budget, "weight_bytes": weight_bytes, "resident_bytes": plan.resident_bytes,
            "arena_bytes": plan.arena_bytes, "streamed_bytes_per_forward": plan.streamed_bytes_per_forward,
            "head_streamed": plan.head_streamed, "policy": plan.policy, "forwards": 0, "bytes_streamed": 0,
            "host_budget_bytes": plan.host_budget, "host_bytes": plan.host_bytes, "bytes_from_host": 0,
            "host_bytes_per_forward": plan.host_streamed_bytes_per_forward,
            "disk_bytes_per_forward": plan.disk_bytes_per_forward,
            "device": target.type, "device_weight_bytes": _device_bytes(model, self.streamer, target),
            "io_engine": self.io_engine, "gemv": self.gemv, "head_packed": self.head_packed,
            "embed_rows": plan.embed_rows, "head_runs": self.head_runs, "shard": self.shard,
            "expert_slots": {m.prefix: m.slots for m in moe.values()} or None,
            "expert_bytes": slot_bytes,
            "auto": self.auto.as_dict() if self.auto else None})
        return model.eval()

    def _fill(self, model, model_config, params, path, target: torch.device, wanted) -> None:
        """Materialise the tensors ``wanted(name)`` selects on ``target`` and read them from the
        weight store; the others stay on meta and are never materialised, so loading stays within
        the budget.  Without a store, vLLM's loader first writes one straight into its file."""
        if not WeightStore.exists(path):
            logger.info("flexinfer: writing the aligned weight store %s (once per checkpoint and dtype)", path)
            WeightStore.build(path, params, lambda: self.load_weights(model, model_config))
        store = WeightStore.open(path, direct_io=False)
        missing = set(params) - set(store.index)
        if missing:
            raise FlexConfigError(f"the weight store {path} lacks {sorted(missing)[:3]}...: delete it to rebuild")
        for name, p in params.items():
            if wanted(name):
                rehome(p, torch.empty(p.shape, dtype=p.dtype, device=target))
                host = p.data if target.type == "cpu" else torch.empty(p.shape, dtype=p.dtype)
                store.read_tensor(name, host)
                if host is not p.data:
                    p.data.copy_(host)
        store.close()

    def _load_mmap_baseline(self, model, model_config, target, mapped: list[str], path) -> torch.nn.Module:
        """Baseline: every matrix (decoder layers, embedding, lm_head) is a view of the read-only
        mmap'd store; the kernel pages weights in on use and evicts them under memory pressure
        (no budget of its own), as llama.cpp does.  Only the norms are loaded."""
        import mmap

        index = WeightStore.open(path, direct_io=False).index
        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        raw = torch.frombuffer(self._mmap, dtype=torch.uint8)  # read-only memory: never written
        _drop(model, mapped, target)
        _check_materialised(model)
        process_weights_after_loading(model, model_config, target)
        for name in mapped:
            e = index[name]
            _param(model, name).data = raw[e.offset : e.offset + e.nbytes].view(e.torch_dtype).view(e.shape)
        _gemm_on_live_weights(model, mapped)
        _give_back_freed_memory()
        logger.info("flexinfer mmap baseline: %d tensors mapped from %s", len(mapped), path)
        return model.eval()

    # -- runtime wiring ----------------------------------------------------
    def _install(self, model, layers, plan, store: WeightStore, streamed: list[str]) -> None:
        units = [Unit(f"layer.{i}", plan.streamed[i]) for i in range(plan.num_layers) if plan.streamed.get(i)]
        layer_units = len(units)
        head_unit, runs = None, []
        host_names = set(plan.host)
        if plan.head_streamed and plan.head_chunk_bytes:  # the lm_head in runs of rows, each a unit
            (name,) = plan.head_names
            runs = store.row_runs(name, plan.head_chunk_bytes)
            units += [Unit(f"head.{r0}", [run]) for run, r0, _ in runs]
            if name in host_names:
                host_names = (host_names - {name}) | {run for run, _, _ in runs}
        elif plan.head_streamed:
            head_unit = len(units)
            units.append(Unit("head", list(plan.head_names)))
        device = next(model.parameters()).device
        first = next((store.index[n] for n in streamed if len(store.index[n].shape) == 2), None)
        if device.type == "cpu" and first is not None and self.cfg.gemv != "auto":
            self.gemv = self.cfg.gemv
        elif device.type == "cpu" and first is not None:  # before the arena exists: timed in memory it will hold
            scratch = aligned_buffer(min(plan.arena_bytes, GEMV_TIMING_BYTES))
            memory = torch.frombuffer(scratch, dtype=torch.uint8)
            self.gemv = choose_gemv(tuple(first.shape), first.torch_dtype, memory)
            del memory
            scratch.close()
            logger.info("flexinfer: one-token GEMMs on streamed %s weights run through %s", first.torch_dtype,
                        self.gemv)
        if self.gemv:
            _GEMV[first.torch_dtype] = self.gemv
        host = HostTier(store, sorted(host_names), self.cfg.lock_memory) if host_names else None
        self.io_engine = self._io_engine(device)
        streamer = (aio.AioStreamer if self.io_engine == "aio" else Streamer)(
            store, units, plan.arena_bytes, window=plan.window, io_threads=self.cfg.io_threads,
            lock_memory=self.cfg.lock_memory, device=device, host=host)
        self.streamer = streamer

        placeholders = {name: (_param(model, name), _param(model, name).data) for name in streamed}  # emptied
        _gemm_on_live_weights(model, streamed)

        # vLLM's parameter classes route ``.data =`` through their __torch_function__ (1.2 us a time,
        # four times a layer): set as on a plain tensor
        plain = torch._C.DisableTorchFunctionSubclass

        def swap_in(slot):
            with plain():
                for name, t in streamer.tensors(slot).items():
                    placeholders[name][0].data = t

        def swap_out(slot):
            with plain():
                for name in units[slot.unit].names:
                    param, empty = placeholders[name]
                    param.data = empty
            streamer.release(slot)

        stats_path = self.stats_path
        active: dict[int, object] = {}
        reported = self._reported

        def pre(unit_idx):
            def hook(module, args):
                slot = streamer.acquire(unit_idx)
                active[unit_idx] = slot
                swap_in(slot)
            return hook

        def forward_done():
            streamer.stats.forwards += 1
            _report(streamer, stats_path, reported)

        count_at = len(units) - 1 if not runs else layer_units - 1  # the unit that ends a forward pass

        def post(unit_idx):
            def hook(module, args, output):
                swap_out(active.pop(unit_idx))
                if unit_idx == count_at:
                    forward_done()
            return hook

        for u_idx, unit in enumerate(units):
            if unit.key.startswith("layer."):
                layer = layers[int(unit.key.split(".")[1])]
                layer.register_forward_pre_hook(pre(u_idx))
                layer.register_forward_hook(post(u_idx))
        if head_unit is not None:
            model.logits_processor.register_forward_pre_hook(pre(head_unit))
            model.logits_processor.register_forward_hook(post(head_unit))
        self.head_runs = len(runs)
        if runs:
            head = _lm_head(model)
            if head is None:
                raise FlexConfigError(f"flexinfer found no lm_head in {type(model).__name__} to stream in runs of "
                                      "rows; raise memory_budget so the head stays resident")
            head.quant_method = _HeadInRuns(head.quant_method, streamer, layer_units, runs, device,
                                            None if layer_units else forward_done)

    def _io_engine(self, device: torch.device) -> str:
        """``aio`` or ``threads``: what ``io_engine`` asks for, where it can run (auto: aio on a CPU where
        glibc provides it; a GPU's streamer copies each unit to the device from its prefetch thread)."""
        want = self.cfg.io_engine
        if want == "threads" or (want == "auto" and device.type != "cpu"):
            return "threads"
        if device.type != "cpu":
            raise FlexConfigError("io_engine 'aio' reads into a CPU arena; streaming to a GPU uses reader threads: "
                                  "use io_engine 'auto' or 'threads'")
        reason = aio.unavailable_reason()
        if reason is None:
            return "aio"
        if want == "aio":
            raise FlexConfigError(f"io_engine 'aio': glibc's POSIX AIO is not available here ({reason}); "
                                  "use io_engine 'auto' or 'threads'")
        logger.info("flexinfer: glibc's POSIX AIO is not available (%s): streaming with Python reader threads", reason)
        return "threads"


# speculative methods whose drafter has no module of the target's: n-gram lookups, or a model of its own
OWN_DRAFTERS = ("ngram", "ngram_gpu", "suffix", "draft_model")


def check_drafter(plan, spec) -> None:
    """Refuse, naming the fix, a drafter that would compute with the target's streamed lm_head: EAGLE,
    MTP and the like share the target's lm_head, whose streamed runs are read in step with the
    target's forward pass only."""
    if spec is not None and plan.head_streamed and spec.method not in OWN_DRAFTERS:
        raise FlexConfigError(
            f"speculative method {spec.method!r} computes its drafts' logits with the target's lm_head, which "
            f"streams at memory_budget {plan.budget / 2**20:.0f} MiB: raise the budget until the plan keeps the "
            f"head resident (python -m flexoffload.plan shows it), or use the method 'draft_model' or 'ngram'")


def _table_read_by_rows(model, plan, packed_head: str | None) -> str | None:
    """The embedding table whose lookups read its rows from the store, being held nowhere: one the plan
    reads by rows (untied, or in a model computing no logits), or the lm_head's own weight where that
    is not held either: streamed, or packed by :func:`_pack_head` (its handler holds the only copy)."""
    if plan.embed_rows:
        return plan.embed_rows
    embed = getattr(model.model, "embed_tokens", None)
    not_held = plan.head_names if plan.head_streamed else [packed_head] if packed_head else []
    return next((n for n in not_held if embed is not None and _param(model, n) is embed.weight), None)


def _stream_embedding_rows(model, name: str, store: WeightStore) -> None:
    """The embedding lookup reads only the rows it needs (a few KB per token) from the store; between
    lookups the table's parameter holds the empty tensor it holds now.  The module's own ``forward`` is
    wrapped, not hooked: vLLM's LoRA layer calls ``base_layer.forward`` directly, past any hook."""
    embed = model.model.embed_tokens
    param = _param(model, name)
    empty = param.data
    entry = store.index[name]
    rows, hidden = entry.shape
    row_bytes = entry.nbytes // rows

    shard = embed.shard_indices if embed.tp_size > 1 else None
    lookup = embed.forward

    def forward(ids, *args, **kwargs):
        if shard is not None:  # this rank's rows: ids of other shards read row 0, then masked by vLLM
            local, outside = get_masked_input_and_mask(
                ids, shard.org_vocab_start_index, shard.org_vocab_end_index, shard.num_org_vocab_padding,
                shard.added_vocab_start_index, shard.added_vocab_end_index)
        else:
            local = ids
        uniq, inverse = torch.unique(local, return_inverse=True)
        data = store.read_rows(name, uniq.tolist(), row_bytes)
        rows_read = torch.frombuffer(bytearray(data), dtype=entry.torch_dtype).view(len(uniq), hidden)
        if shard is not None:  # ids vLLM's shard masking turns into rows of the table read
            start = shard.org_vocab_start_index
            assert len(uniq) <= shard.org_vocab_end_index - start
            inverse = torch.where(outside, -1, inverse.view(ids.shape) + start)
        param.data = rows_read.to(ids.device)
        try:
            return lookup(inverse.view(ids.shape), *args, **kwargs)
        finally:
            param.data = empty

    embed.forward = forward


def _tp_shard() -> str:
    """This worker's shard of the weights under tensor parallelism ("tp1of2"), "" without it."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    size = get_tensor_model_parallel_world_size()
    return f"tp{get_tensor_model_parallel_rank()}of{size}" if size > 1 else ""


def rank_path(path: str | None, shard: str) -> str | None:
    """The stats snapshot of one tensor-parallel rank: the named file for rank 0 (and without tensor
    parallelism), ``<name>.<shard>.json`` beside it for the others."""
    if not path or not shard or shard.startswith("tp0of"):
        return path
    return f"{os.path.splitext(path)[0]}.{shard}.json"


def _module(model, name: str) -> nn.Module:
    """The module that holds parameter ``name``."""
    return model.get_submodule(name.rpartition(".")[0])


def _param(model, name: str) -> torch.nn.Parameter:
    return getattr(_module(model, name), name.rpartition(".")[2])


def _lm_head(model) -> nn.Module | None:
    """The module vLLM computes the logits with: ``lm_head``, or the embedding table itself in models
    that have no lm_head (Gemma 2 hands ``model.embed_tokens`` to its logits processor); None in a
    model that has neither (a pooling model, or one naming them otherwise)."""
    head = getattr(model, "lm_head", None)
    return head if head is not None else getattr(model.model, "embed_tokens", None)


def _drop(model, names: list[str], device: torch.device) -> None:
    """Empty these parameters (before CPU GEMM packing, so no packed copies of them are made)."""
    for name in names:
        p = _param(model, name)
        rehome(p, torch.empty(0, dtype=p.dtype, device=device))


@contextmanager
def _parameters_on_meta():
    """While vLLM builds the model, each parameter's data moves to the meta device as the layer
    registers it: the memory it was created in (on the device, by vLLM's layer code) is freed at
    once, so building never holds more than one tensor.  The Parameter objects themselves, with
    the attributes vLLM sets on them (weight loaders and such), stay."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            rehome(param, torch.empty(param.shape, dtype=param.dtype, device="meta"))

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _check_materialised(model) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"flexinfer left {len(left)} parameters without memory ({left[:3]}...): "
                           "neither resident nor streamed in the plan; please report this")


class _LoadPeak:
    """The most weight memory loading took: on CUDA the allocator's peak on the device, on CPU the
    process's anonymous resident memory (/proc/self/status RssAnon) sampled every 5 ms, above what
    it was when loading began."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.base = device, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def _anon() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._anon())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self._anon()
            self._thread = threading.Thread(target=self._sample, name="flexinfer-load-peak", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._anon())
        return False

    def figures(self) -> dict:
        key = "load_peak_device_bytes" if self.device.type == "cuda" else "load_peak_anon_bytes"
        return {key: self.peak - self.base}


def _device_bytes(model, streamer, device: torch.device) -> int | None:
    """Measured on CUDA: bytes of the model's parameter storages on the device plus the streamer's
    device arena (None on CPU, where the worker's RSS is the measure)."""
    if device.type != "cuda":
        return None
    storages = {p.data.untyped_storage().data_ptr(): p.data.untyped_storage().nbytes()
                for p in model.parameters() if p.device.type == "cuda"}
    return sum(storages.values()) + (streamer.device_arena_bytes if streamer is not None else 0)


class _HeadInRuns:
    """The lm_head's method with its weight streamed in runs of rows (units ``first``, ``first + 1``, ...):
    the logits are computed run by run, each run's unit acquired, multiplied and released in turn, so
    the arena never holds the whole head and its reads overlap with the GEMMs before them.  Everything
    else is the wrapped method's."""

    def __init__(self, inner, streamer: Streamer, first: int, runs: list[tuple[str, int, int]],
                 device: torch.device, done=None):
        self.inner, self.streamer, self.first, self.runs, self.done = inner, streamer, first, runs, done
        self.gemm = _live_gemm if device.type == "cpu" else F.linear

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        for i, (run, _, _) in enumerate(self.runs):
            slot = self.streamer.acquire(self.first + i)
            parts.append(self.gemm(x, self.streamer.tensors(slot)[run], None))
            self.streamer.release(slot)
        out = torch.cat(parts, dim=-1)
        if bias is not None:
            out = out + bias
        if self.done is not None:
            self.done()
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _packable_head(model, plan, target: torch.device) -> str | None:
    """The name of the lm_head's weight where :func:`_pack_head` packs it: a resident lm_head on a CPU
    whose vLLM computes GEMMs with oneDNN (elsewhere it computes on the weight as it lies)."""
    from vllm import _custom_ops as ops

    head = _lm_head(model)
    if target.type != "cpu" or not getattr(ops, "_supports_onednn", False) or not isinstance(head,
                                                                                            VocabParallelEmbedding):
        return None
    name = next((n for n, p in model.named_parameters() if p is head.weight), None)
    return name if name in plan.resident else None


def _pack_head(model, name: str, store: WeightStore) -> bool:
    """Pack the resident lm_head for oneDNN as vLLM packs it (its handler holds the only copy), reading
    the weight from the store's pages, which are dropped again: no unpacked copy is ever in anonymous
    memory.  The lm_head's GEMM is the largest a decode step runs; unpacked it ran at 0.73x the packed
    speed (SmolLM2's 113 MB head, float32, one core: 4.05 vs 2.94 ms).  Where the lm_head is also the
    embedding table (tied weights), lookups read their rows from the store (:func:`_table_read_by_rows`).
    False (the weight loaded as it lies instead) where oneDNN refuses the weight."""
    import mmap

    from vllm import _custom_ops as ops

    head, param = _lm_head(model), _param(model, name)
    e = store.index[name]
    with open(store.path, "rb") as f:
        pages = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            weight = torch.frombuffer(pages, dtype=torch.uint8, offset=e.offset, count=e.nbytes)
            weight = weight.view(e.torch_dtype).view(e.shape)
            try:
                handler = ops.create_onednn_mm(weight.t(), 32)
                packed = True
            except RuntimeError as err:
                logger.warning("flexinfer: oneDNN cannot pack the lm_head (%s); it computes on the weight as it "
                               "lies", str(err).splitlines()[0])
                param.data = weight.clone()
                packed = False
            del weight
        finally:
            try:
                pages.close()
            except BufferError:  # a view of it still referenced somewhere: unmapped when that goes
                pass
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), e.offset, e.nbytes, os.POSIX_FADV_DONTNEED)
    if not packed:
        _gemm_on_live_weights(model, [name])
        return False
    head.cpu_linear = lambda x, weight, bias: ops.onednn_mm(handler, x, bias)
    return True


def _gemm_on_live_weights(model, names: list[str]) -> None:
    """Modules using these weights (a tied lm_head too) run their GEMM on whatever tensor the
    parameter holds at call time, instead of a packed copy made at load time."""
    ids = {id(_param(model, n)) for n in names}
    for module in model.modules():
        if any(id(p) in ids for p in module._parameters.values() if p is not None):
            module.cpu_linear = _live_gemm


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """float32, and the half types where this CPU runs them natively in oneDNN (elsewhere oneDNN would
    fall back to its reference kernels: PyTorch's own path is faster there)."""
    dtypes = [torch.float32]
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            dtypes.append(torch.bfloat16)
        if torch.ops.mkldnn._is_mkldnn_fp16_supported():
            dtypes.append(torch.float16)
    except (AttributeError, RuntimeError):  # a PyTorch without the checks: float32 only
        pass
    return tuple(dtypes)


_ONEDNN_DTYPES = _onednn_dtypes() if _ONEDNN_LINEAR else ()


_GEMV: dict[torch.dtype, str] = {}  # dtype -> how one-token GEMMs on streamed weights run (choose_gemv)
GEMV_TIMING_BYTES = 32 << 20
GEMV_PATHS = {
    "onednn": lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
    "linear": F.linear,
    "mv": lambda x, w, b: torch.mv(w, x[0]).unsqueeze(0) if b is None else (torch.mv(w, x[0]) + b).unsqueeze(0),
}


def choose_gemv(shape: tuple[int, int], dtype: torch.dtype, memory: torch.Tensor, timer=time.perf_counter) -> str:
    """The fastest way on this CPU to multiply one token by a weight as it lies (a decode step at batch
    1 over streamed weights): oneDNN's matmul, PyTorch's ``F.linear`` or ``torch.mv``, each timed over
    weights of ``shape`` laid side by side in ``memory`` (bytes; the loader lends the stream arena's
    share, up to :data:`GEMV_TIMING_BYTES`: more than the caches hold, as a weight just read is).
    oneDNN (the default) is kept unless another is more than 10% faster: on AMD EPYC VMs oneDNN ran
    1.7x ``F.linear`` at one token (float32); on an Intel Xeon with AMX ``F.linear`` ran 1.3-2x oneDNN
    (float32) and ``torch.mv`` 1.3x (bf16)."""
    default = "onednn" if _ONEDNN_LINEAR and dtype in _ONEDNN_DTYPES else "linear"
    numel = shape[0] * shape[1]
    values = memory[: memory.numel() // dtype.itemsize * dtype.itemsize].view(dtype)
    count = values.numel() // numel
    if count == 0:
        return default
    values[: count * numel].uniform_(-0.05, 0.05)  # no NaNs nor subnormals, which would time other paths
    weights = list(values[: count * numel].view(count, *shape).unbind())
    x = torch.empty(1, shape[1], dtype=dtype).uniform_(-1, 1)
    took = {}
    for name, fn in GEMV_PATHS.items():
        if name == "onednn" and default != "onednn":
            continue
        try:
            fn(x, weights[0], None)
        except RuntimeError:  # a PyTorch without this path for ``dtype``
            continue
        best = float("inf")
        for _ in range(3):
            t0 = timer()
            for w in weights:
                fn(x, w, None)
            best = min(best, timer() - t0)
        took[name] = best
    fastest = min(took, key=took.get)
    return fastest if took[fastest] < 0.9 * took.get(default, float("inf")) else default


def _live_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on a CPU weight as it lies (nothing packed), through oneDNN's matmul where PyTorch
    has it (for the dtypes :func:`_onednn_dtypes` names): at decode sizes PyTorch's own path runs the
    GEMV on one core (MKL), oneDNN on all of them (float32, 2 cores: 1.7x at 1 token, 1.3x at 256;
    vLLM's packed weights run the same kernels).  One token at a time goes the way the ``gemv`` option
    or :func:`choose_gemv` picked for its dtype."""
    global _ONEDNN_LINEAR
    path = _GEMV.get(x.dtype) if x.dim() == 2 and x.shape[0] == 1 else None
    if path is not None and path != "onednn" and x.dtype == weight.dtype:
        return GEMV_PATHS[path](x, weight, bias)
    if _ONEDNN_LINEAR and x.dtype == weight.dtype and x.dtype in _ONEDNN_DTYPES:
        try:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        except RuntimeError as e:  # a build or CPU whose oneDNN lacks this case: PyTorch's own path from now on
            _ONEDNN_LINEAR = False
            logger.warning("flexinfer: oneDNN's matmul refused a %s %s weight (%s); using F.linear",
                           x.dtype, tuple(weight.shape), str(e).splitlines()[0])
    return F.linear(x, weight, bias)


def _give_back_freed_memory() -> None:
    """Freed weights sit in malloc's free lists (glibc raises its mmap threshold); return them to the OS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_stats(path: str) -> dict:
    """The JSON snapshot at ``path`` ({} if there is none, or it cannot be read)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


_SNAPSHOT_INTERVAL_S = 0.2


def _write_stats(path: str | None, data: dict) -> None:
    """Merge ``data`` into the JSON snapshot at ``path`` (/metrics, tests and benchmarks read it)."""
    if path and not server_gone(path):
        write_snapshot_json(path, {**read_stats(path), **data})


@dataclasses.dataclass
class _Reported:
    logged: float  # when the last log line was written
    snapshot: dict = dataclasses.field(default_factory=dict)  # what the stats file holds
    experts: experts.ExpertStats | None = None  # an MoE model's expert slots: hits, reads
    failed: bool = False  # a write failed (logged once)


def _write_snapshot(stats_path: str, streamer: Streamer | None, reported: _Reported) -> None:
    """The running figures into the snapshot (on the publisher's thread); best effort: a failed write is
    logged once, and the forward passes go on."""
    if server_gone(stats_path):
        return
    try:
        if not reported.snapshot:
            reported.snapshot.update(read_stats(stats_path))
        if streamer is not None:
            s = streamer.stats
            reported.snapshot.update(dataclasses.asdict(s), overlap=s.overlap, arena_locked=streamer.locked)
        if reported.experts is not None:
            reported.snapshot["experts"] = dataclasses.asdict(reported.experts)
        write_snapshot_json(stats_path, reported.snapshot)
    except OSError:
        if not reported.failed:
            reported.failed = True
            logger.warning("flexinfer: writing the figures to %s failed", stats_path, exc_info=True)


# Writing the snapshot took 0.7 ms, 2% of a SmolLM2 forward pass on a 2-core machine: a helper thread writes
# it, at most every 0.2 s, the figures after the latest pass last (those of the last passes before a pause are
# there while the engine idles: /metrics reads them).
_publisher = Publisher(_write_snapshot, _SNAPSHOT_INTERVAL_S, "flexinfer-stats")


def _report(streamer: Streamer, stats_path: str | None, reported: _Reported) -> None:
    """After each forward pass: the JSON snapshot handed to the publisher, and a log line every 10 s."""
    s = streamer.stats
    now = time.monotonic()
    if stats_path:
        _publisher.request(stats_path, streamer, reported)
    if now - reported.logged > 10:
        reported.logged = now
        logger.info("flexinfer: %d forwards, %.1f MiB read from disk, %.1f MiB from the host tier, I/O %.2fs, "
                    "waited %.2fs (overlap %.0f%%)", s.forwards, s.bytes_streamed / 2**20, s.bytes_from_host / 2**20,
                    s.io_seconds, s.wait_seconds, 100 * s.overlap)
