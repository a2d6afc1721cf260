"""Entry point ``vllm.stat_logger_plugins: flexinfer``: FlexInfer's streaming figures in ``/metrics``.

The loader writes its figures as JSON (``FLEXOFFLOAD_STATS_FILE``, one file per tensor-parallel rank,
see :func:`flexoffload.loader.rank_path`): the plan when the model is loaded, the running totals after
forward passes.  The API server reads them at scrape time, each rank's under the label ``tp_rank``.
"""
from __future__ import annotations

import re

from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_vtensor import settings
from vllm_vtensor.metrics import ScrapeCache

from .loader import STATS_ENV, read_stats, rank_path

# name -> (snapshot key, help). Gauges: the plan, fixed when the model is loaded, and the overlap.
GAUGES = {
    "vllm_flexinfer_budget_bytes": ("budget_bytes", "The memory the weights may hold (memory_budget, resolved)"),
    "vllm_flexinfer_weight_bytes": ("weight_bytes", "The model's weights, as planned (4096-aligned tensors)"),
    "vllm_flexinfer_resident_bytes": ("resident_bytes", "Weights kept resident"),
    "vllm_flexinfer_arena_bytes": ("arena_bytes", "Buffers that streamed weights are read into"),
    "vllm_flexinfer_host_bytes": ("host_bytes", "Streamed weights kept in host memory (the host tier)"),
    "vllm_flexinfer_streamed_bytes_per_forward": ("streamed_bytes_per_forward",
                                                  "Weight bytes streamed per forward pass (disk and host tier)"),
    "vllm_flexinfer_overlap": ("overlap", "Share of the time weight reads were in flight that forward passes did "
                               "not wait for them"),
}
# Counters: running totals since the model was loaded (Prometheus adds the _total suffix)
COUNTERS = {
    "vllm_flexinfer_forwards": ("forwards", "Forward passes that streamed weights"),
    "vllm_flexinfer_disk_read_bytes": ("bytes_streamed", "Weight bytes read from the weight store on disk"),
    "vllm_flexinfer_host_copied_bytes": ("bytes_from_host", "Weight bytes copied from the host tier"),
    "vllm_flexinfer_io_seconds": ("io_seconds", "Time during which weight reads were in flight"),
    "vllm_flexinfer_wait_seconds": ("wait_seconds", "Time forward passes waited for weight reads"),
}


def snapshots(path: str | None) -> dict[str, dict]:
    """Each tensor-parallel rank's snapshot, by rank: rank 0's (the named file) says how many ranks
    there are (its ``shard``, ``tp0of<n>``; none without tensor parallelism), whose files are read
    beside it (:func:`~flexoffload.loader.rank_path`). A file missing or being replaced is left out."""
    first = read_stats(path) if path else {}
    if not first:
        return {}
    found = re.fullmatch(r"tp0of(\d+)", first.get("shard") or "")
    out = {"0": first}
    for rank in range(1, int(found.group(1)) if found else 1):
        snap = read_stats(rank_path(path, f"tp{rank}of{found.group(1)}"))
        if snap:
            out[str(rank)] = snap
    return out


_read_cached = ScrapeCache(lambda: snapshots(settings.get(STATS_ENV)))


class _Collector:
    """Reads the loader's snapshots at scrape time and reports them, per rank."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ranks = _read_cached()
        for table, family in ((GAUGES, GaugeMetricFamily), (COUNTERS, CounterMetricFamily)):
            for name, (key, doc) in table.items():
                metric = family(name, doc, labels=["tp_rank"])
                for rank, snap in ranks.items():
                    if snap.get(key) is not None:
                        metric.add_metric([rank], float(snap[key]))
                yield metric


_collector = None


def is_flexinfer(vllm_config) -> bool:
    load_format = getattr(getattr(vllm_config, "load_config", None), "load_format", None)
    return str(load_format).lower() == "flexinfer"


class FlexInferStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        global _collector
        if is_flexinfer(vllm_config) and _collector is None:
            from prometheus_client import REGISTRY

            _collector = _Collector()
            REGISTRY.register(_collector)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        pass  # figures are read from the loader's snapshots at scrape time

    def log_engine_initialized(self):
        pass  # the worker logs FlexInfer's figures itself (every 10 s)
