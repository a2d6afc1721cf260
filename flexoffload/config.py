"""FlexInfer options, from ``--model-loader-extra-config`` (one frozen dataclass, validated once)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from vllm_vtensor import settings
from vllm_vtensor.settings import parse_bytes

POLICIES = ("flexinfer", "attention_first", "ffn_first", "no_balance")
IO_ENGINES = ("auto", "aio", "threads")  # auto: glibc's AIO on a CPU, reader threads on a GPU
GEMVS = ("auto", "onednn", "linear", "mv")  # one-token GEMMs on streamed CPU weights (loader.GEMV_PATHS)
BASELINES = ("mmap",)  # every layer tensor a view of the mmap'd store: the OS pages it in and out (llama.cpp's way)


class FlexConfigError(ValueError):
    """A bad ``model_loader_extra_config``; the message names the fix."""


@dataclass(frozen=True)
class FlexConfig:
    # "1.5GiB", "800MB", bytes, a fraction (0, 1] of the weight bytes, or "auto" (what is free: flexoffload.memory)
    memory_budget: str | int | float
    # layers read ahead of the one computing (0: synchronous reads); None: 3, or fewer where the
    # budget cannot hold that many layer buffers
    prefetch_window: int | None = None
    io_threads: int = 2  # reads in flight at once (reader threads)
    # how streamed reads run: "aio" (glibc's POSIX AIO: C reader threads, queued and checked by the
    # computing thread, no Python thread beside the model; CPU only), "threads" (a Python prefetch
    # thread and reader pool), "auto" (aio on a CPU where glibc provides it, threads on a GPU)
    io_engine: str = "auto"
    direct_io: bool = True  # O_DIRECT reads: no page cache, so streamed bytes do not count twice
    policy: str = "flexinfer"  # or an ablation: attention_first, ffn_first, no_balance; or the "mmap" baseline
    lock_memory: bool = True  # mlock resident weights and buffers where the limit allows
    cache_dir: str | None = None  # where the aligned weight store is written
    # streamed tensors kept in host memory instead of read from disk: a size, a fraction of the weight
    # bytes, or "auto" (the free host memory less a margin); None: "auto" on CUDA, 0 on a CPU (there
    # the host is the device, and memory_budget already covers it)
    host_budget: str | int | float | None = None
    # how one-token GEMMs on streamed weights run on a CPU: "auto" (the fastest of the others, timed at load),
    # "onednn" (oneDNN's matmul), "linear" (PyTorch's F.linear), "mv" (torch.mv)
    gemv: str = "auto"
    # a mixture of experts on a CPU: read the next MoE layer's likely experts (its router applied to this
    # layer's input) while this layer computes
    expert_prefetch: bool = True
    # a mixture of experts on a CPU: read experts from a copy of them packed for vLLM's kernel (made once,
    # beside the weight store) straight into their slots, instead of packing each one as it is read
    packed_experts: bool = True

    @classmethod
    def from_extra(cls, extra: dict | None) -> "FlexConfig":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise FlexConfigError(f"unknown flexinfer option(s) {unknown}; valid options: {sorted(known)}")
        if "memory_budget" not in extra:
            raise FlexConfigError('flexinfer needs a memory budget: --model-loader-extra-config \'{"memory_budget": "1GiB"}\'')
        cfg = cls(**extra)
        if (cfg.prefetch_window is not None and cfg.prefetch_window < 0) or cfg.io_threads < 1:
            raise FlexConfigError("prefetch_window must be >= 0 and io_threads >= 1")
        if cfg.io_engine not in IO_ENGINES:
            raise FlexConfigError(f"io_engine {cfg.io_engine!r} is not one of {IO_ENGINES}")
        if cfg.gemv not in GEMVS:
            raise FlexConfigError(f"gemv {cfg.gemv!r} is not one of {GEMVS}")
        if cfg.policy not in POLICIES + BASELINES:
            raise FlexConfigError(f"policy {cfg.policy!r} is not one of {POLICIES + BASELINES}")
        streaming_only = sorted(set(extra) & {"prefetch_window", "io_threads", "io_engine", "direct_io",
                                             "lock_memory", "gemv", "expert_prefetch",
                                             "packed_experts"})
        if cfg.policy == "mmap" and streaming_only:
            raise FlexConfigError(f"{streaming_only} apply to streamed weights; the mmap baseline (policy 'mmap') "
                                  "leaves paging to the OS: drop them, or pick a streaming policy")
        if not cfg.auto:
            cfg.budget_bytes(1)  # validates the budget's form
        if cfg.host_budget is not None and not _is_auto(cfg.host_budget):
            _size_or_fraction("host_budget", cfg.host_budget, 1, zero_ok=True)
        if cfg.policy == "mmap" and cfg.host_budget:
            raise FlexConfigError("host_budget applies to streamed weights; the mmap baseline (policy 'mmap') leaves "
                                  "paging to the OS: drop it, or pick a streaming policy")
        return cfg

    def host_budget_bytes(self, weight_bytes: int, free_host: int | None, device_type: str = "cpu") -> int:
        """The host tier's bytes. ``free_host``: free host memory (None: not checked); the host tier may not
        take more than that less a margin (it is pinned and never swapped)."""
        from .memory import margin_bytes

        value = self.host_budget
        if value is None:
            value = "auto" if device_type == "cuda" else 0
        spare = None if free_host is None else max(0, free_host - margin_bytes(free_host))
        if _is_auto(value):
            if spare is None:
                raise FlexConfigError("host_budget 'auto' is sized from the free host memory when the engine loads")
            return spare
        n = _size_or_fraction("host_budget", value, weight_bytes, zero_ok=True)
        if spare is not None and n > spare:
            raise FlexConfigError(f"host_budget {value!r} ({n / 2**20:.0f} MiB) is more than the host can spare "
                                  f"({spare / 2**20:.0f} MiB free after a margin): lower it, or use \"auto\"")
        return n

    @property
    def auto(self) -> bool:
        return isinstance(self.memory_budget, str) and self.memory_budget.strip().lower() == "auto"

    def budget_bytes(self, weight_bytes: int, room: int | None = None) -> int:
        """The budget in bytes for ``weight_bytes`` of weights; with ``"auto"``, the ``room`` the free
        memory leaves (all the weights when they fit)."""
        if self.auto:
            if room is None:
                raise FlexConfigError("memory_budget 'auto' is sized from the free memory when the engine loads")
            return min(weight_bytes, room)
        return _size_or_fraction("memory_budget", self.memory_budget, weight_bytes)

    def store_dir(self) -> Path:
        path = Path(self.cache_dir or settings.cache_dir()) / "flexinfer"
        path.mkdir(parents=True, exist_ok=True)
        return path


def check_load_config(load_config, model_config=None) -> None:
    """FlexInfer's options, the settings and the model, checked where vLLM makes the engine's configuration
    (the user's process: the ``engine-config-check`` patch), so a bad option stops ``LLM(...)`` or ``vllm
    serve`` at once instead of after the engine has started; budgets that need the model's weights or the
    free memory are checked when the loader runs."""
    FlexConfig.from_extra(load_config.model_loader_extra_config)
    settings.check_all()
    if model_config is not None:
        check_model(model_config)


def check_model(model_config) -> None:
    """Refuse, naming the fix, a model whose weights FlexInfer cannot stream: a multimodal model (its
    decoder is not ``model.model.layers``), quantized weights (vLLM converts them after loading, from
    whole tensors, which a streamed tensor never is) and, off CPUs, a mixture of experts (on a CPU its
    experts are read on demand into slots of vLLM's packed layout: flexoffload.experts)."""
    from vllm.platforms import current_platform

    arch = ", ".join(getattr(model_config.hf_config, "architectures", None) or [model_config.model])
    refusal = refusal_for(arch, model_config.quantization, model_config.get_num_experts(),
                          model_config.is_multimodal_model, experts_in_slots=current_platform.is_cpu())
    if refusal:
        raise FlexConfigError(refusal)


def refusal_for(arch: str, quantization: str | None, experts: int, multimodal: bool = False,
                experts_in_slots: bool = False) -> str | None:
    """Why FlexInfer will not stream this model, with the fix, or None (for :func:`check_model` and
    ``python -m flexoffload.plan``).  ``experts_in_slots``: a mixture of experts runs with its experts
    read on demand into slots (flexoffload.experts: vLLM's CPU MoE kernel)."""
    if multimodal:
        return (f"--load-format flexinfer streams text decoders whose layers are model.model.layers; {arch} is "
                "multimodal (its decoder is nested under language_model), which it does not stream: load it "
                "without --load-format flexinfer")
    if quantization:
        return (f"--load-format flexinfer streams unquantized weights (float32, bfloat16, float16); this model's "
                f"weights are quantized ({quantization}), which it does not stream: load it without "
                "--load-format flexinfer, or use an unquantized checkpoint")
    if experts and not experts_in_slots:
        return (f"{arch} is a mixture of experts ({experts} experts per layer): --load-format flexinfer reads "
                "experts on demand only on CPUs (vLLM's CPU MoE kernel): run it on a CPU, or load it without "
                "--load-format flexinfer")
    return None


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _size_or_fraction(option: str, b, weight_bytes: int, zero_ok: bool = False) -> int:
    """Bytes of ``b``: a fraction (0, 1] of ``weight_bytes`` (or 0-100%), bytes, or a size ("1.5GiB")."""
    if isinstance(b, float) or (isinstance(b, str) and b.strip().endswith("%")):
        frac = float(str(b).strip().rstrip("%")) / (100 if str(b).strip().endswith("%") else 1)
        if not (0 <= frac if zero_ok else 0 < frac) or frac > 1:
            raise FlexConfigError(f"{option} fraction {b!r} must be in {'[0' if zero_ok else '(0'}, 1] (or 0-100%)")
        return int(frac * weight_bytes)
    try:
        n = parse_bytes(b)
    except ValueError as e:
        raise FlexConfigError(f"{option} {b!r}: {e}") from e
    if n < 0 or (n == 0 and not zero_ok):
        raise FlexConfigError(f"{option} {b!r} must be {'>= 0' if zero_ok else 'positive'}")
    return n
