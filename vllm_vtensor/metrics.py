"""Entry point ``vllm.stat_logger_plugins: vtensor``: allocator figures in ``/metrics`` and the log.

vLLM loads stat-logger plugins in the API server.  The figures come from the
worker's snapshot (:mod:`vllm_vtensor.stats`) and are read at scrape time, so
``/metrics`` is current even while the engine is idle.
"""
from __future__ import annotations

import time

from vllm.v1.metrics.loggers import StatLoggerBase

from . import stats
from .log import get_logger
from .worker import is_vtensor

logger = get_logger(__name__)

# name -> (snapshot key, help). Gauges: figures that go up and down (or stay).
GAUGES = {
    "vllm_vtensor_resident_bytes": ("resident_bytes", "Physical KV memory held by the vTensor allocator"),
    "vllm_vtensor_mapped_bytes": ("mapped_bytes", "Virtual KV bytes backed by physical chunks, over running requests"),
    "vllm_vtensor_shared_bytes": ("shared_bytes", "Physical KV bytes mapped into more than one request"),
    "vllm_vtensor_cached_bytes": ("cached_bytes", "Physical KV bytes held only for the prefix cache"),
    "vllm_vtensor_lingering_bytes": ("lingering_bytes", "Freed physical KV bytes kept briefly for reuse"),
    "vllm_vtensor_reserve_bytes": ("reserve_bytes", "Ready physical KV chunks kept for new blocks"),
    "vllm_vtensor_budget_bytes": ("budget_bytes", "Physical KV budget"),
    "vllm_vtensor_peak_resident_bytes": ("peak_resident_bytes", "The most physical KV memory held at once"),
    "vllm_vtensor_peak_live_tokens": ("peak_live_tokens", "The most tokens with KV written at once, over running requests"),
    "vllm_vtensor_block_size_tokens": ("block_size", "Tokens per KV block (one chunk holds a block of every layer)"),
    "vllm_vtensor_chunk_bytes": ("chunk_bytes", "Bytes of one physical chunk"),
    "vllm_vtensor_parked_bytes": ("parked_bytes", "KV bytes left mapped in finished requests' slots for reuse"),
    "vllm_vtensor_running_requests": ("running_requests", "Requests with a mapped KV range"),
    "vllm_vtensor_worker_rss_bytes": ("process_rss_bytes", "The worker process's RSS (counts a page once per "
                                      "mapping: shared prefixes count once per running request)"),
}
# read from the worker's /proc at scrape time (stats.process_pss_bytes), not from its snapshot
WORKER_PSS = ("vllm_vtensor_worker_pss_bytes", "The worker process's PSS (each page shared between processes divided "
              "among them)")
# Counters: running totals since the engine started (Prometheus adds the _total suffix)
COUNTERS = {
    "vllm_vtensor_prefix_hit_bytes": ("prefix_hit_bytes", "Cached-prefix bytes mapped into new requests"),
    "vllm_vtensor_copied_bytes": ("copied_bytes", "Bytes copied by copy-on-write of partial prefix hits"),
    "vllm_vtensor_slot_reuse_bytes": ("slot_reuse_bytes", "Prefix bytes new requests found already mapped in a reused slot"),
    "vllm_vtensor_map_operations": ("maps", "Chunk map operations"),
    "vllm_vtensor_unmap_operations": ("unmaps", "Chunk unmap operations"),
    "vllm_vtensor_preemptions": ("preemptions", "Requests unmapped by preemption"),
    "vllm_vtensor_chunks_created": ("chunks_created", "Physical chunks created on first use"),
    "vllm_vtensor_chunks_created_on_demand": ("chunks_created_on_demand",
                                              "Physical chunks created while a step waited (none was ready)"),
    "vllm_vtensor_chunks_mapped_ahead": ("mapped_ahead", "Decoding requests' next chunks mapped beside the compute "
                                         "and taken by the step that needed them (VTENSOR_MAP_AHEAD)"),
    "vllm_vtensor_step_seconds": ("step_seconds", "Worker time spent applying block decisions before steps "
                                  "(with async mapping: bookkeeping and queueing only)"),
    "vllm_vtensor_deferred_operations": ("deferred_ops", "Memory operations run beside the compute"),
    "vllm_vtensor_wait_seconds": ("wait_seconds", "Time KV access waited for the mapping done beside the compute"),
}

# Per shared KV pool (VTENSOR_POOL): read from the pool's ledger at scrape time
POOL_GAUGES = {
    "vllm_vtensor_pool_bytes": "Size of the shared KV pool this engine is on",
    "vllm_vtensor_pool_committed_bytes": "KV memory committed on the shared pool by all its engines",
    "vllm_vtensor_pool_engines": "Engines on the shared KV pool",
    "vllm_vtensor_pool_engine_committed_bytes": "KV memory this server's engine has committed on the shared pool",
    "vllm_vtensor_pool_engine_want_bytes": "KV memory this server's engine could not get from the pool in its last step",
}

class ScrapeCache:
    """``read()``'s value, read again at most every ``max_age`` seconds (one scrape asks for many figures)."""

    def __init__(self, read, max_age: float = 0.1):
        self._read, self._max_age = read, max_age
        self.clear()

    def clear(self) -> None:
        self._at, self._value = float("-inf"), None

    def __call__(self):
        now = time.monotonic()
        if now - self._at > self._max_age:
            self._at, self._value = now, self._read()
        return self._value


_gauges = None
_ledger = None  # the shared pool's ledger, opened at the first scrape that finds it


def _read_pool_view():
    """The shared pool's ledger view (None without VTENSOR_POOL or while the pool is unreadable)."""
    global _ledger
    try:
        if _ledger is None:
            from .shared_pool import open_from_settings

            _ledger = open_from_settings(None)
        return _ledger.view() if _ledger is not None else None
    except Exception:  # a scrape never fails for it: the pool gauges read 0
        logger.debug("vTensor: reading the shared pool failed", exc_info=True)
        return None


_pool_view = ScrapeCache(_read_pool_view)
_read_cached = ScrapeCache(stats.read)
_pss_cached = ScrapeCache(lambda: stats.process_pss_bytes(_read_cached() or {}), max_age=1.0)


class _Collector:
    """Reads the worker's snapshot at scrape time and reports it as gauges and counters."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = _read_cached() or {}
        for name, (key, doc) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=float(snap.get(key, 0)))
        yield GaugeMetricFamily(*WORKER_PSS, value=float(_pss_cached() or 0))
        for name, (key, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=float(snap.get(key, 0)))
        view = _pool_view()
        if view is not None:
            import os

            from .top import engines_of

            mine = engines_of(os.getpid(), view)
            values = [view.pool_bytes, view.committed, len(view.engines), sum(e.committed for e in mine),
                      sum(e.want for e in mine)]
            for (name, doc), value in zip(POOL_GAUGES.items(), values):
                yield GaugeMetricFamily(name, doc, value=float(value))


def _register_gauges() -> None:
    global _gauges
    if _gauges is not None:
        return
    from prometheus_client import REGISTRY

    _gauges = _Collector()
    REGISTRY.register(_gauges)


class VTensorStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        self.enabled = is_vtensor(vllm_config)
        if self.enabled:
            _register_gauges()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        pass  # figures are read from the worker's snapshot at scrape and log time

    def log_engine_initialized(self):
        self.log()

    def log(self):
        snap = stats.read() if self.enabled else None
        if snap is None:
            return
        mib = 1 << 20
        logger.info(
            "vTensor KV: resident %.1f MiB of %.1f MiB budget, mapped %.1f MiB for %d requests, shared %.1f MiB, "
            "cached %.1f MiB, prefix hits %.1f MiB mapped (%.1f MiB copied), %d maps / %d unmaps, %d preemptions",
            snap["resident_bytes"] / mib, snap["budget_bytes"] / mib, snap["mapped_bytes"] / mib,
            snap["running_requests"], snap["shared_bytes"] / mib, snap["cached_bytes"] / mib,
            snap["prefix_hit_bytes"] / mib, snap["copied_bytes"] / mib, snap["maps"], snap["unmaps"],
            snap["preemptions"],
        )
