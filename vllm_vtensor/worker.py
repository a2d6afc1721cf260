"""Worker side of the VTENSOR KV cache: allocation and block-id translation.

Two hooks (installed by :mod:`vllm_vtensor.patches`):

* :func:`allocate_kv_cache` builds a :class:`KVSpace` instead of vLLM's flat
  preallocated buffer and returns each layer's KV tensor as a strided view of
  the virtual range.  No physical memory is committed until blocks are used.
* :func:`translate_scheduler_output` runs at the start of every step, before
  the runner applies the scheduler's decisions: it maps the physical blocks
  the scheduler handed out into each request's slot, unmaps finished and
  preempted requests, performs the scheduler's block zeroing and copies on the
  physical chunks, and rewrites the block ids the runner sees into virtual
  ones.  From then on the runner, its block table, its slot mapping and the
  attention kernel only ever see virtual block ids.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch

from . import BACKEND_NAME, settings
from . import shared_pool
from . import stats as vt_stats
from .kv_space import KVSpace, chunk_bytes_for
from .ledger import PoolError
from .policy import VTensorConfigError, check_chunk_padding, warn_if_slow_to_cover
from .log import get_logger
from .vmm import VMMError, make_backend
from .vmm.deferred import DeferredBackend

logger = get_logger(__name__)


def is_vtensor(vllm_config) -> bool:
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return backend is not None and getattr(backend, "name", str(backend)) == BACKEND_NAME


def _attention_groups(kv_cache_config):
    """The KV cache groups VTENSOR runs: each all full attention or all one sliding window (several
    groups: a hybrid model such as Gemma 2/3), with one block size. Other kinds are refused, naming the fix."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    groups = kv_cache_config.kv_cache_groups
    ok = bool(groups) and all(
        type(g.kv_cache_spec) in (FullAttentionSpec, SlidingWindowSpec)
        and not getattr(g.kv_cache_spec, "extra_retained_tokens", 0) for g in groups)
    if not ok or len({g.kv_cache_spec.block_size for g in groups}) != 1 \
            or len({g.kv_cache_spec.page_size_bytes for g in groups}) != 1:
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise VTensorConfigError(
            f"--attention-backend VTENSOR supports models whose layers use full attention or sliding windows; "
            f"this model has KV cache groups {kinds}. Run it without VTENSOR."
        )
    return groups


def check_engine_features(vllm_config) -> None:
    """Refuse engine features that would read or free KV memory behind VTENSOR's back, naming the fix.

    * KV connectors (``--kv-transfer-config``, which ``--kv-offloading-size`` also sets): their
      worker side copies KV in and out of the cache tensors by the scheduler's block ids, which are
      physical ids; VTENSOR's cache tensors are indexed by virtual ids (each request's own range),
      so a connector would read and write other blocks than it means.  Seen on vLLM 0.32's
      ExampleConnector: the scheduler counted the blocks it was to load as cached, the worker had
      never kept such blocks ("prefix-cache hit on physical block 7, whose content was not kept"),
      and the engine stopped.
    * Sleep mode: vLLM frees memory at sleep through its CuMemAllocator pool, which VTENSOR's KV
      memory is not in (the VMM backend maps its own chunks).  VTENSOR already gives KV memory
      back as requests finish; what an idle engine keeps is the prefix cache's blocks, which
      ``LLM.reset_prefix_cache()`` (``POST /reset_prefix_cache``) gives back."""
    problems = []
    if getattr(getattr(vllm_config, "kv_transfer_config", None), "kv_connector", None):
        problems.append("KV connectors (--kv-transfer-config, --kv-offloading-size) address vLLM's KV cache by "
                        "physical block ids, and VTENSOR's cache is indexed by each request's virtual blocks: "
                        "run without --kv-transfer-config / --kv-offloading-size")
    if getattr(getattr(vllm_config, "model_config", None), "enable_sleep_mode", False):
        problems.append("sleep mode frees memory through vLLM's allocator pool, which VTENSOR's KV memory is not in "
                        "(VTENSOR gives KV memory back as requests finish, and LLM.reset_prefix_cache() / "
                        "POST /reset_prefix_cache gives back the prefix cache's): run without --enable-sleep-mode")
    if problems:
        raise VTensorConfigError("--attention-backend VTENSOR cannot run with " + "; ".join(problems)
                                 + "; or run without --attention-backend VTENSOR.")


def check_engine_config(vllm_config, on_cpu: bool) -> None:
    """What VTENSOR refuses that an engine's configuration alone decides: its settings, the engine features
    above, a shared pool too small for one request (:func:`vllm_vtensor.shared_pool.check_pool_size`) and, on a
    CPU, what the backend cannot serve (:func:`vllm_vtensor.backend.check_config`). The
    ``engine-config-check`` patch runs this where vLLM makes the configuration, in the user's process, so
    ``LLM(...)`` or ``vllm serve`` stops at once with the fix instead of after its engine processes have
    started (and reported only "Engine core initialization failed"). The worker repeats these checks."""
    if not is_vtensor(vllm_config):
        return
    settings.check_all()
    check_engine_features(vllm_config)
    try:
        shared_pool.check_pool_size(vllm_config)
    except PoolError as e:
        raise VTensorConfigError(str(e)) from None
    if on_cpu:
        from .backend import check_config

        check_config(vllm_config)


LINGER_ENV = "VTENSOR_CHUNK_LINGER_S"
PRECREATE_ENV = "VTENSOR_PRECREATE_BYTES"
STAGE_ENV = "VTENSOR_STAGE_MAPPINGS"
ASYNC_ENV = "VTENSOR_ASYNC_MAPPING"
DEFERRED_UNMAP_ENV = "VTENSOR_DEFERRED_UNMAP"
MAP_AHEAD_ENV = "VTENSOR_MAP_AHEAD"
DEFAULT_PRECREATE_BYTES = settings.SETTINGS_BY_NAME[PRECREATE_ENV].default


def layer_views(kv: KVSpace, num_layers: int, page_shape: tuple[int, int, int], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each layer's KV tensor ``[virtual blocks, *page_shape]`` as a strided view of ``kv``'s range.

    ``page_shape`` is one layer's page of one block in bytes' units (``(heads, tokens, bytes)``,
    vLLM's ``compute_layer_kv_cache_shape_bytes``); layer ``l``'s page of virtual block ``v``
    starts at ``v * chunk_bytes + l * page_bytes``.  Unmapped blocks read as zeros."""
    heads, tokens, content = page_shape
    page = heads * tokens * content
    if num_layers * page > kv.chunk_bytes:
        raise ValueError(f"{num_layers} layers of {page} B pages do not fit a {kv.chunk_bytes} B chunk")
    raw = kv.as_tensor()
    return [
        torch.as_strided(raw, size=(kv.num_virtual_blocks, heads, tokens, content),
                         stride=(kv.chunk_bytes, tokens * content, content, 1), storage_offset=l * page).view(dtype)
        for l in range(num_layers)
    ]


def retiring_slots(max_num_seqs: int) -> int:
    """Slots beyond ``max_num_seqs`` for ranges waiting for their deferred unmap (``VTENSOR_DEFERRED_UNMAP``):
    a quarter more, at least 4. When every slot is taken, vLLM starts a request in the step another
    finished in; without a spare slot it would wait for the device to pass the finished one's last step,
    the wait deferring was for."""
    return max(4, -(-max_num_seqs // 4))


def kv_space_for(backend, *, max_num_seqs: int, max_model_len: int, block_size: int, block_bytes: int,
                 **kw) -> KVSpace:
    """A :class:`KVSpace` with one slot per request vLLM may run (``max_num_seqs``; with deferred unmaps,
    :func:`retiring_slots` more), each long enough for ``max_model_len`` tokens (plus one block); a
    virtual reservation the system refuses is reported with the flags that size it."""
    blocks_per_slot = math.ceil(max_model_len / block_size) + 1
    slots = max_num_seqs + (retiring_slots(max_num_seqs) if kw.get("defer_unmaps") else 0)
    virtual = slots * blocks_per_slot * chunk_bytes_for(block_bytes, backend.granularity)
    warn_if_slow_to_cover(backend.device, virtual, backend.granularity, max_num_seqs, max_model_len)
    try:
        return KVSpace(backend, num_slots=slots, blocks_per_slot=blocks_per_slot, block_size=block_size,
                       block_bytes=block_bytes, **kw)
    except VMMError as e:
        raise VTensorConfigError(
            f"VTENSOR reserves a virtual range for each of --max-num-seqs {max_num_seqs} requests"
            f"{f' (and {slots - max_num_seqs} for ranges waiting for their deferred unmap)' if slots > max_num_seqs else ''}"
            f", long enough for "
            f"--max-model-len {max_model_len} tokens: {virtual / 2**30:.1f} GiB of address space in all (no memory "
            f"is committed for it), which {backend.device} refused ({e}). Lower --max-num-seqs or --max-model-len."
        ) from e


def allocate_kv_cache(runner, kv_cache_config, kernel_block_sizes=None) -> dict[str, torch.Tensor]:
    """Per-layer KV views over a fresh :class:`KVSpace`, stored on ``runner``."""
    from vllm.v1.kv_cache_interface import compute_layer_kv_cache_shape_bytes

    vllm_config = runner.vllm_config
    settings.check_all()  # every setting, once, with its fix
    check_engine_features(vllm_config)
    groups = _attention_groups(kv_cache_config)
    spec = groups[0].kv_cache_spec
    page = spec.page_size_bytes
    # a chunk holds one block of every layer of a group (groups share one block pool: a block belongs to one
    # group at a time, so the chunk is sized for the group with the most layers)
    block_bytes = page * max(len(g.layer_names) for g in groups)
    if kernel_block_sizes and any(k != spec.block_size for k in kernel_block_sizes):
        raise VTensorConfigError(f"VTENSOR needs the attention kernel's block size to be the cache's ({spec.block_size}); "
                                 f"vLLM chose {kernel_block_sizes}. Pass --block-size {kernel_block_sizes[0]}.")
    _, heads, tokens, content = compute_layer_kv_cache_shape_bytes(spec, 1)
    if heads * tokens * content != page:
        raise VTensorConfigError(f"VTENSOR needs dense KV pages; got page {page} for shape {(heads, tokens, content)}")
    device = torch.device(runner.device)
    if device.type == "cuda":
        backend = make_backend(f"cuda:{device.index or 0}")
        check_chunk_padding(block_bytes, spec.block_size, backend.granularity)
        budget = kv_cache_config.num_blocks * chunk_bytes_for(block_bytes, backend.granularity)
        free, _ = torch.cuda.mem_get_info(device)
        if budget > free:
            raise VTensorConfigError(
                f"VTENSOR's KV budget of {kv_cache_config.num_blocks} chunks ({budget / 2**30:.2f} GiB) exceeds the "
                f"{free / 2**30:.2f} GiB free on {device}: lower --gpu-memory-utilization or --kv-cache-memory-bytes")
        for name in (STAGE_ENV, ASYNC_ENV):
            if settings.get(name):
                logger.warning("%s applies to the host (CPU) backend only; ignored on %s", name, device)
        if settings.get(DEFERRED_UNMAP_ENV):
            logger.warning("%s=1 is experimental: finished requests' ranges are unmapped beside the compute "
                           "(not yet measured on a GPU)", DEFERRED_UNMAP_ENV)
    elif device.type == "cpu":
        if settings.get(DEFERRED_UNMAP_ENV):
            logger.warning("%s applies to CUDA only (a CPU runs no work ahead of the worker); ignored",
                           DEFERRED_UNMAP_ENV)
        for name in (STAGE_ENV, ASYNC_ENV):
            if settings.get(name):
                logger.warning("%s=1 is experimental: measured no faster end to end on a 2-core CPU "
                               "(docs/design/architecture.md, \"Experimental paths\")", name)
        backend = make_backend("cpu", stage=settings.get(STAGE_ENV))
        if settings.get(ASYNC_ENV):
            backend = DeferredBackend(backend)
    else:
        raise VTensorConfigError(f"--attention-backend VTENSOR runs on CPU and CUDA GPUs, not on {device}. "
                                 "Run without --attention-backend VTENSOR.")
    map_ahead = settings.get(MAP_AHEAD_ENV)
    if map_ahead and isinstance(backend, DeferredBackend):
        logger.warning("%s does not combine with %s=1 (its queued mappings run after the helper's); ignored",
                       MAP_AHEAD_ENV, ASYNC_ENV)
        map_ahead = False
    t0 = time.perf_counter()
    spaces: list[KVSpace] = []
    views: dict[str, torch.Tensor] = {}
    for group in groups:
        gspec = group.kv_cache_spec
        kv = kv_space_for(
            backend,
            max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
            max_model_len=vllm_config.model_config.max_model_len,
            num_blocks=kv_cache_config.num_blocks,
            block_bytes=block_bytes,
            block_size=gspec.block_size,
            keep_full_blocks=bool(vllm_config.cache_config.enable_prefix_caching),
            # a sliding window: blocks left behind are unmapped as requests move on, and vLLM hands out its
            # null block (the block pool's first, id 0) in their place
            sliding_window=getattr(gspec, "sliding_window", None),
            null_block=0,
            linger_s=settings.get(LINGER_ENV),
            precreate_bytes=settings.get(PRECREATE_ENV),
            defer_unmaps=device.type == "cuda" and settings.get(DEFERRED_UNMAP_ENV),
            map_ahead=map_ahead,
            on_release=lambda space: vt_stats.publish(space, force=True),
            shares_memory_with=spaces[0] if spaces else None,
        )
        spaces.append(kv)
        layers = list(group.layer_names)
        views |= dict(zip(layers, layer_views(kv, len(layers), (heads, tokens, content), gspec.dtype)))
    kv = spaces[0]
    runner._vtensor_kv = kv  # the first group's space: figures and resets cover every group (its family)
    vt_stats.attach(kv)
    try:
        shared_pool.join_worker(  # the chunk pool keeps the share it attaches
            kv, ceiling=kv_cache_config.num_blocks * kv.chunk_bytes, max_model_len=vllm_config.model_config.max_model_len,
            label=_engine_label(vllm_config),
            device="cpu" if device.type == "cpu" else f"cuda:{device.index or 0}",
            executor=str(vllm_config.parallel_config.distributed_executor_backend))
    except PoolError as e:
        raise VTensorConfigError(str(e)) from None
    logger.info(
        "VTENSOR KV cache: %d layers in %d group(s), %d slots x %d blocks of %d tokens, chunk %.2f MiB (a group's "
        "layers of one block), physical budget %.2f GiB (%d blocks), virtual %.1f GiB per group (set up in %.2f s), "
        "nothing committed yet",
        len(views), len(spaces), kv.num_slots, kv.blocks_per_slot, spec.block_size, kv.chunk_bytes / 2**20,
        kv_cache_config.num_blocks * kv.chunk_bytes / 2**30, kv_cache_config.num_blocks, kv.range.size / 2**30,
        time.perf_counter() - t0,
    )
    return views


def _engine_label(vllm_config) -> str:
    """The name an engine shows on a shared pool: its served model name, else its model folder's name."""
    name = vllm_config.model_config.served_model_name or vllm_config.model_config.model
    name = name[0] if isinstance(name, (list, tuple)) else name
    return str(name).rstrip("/").rsplit("/", 1)[-1][:32]


class VTensorWorkerExtension:
    """Calls on VTENSOR's KV space from the front end, by vLLM's ``worker_extension_cls``:
    ``LLM(..., worker_extension_cls="vllm_vtensor.worker.VTensorWorkerExtension")``, then
    ``llm.collective_rpc("vtensor_reset_peaks")``."""

    def vtensor_reset_peaks(self) -> bool:
        """Start the exact peak figures (``peak_resident_bytes``, ``peak_live_tokens``) over from the
        current ones and publish them; False in a worker without a VTENSOR KV space."""
        kv = getattr(getattr(self, "model_runner", None), "_vtensor_kv", None)
        if kv is None:
            return False
        with _memory_work(kv):  # after any queued step's
            kv.reset_peaks()
        vt_stats.publish(kv, force=True)
        return True

    def vtensor_stats(self) -> dict | None:
        """The KV space's figures now (exact, unlike the snapshot file's), as a dict; None without one."""
        kv = getattr(getattr(self, "model_runner", None), "_vtensor_kv", None)
        return None if kv is None else dataclasses.asdict(kv.stats())


def _memory_work(kv: KVSpace):
    """Where ``kv``'s memory operations run: queued for the helper thread with a deferred backend
    (after those already queued), inline otherwise."""
    deferring = getattr(kv.backend, "deferring", None)
    return deferring() if deferring is not None else contextlib.nullcontext()


def translate_scheduler_output(kv: KVSpace, so) -> None:
    """Apply the scheduler's block decisions to ``kv`` and make ``so``'s block ids virtual.

    With a deferred backend the bookkeeping is done here and the memory operations are queued for
    its helper thread; the attention layers wait for them before touching KV."""
    t0 = time.perf_counter()
    with _memory_work(kv):
        _apply(kv, so)
    kv.note_step()
    kv.step_seconds += time.perf_counter() - t0
    vt_stats.publish(kv, force=bool(so.finished_req_ids or so.preempted_req_ids or so.scheduled_new_reqs
                                    or so.scheduled_cached_reqs.resumed_req_ids))


def reset_prefix_cache_memory(worker) -> int:
    """After vLLM's prefix cache was reset (``LLM.reset_prefix_cache()``, ``POST /reset_prefix_cache``):
    give back the memory of every block only the cache was keeping; return the bytes it held.

    Run in each worker by the engine core (``collective_rpc``) once the scheduler's reset succeeded:
    no request can hit those blocks any more, and blocks running requests map stay."""
    kv = getattr(getattr(worker, "model_runner", None), "_vtensor_kv", None)
    if kv is None:
        return 0
    held = kv.stats().cached_bytes
    with _memory_work(kv):  # after any queued step's
        kv.reset_cache()
    vt_stats.publish(kv, force=True)
    logger.info("vTensor: prefix cache reset, %.1f MiB of cached KV given back", held / 2**20)
    return held


def _handed_out_this_step(so, block_size: int) -> set[int]:
    """Blocks the scheduler handed out in this step (beyond each request's own hits), in any group: a new
    request may hit one that another request fills in this same step (vLLM caches a block once the
    tokens filling it are scheduled)."""
    cached = so.scheduled_cached_reqs
    written = {b for new in so.scheduled_new_reqs for group in new.block_ids
               for b in group[new.num_computed_tokens // block_size:]}
    for i, blocks in enumerate(cached.new_block_ids):
        if blocks is not None:
            resumed = cached.req_ids[i] in cached.resumed_req_ids
            for group in blocks:
                written.update(group[cached.num_computed_tokens[i] // block_size if resumed else 0:])
    return written


def _apply(kv: KVSpace, so) -> None:
    """``kv`` is the first KV cache group's space; ``kv.family`` holds every group's, in vLLM's group order
    (the scheduler's block ids come as one list per group)."""
    spaces = kv.family
    for space in spaces:
        for req_id in so.finished_req_ids:
            space.remove_request(req_id)
        for req_id in so.preempted_req_ids or ():
            space.remove_request(req_id, preempted=True)
    if so.new_block_ids_to_zero:  # physical ids: one block -> chunk map for all groups
        kv.zero_blocks(so.new_block_ids_to_zero)
        so.new_block_ids_to_zero = None  # done on the physical chunks; the runner would index virtual ids
    if so.kv_cache_block_copies:
        kv.copy_blocks([(c.src_block_id, c.dst_block_id) for c in so.kv_cache_block_copies])
        so.kv_cache_block_copies = None
    scheduled = so.num_scheduled_tokens
    cached = so.scheduled_cached_reqs
    # only a new or resumed request's prefix hits can land on a block filled in this step
    written = _handed_out_this_step(so, kv.block_size) if so.scheduled_new_reqs or cached.resumed_req_ids else ()
    # a sliding window's space unmaps what each request's window has left as it goes, request by request (the
    # memory the scheduler counted as freed comes back before the next request maps); the others learn every
    # request's token count at once (a decode step of a hundred requests spent most of its update time there)
    windowed = [space for space in spaces if space.sliding_window is not None]
    tokens: dict[str, int] = {}  # KV tokens after this step: computed plus scheduled
    for new in so.scheduled_new_reqs:
        new.block_ids = tuple(space.add_request(new.req_id, blocks, new.num_computed_tokens, written)
                              for space, blocks in zip(spaces, new.block_ids, strict=True))
        tokens[new.req_id] = n = new.num_computed_tokens + scheduled.get(new.req_id, 0)
        for space in windowed:
            space.note_tokens(new.req_id, n)
            space.slide(new.req_id, new.num_computed_tokens)
    resumed, computed = cached.resumed_req_ids, cached.num_computed_tokens
    for i, req_id in enumerate(cached.req_ids):
        new_blocks = cached.new_block_ids[i]
        if req_id in resumed:
            cached.new_block_ids[i] = tuple(space.add_request(req_id, blocks, computed[i], written)
                                            for space, blocks in zip(spaces, new_blocks, strict=True))
        elif new_blocks is not None:
            cached.new_block_ids[i] = tuple(space.append_blocks(req_id, blocks)
                                            for space, blocks in zip(spaces, new_blocks, strict=True))
        tokens[req_id] = n = computed[i] + scheduled.get(req_id, 0)
        for space in windowed:
            space.note_tokens(req_id, n)
            space.slide(req_id, computed[i])
    for space in spaces:
        if space.sliding_window is None:
            space.note_tokens_of(tokens)
    kv.expect_growth(scheduled)  # blocks the next step will likely need (every group's), made while this one computes
