"""How much memory the weights may take when ``memory_budget`` is ``"auto"``.

Like llama.cpp's ``--fit``: the budget is what is free when the engine loads its weights, less the
KV cache vLLM will still allocate and a margin for activations and the runtime; when the whole
model fits, nothing streams.

* Free memory on a CPU: ``MemAvailable`` (``/proc/meminfo``), and, inside a cgroup with a memory
  limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), the limit less the cgroup's usage - the
  tightest of the process's cgroup and its ancestors.
* On CUDA: the device's free memory less the share ``--gpu-memory-utilization`` leaves to others.
* The KV cache: ``--kv-cache-memory-bytes`` (or ``VLLM_CPU_KVCACHE_SPACE``) when set; else room for
  one ``--max-model-len`` request, the least vLLM starts with (it sizes the KV cache from what the
  weights leave).
* A speculative-decoding draft model's weights (loaded whole by vLLM after the target's).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_vtensor.log import get_logger

logger = get_logger(__name__)

MIN_MARGIN = 256 << 20  # activations, vLLM's runtime, allocator slack
MARGIN_FRACTION = 0.05  # of the free memory, when that is more


@dataclass(frozen=True)
class AutoBudget:
    free_bytes: int  # free when the weights load
    kv_bytes: int  # kept for the KV cache
    margin_bytes: int  # kept for activations and the runtime
    where: str  # what limited the free memory ("MemAvailable", "cgroup /x", "cuda:0")
    draft_bytes: int = 0  # a speculative-decoding draft model's weights, loaded whole after the target's

    @property
    def room_bytes(self) -> int:
        return max(0, self.free_bytes - self.kv_bytes - self.margin_bytes - self.draft_bytes)

    def describe(self) -> str:
        mib = 1 << 20
        draft = f"draft model {self.draft_bytes / mib:.0f} MiB - " if self.draft_bytes else ""
        return (f"{self.free_bytes / mib:.0f} MiB free ({self.where}) - KV cache {self.kv_bytes / mib:.0f} MiB - "
                f"{draft}margin {self.margin_bytes / mib:.0f} MiB = {self.room_bytes / mib:.0f} MiB for weights")

    def as_dict(self) -> dict:
        return asdict(self) | {"room_bytes": self.room_bytes}


def mem_available(meminfo: str | Path = "/proc/meminfo") -> int:
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no MemAvailable in {meminfo}")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _inactive_file(stat: Path, key: str) -> int:
    """Reclaimable page cache counted in a cgroup's usage (``memory.stat``), as container tools subtract it."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_room(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup"
                ) -> tuple[int, str] | None:
    """``(limit - usage, the cgroup)`` of the tightest memory-limited cgroup this process is in (its own
    or an ancestor), or None without a limit. Usage less its inactive page cache (reclaimed before
    anything is killed); limits of 2**60 bytes or more count as none (cgroup v1's "unlimited")."""
    root = Path(root)
    best = None
    for line in Path(proc_cgroup).read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 (at the root, or under "unified" beside v1 controllers)
            base = root / "unified" if (root / "unified").is_dir() else root
            limit_file, usage_file, cache_key = "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # v1
            base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
            cache_key = "total_inactive_file"
        else:
            continue
        rel = Path(path.lstrip("/"))
        for folder in [rel, *rel.parents]:
            limit, usage = _read_int(base / folder / limit_file), _read_int(base / folder / usage_file)
            if limit is None or usage is None or limit >= 1 << 60:
                continue
            usage -= _inactive_file(base / folder / "memory.stat", cache_key)
            room = max(0, limit - usage)
            if best is None or room < best[0]:
                best = (room, f"cgroup /{folder}" if str(folder) != "." else "cgroup /")
    return best


def free_host_bytes() -> tuple[int, str]:
    free, where = mem_available(), "MemAvailable"
    limited = cgroup_room()
    if limited is not None and limited[0] < free:
        free, where = limited
    return free, where


def free_device_bytes(device, utilization: float) -> tuple[int, str]:
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - (1.0 - utilization) * total)), str(device)


def kv_reserve_bytes(vllm_config) -> int:
    """The KV cache vLLM will allocate after the weights: as set, else one max_model_len request's."""
    cache, model = vllm_config.cache_config, vllm_config.model_config
    if cache.kv_cache_memory_bytes:
        return int(cache.kv_cache_memory_bytes)
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, model)
    per_token = (model.get_num_layers(vllm_config.parallel_config)  # this rank's heads under tensor parallelism
                 * model.get_num_kv_heads(vllm_config.parallel_config) * model.get_head_size() * 2 * dtype.itemsize)
    return per_token * model.max_model_len


def margin_bytes(free: int) -> int:
    """What stays free of ``free`` bytes for activations, vLLM's runtime and allocator slack."""
    return max(MIN_MARGIN, int(free * MARGIN_FRACTION))


def budget_from(free: int, where: str, kv_bytes: int, draft_bytes: int = 0) -> AutoBudget:
    return AutoBudget(free_bytes=free, kv_bytes=kv_bytes, margin_bytes=margin_bytes(free), where=where,
                      draft_bytes=draft_bytes)


def draft_weight_bytes(vllm_config) -> int:
    """The weights of a speculative-decoding drafter with a checkpoint of its own (a draft model, an
    EAGLE head), in the dtype it runs in, from the checkpoint's safetensors headers; 0 without one.
    vLLM's loader loads a drafter whole beside the target (FlexInfer leaves the draft model to it: see
    ``FlexInferLoader.load_model``); a drafter that shares tensors with the target loads fewer, so this
    errs on the side of room. A drafter read from the target's own checkpoint (MTP layers) is not
    counted: the margin holds its few layers."""
    spec = vllm_config.speculative_config
    draft = getattr(spec, "draft_model_config", None) if spec is not None else None
    if draft is None:
        return 0
    if draft.model == vllm_config.model_config.model:
        logger.info("flexinfer: memory_budget auto does not count the %s drafter's layers (read from the target's "
                    "checkpoint); the margin holds them", spec.method)
        return 0
    from .plan import BudgetError, checkpoint_tensors

    try:
        folder = Path(draft.model)
        if not folder.is_dir():  # a hub id: the files vLLM is about to fetch for the draft anyway
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(draft.model, revision=draft.revision, allow_patterns=["*.safetensors"]))
        return sum(t.nbytes for t in checkpoint_tensors(folder, draft.dtype.itemsize))
    except (BudgetError, OSError, ValueError) as e:  # not counted: the margin has to hold it
        logger.warning("flexinfer: memory_budget auto cannot size the %s drafter %s (%s); it is not counted",
                       spec.method, draft.model, e)
        return 0


def host_share(vllm_config) -> int:
    """How many workers of one engine share this host's memory (tensor-parallel ranks on one node)."""
    return max(1, vllm_config.parallel_config.local_world_size)


def free_host_share(vllm_config) -> tuple[int, str]:
    """This worker's share of the free host memory: each of the engine's workers on the host loads at
    the same time, and each sizes its budgets from what is free."""
    free, where = free_host_bytes()
    share = host_share(vllm_config)
    return (free // share, f"{where} / {share} workers on this host") if share > 1 else (free, where)


def auto_budget(vllm_config, device) -> AutoBudget:
    if device.type == "cuda":
        free, where = free_device_bytes(device, vllm_config.cache_config.gpu_memory_utilization)
    else:
        free, where = free_host_share(vllm_config)
    return budget_from(free, where, kv_reserve_bytes(vllm_config), draft_weight_bytes(vllm_config))
