"""Every setting of vllm-vtensor and FlexInfer, in one table, and the only place they are read.

Environment variables (``VTENSOR_*``, ``FLEXOFFLOAD_*``) are read through :func:`get`, which parses
and checks each against its range and raises :class:`SettingError` naming the fix. FlexInfer's
loader options (``--model-loader-extra-config``) are parsed by :class:`flexoffload.config.FlexConfig`;
their names, defaults and meanings are listed here too (a test keeps the two in step), so that
``docs/user-guide/configuration.md`` - generated from :data:`SETTINGS` by
``python -m vllm_vtensor.settings --markdown`` and checked by a test - covers them all.

Sizes follow vLLM's rules (``--kv-cache-memory-bytes``): a single-letter suffix is binary in
capitals and decimal in lower case (``512M`` = 512 x 2^20, ``512m`` = 512 x 10^6); ``KiB``/``MiB``/``GiB``
are binary and ``KB``/``MB``/``GB`` decimal in any case.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class SettingError(ValueError):
    """A setting's value cannot be used; the message names the setting and the fix."""


_SINGLE = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_NAMED = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(value: int | str) -> int:
    """``4096``, ``"512M"`` (binary, as vLLM reads it), ``"512m"`` (decimal), ``"1.5GiB"``, ``"800MB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"cannot read {value!r} as a size")
    if isinstance(value, int):
        return value
    text = str(value).strip().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = text[len(num):]
    try:
        number = float(num)
    except ValueError:
        number = math.nan
    if unit in _SINGLE:
        mult = _SINGLE[unit]
    elif unit.lower() in _NAMED or unit == "":
        mult = _NAMED.get(unit.lower(), 1)
    else:
        mult = None
    if mult is None or math.isnan(number) or not math.isfinite(number):
        raise ValueError(f"cannot read {value!r} as a size: use bytes, or a number with K/M/G (binary, as vLLM "
                         "reads them), k/m/g (decimal), KiB/MiB/GiB or KB/MB/GB")
    return int(number * mult)


def _seconds(raw: str) -> float:
    return float(raw)


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError(raw)
    return raw == "1"


def _path(raw: str) -> str:
    return raw


def parse_core_list(raw: str) -> frozenset[int]:
    """Core ids as Linux and vLLM write them: ``2``, ``2-3,6``."""
    cores = set()
    for part in raw.split(","):
        first, _, last = part.strip().partition("-")
        lo, hi = int(first), int(last or first)
        if lo < 0 or hi < lo:
            raise ValueError(raw)
        cores.update(range(lo, hi + 1))
    return frozenset(cores)


def _auto_or_int(raw: str) -> str | int:
    return "auto" if raw == "auto" else int(raw)


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "env" or "flexinfer option"
    type: str  # as the docs show it
    default: Any  # None: unset (see ``default_text``)
    meaning: str
    parse: Callable[[str], Any] | None = None  # env only
    check: Callable[[Any], bool] | None = None  # the accepted range
    fix: str = ""  # what to give instead, for the error
    default_text: str | None = None  # the default as the docs show it, where it is not a plain value

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        return "unset" if self.default is None else f"`{self.default}`"


MAX_LINGER_S = 3600.0
ENGINE_POLL_AUTO_US = 200  # VTENSOR_ENGINE_POLL_US=auto with FlexInfer: <= ~0.3 ms per step, against 100+ ms steps
POOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a shared KV pool's name (VTENSOR_POOL), also its file's
SETTINGS: tuple[Setting, ...] = (
    # -- VTENSOR (the KV cache): read by the worker at start-up --------------------------------------
    Setting("VTENSOR_ATTENTION", "env", "choice", None,
            "The attention kernel VTENSOR runs over its contiguous KV ranges. On a CPU: `cpu` (vLLM's CPU "
            "kernel, default), `triton` (this project's Triton kernels; only under `TRITON_INTERPRET=1`, for "
            "testing) or `reference` (a torch reference). On CUDA: `triton` (this project's kernels, default) or "
            "`vllm` (vLLM's Triton kernel over the same memory).",
            parse=str, check=lambda v: v in ("cpu", "triton", "reference", "vllm"),
            fix="give cpu, triton or reference on a CPU, triton or vllm on CUDA",
            default_text="`cpu` on a CPU, `triton` on CUDA"),
    Setting("VTENSOR_CHUNK_LINGER_S", "env", "seconds", 1.0,
            "How long freed KV memory is kept for reuse before it is given back to the system (0: at once).",
            parse=_seconds, check=lambda v: 0 <= v <= MAX_LINGER_S,
            fix=f"give seconds from 0 (freed memory goes back at once) to {MAX_LINGER_S:.0f}"),
    Setting("VTENSOR_IDLE_RELEASE_S", "env", "seconds", None,
            "When the engine has had no request for this long, vLLM's prefix cache is reset and VTENSOR gives the "
            "memory of the blocks it kept back (as `LLM.reset_prefix_cache()` does): an idle engine then holds only "
            "the small reserve (`VTENSOR_PRECREATE_BYTES`). The next requests compute their prefixes anew. Unset: "
            "cached blocks stay until vLLM evicts them or the cache is reset.",
            parse=_seconds, check=lambda v: 0 < v <= MAX_LINGER_S,
            fix=f"give seconds above 0 (up to {MAX_LINGER_S:.0f}), or leave it unset to keep the prefix cache",
            default_text="unset"),
    Setting("VTENSOR_PRECREATE_BYTES", "env", "size", 4 << 20,
            "KV memory kept created and ready by a background thread, so new blocks do not wait for it; 0 turns "
            "creating memory ahead off (the reserve and the next step's expected growth alike).",
            parse=parse_bytes, check=lambda v: v >= 0, fix="give a size such as 8M or 8MiB, or 0 for no reserve",
            default_text="`4MiB`"),
    Setting("VTENSOR_STATS_FILE", "env", "path", None,
            "Where the worker writes VTENSOR's KV figures as JSON (read by the API server's `/metrics` and by "
            "benchmarks). Its folder must exist.",
            parse=_path, check=lambda v: Path(v).parent.is_dir(),
            fix="name a file in an existing folder (the folder is not created)",
            default_text="`stats-<pid>/stats.json` in a private folder of the temporary folder "
                         "(`vllm-vtensor-<uid>`, mode 0700), removed when the server exits"),
    Setting("VTENSOR_POOL", "env", "name", None,
            "Engines started with the same pool name on one device share one physical KV pool of "
            "`VTENSOR_POOL_BYTES`: each commits memory as its requests grow and gives it back when they end, idle "
            "engines give theirs back when another needs it, and none is refused memory the pool still has. Each "
            "engine's own ceiling stays vLLM's (`--kv-cache-memory-bytes`); the ceilings may sum past the pool. "
            "One worker per engine (tensor parallel size 1). Unset: the engine has its KV budget to itself.",
            parse=str, check=lambda v: bool(POOL_NAME.fullmatch(v)),
            fix="give 1-64 letters, digits, '.', '_' or '-'"),
    Setting("VTENSOR_POOL_BYTES", "env", "size", None,
            "The size of the shared KV pool `VTENSOR_POOL` names, set by the engine that creates it (a later "
            "engine that names another size while the pool is in use is refused; unset, it joins the pool as is).",
            parse=parse_bytes, check=lambda v: v > 0, fix="give a size such as 8GiB"),
    Setting("VTENSOR_DEFERRED_UNMAP", "env", "0 or 1", False,
            "Experimental, CUDA only: a finished or preempted request's range is unmapped by a helper thread "
            "once the GPU has finished the work that may still read it, instead of synchronizing the device in "
            "the step that finishes it (which stalls vLLM's async scheduling); the KV space gets a quarter more "
            "slots (at least 4) for ranges waiting for it, so a request starting as another finishes does not "
            "wait either. Tested on CPU with a lagging device; not yet measured on a GPU.",
            parse=_flag, fix="give 1 to unmap finished requests beside the compute, or 0", default_text="`0`"),
    Setting("VTENSOR_MAP_AHEAD", "env", "0 or 1", False,
            "Experimental: a decoding request's next chunk is mapped at its next block's place by a helper thread "
            "while the steps before it compute (from half a block before the boundary), so the step that gets the "
            "block maps nothing; only chunks already made are used, never while fewer chunks are free than "
            "requests run, and one is taken back when a step needs its memory for a block. Full-attention layers; "
            "not with `VTENSOR_ASYNC_MAPPING`. Tested on CPU; not yet measured on a GPU.",
            parse=_flag, fix="give 1 to map decoding requests' next chunks ahead, or 0", default_text="`0`"),
    Setting("VTENSOR_STAGE_MAPPINGS", "env", "0 or 1", False,
            "Experimental, CPU only: keep each chunk's page tables filled beside the compute and map by moving "
            "them. Measured: mapping ~16 us instead of ~250 us per 2 MiB chunk, but no end-to-end gain on a "
            "2-core CPU (the helper competes with the compute).",
            parse=_flag, fix="give 1 to map by moving page tables, or 0", default_text="`0`"),
    Setting("VTENSOR_ASYNC_MAPPING", "env", "0 or 1", False,
            "Experimental, CPU only: run each step's memory operations in a helper thread while the forward pass "
            "starts. Measured slower than mapping before each step on a 2-core CPU.",
            parse=_flag, fix="give 1 to map beside the compute, or 0 to map before each step", default_text="`0`"),
    Setting("VTENSOR_HELPER_CORES", "env", "auto or a core list", "auto",
            "On a CPU, the cores the worker's helper threads run on (chunk pre-creation, the allocator's figures, "
            "the shared pool's reaper, FlexInfer's reads). `auto`: with vLLM's automatic binding "
            "(`VLLM_CPU_OMP_THREADS_BIND` unset or `auto`), the cores other than the worker's compute cores (vLLM "
            "keeps them for its other processes); with a binding of your own, the worker's compute cores (the "
            "other cores may be another engine's: a helper there waits behind that engine's compute while this "
            "worker waits for it). A list such as `2` or `2-3,6`: those cores.",
            parse=lambda raw: "auto" if raw == "auto" else parse_core_list(raw),
            check=lambda v: v == "auto" or (bool(v) and max(v) < (os.cpu_count() or 1)),
            fix=f"give auto or ids of this host's cores (0-{(os.cpu_count() or 1) - 1}) such as 1 or 0-1"),
    # -- the engine core ------------------------------------------------------------------------------
    Setting("VTENSOR_ENGINE_POLL_US", "env", "auto or microseconds", "auto",
            "On a CPU, how the engine core waits for its worker's reply while a step runs. vLLM's reader "
            "yields the CPU in a loop (`sched_yield`) for a second after each message, keeping a core busy for "
            "the whole forward pass; a number of microseconds makes it sleep that long between checks instead "
            "(a reply is seen at most that much later), for every engine on a CPU. `0`: vLLM's loop. `auto`: "
            f"{ENGINE_POLL_AUTO_US} when FlexInfer streams weights (`--load-format flexinfer`: its reader threads run on the core the "
            "loop takes), vLLM's loop otherwise. No effect on GPUs.",
            parse=_auto_or_int, check=lambda v: v == "auto" or 0 <= v <= 100_000,
            fix="give auto, 0 (vLLM's loop) or microseconds up to 100000"),
    # -- models and caches ----------------------------------------------------------------------------
    Setting("VTENSOR_CACHE", "env", "path", None,
            "Folder for converted models (`python -m vllm_vtensor.models`) and FlexInfer's weight stores.",
            parse=_path, default_text="`~/.cache/vllm-vtensor`"),
    Setting("VTENSOR_TOKENIZER", "env", "path", None,
            "A folder with SmolLM2's tokenizer files, used for the random-weight test models on machines that "
            "cannot fetch SmolLM2 itself.", parse=_path),
    # -- FlexInfer ------------------------------------------------------------------------------------
    Setting("FLEXOFFLOAD_STATS_FILE", "env", "path", None,
            "Where the FlexInfer loader writes its figures as JSON (plan, bytes streamed, I/O seconds, wait, load "
            "peak; read by the API server's `/metrics` and by benchmarks). Its folder must exist. Under tensor "
            "parallelism this is rank 0's; rank r of n writes `<name>.tp<r>of<n>.json` beside it.",
            parse=_path, check=lambda v: Path(v).parent.is_dir(),
            fix="name a file in an existing folder (the folder is not created)",
            default_text="`stats-<pid>/flexinfer.json` beside VTENSOR's default snapshot, removed when the "
                         "server exits"),
    Setting("memory_budget", "flexinfer option", "size, fraction or auto", None,
            "Required. The memory the model's weights may hold: bytes, a size (`\"1.5GiB\"`, `\"800M\"`), a "
            "fraction of the weights (`0.25`, `\"25%\"`), or `\"auto\"`: what is free when the engine loads (the "
            "tightest of MemAvailable and a cgroup limit on a CPU, the device's free memory on CUDA) less the KV "
            "cache, a speculative-decoding drafter's own weights (a draft model, an EAGLE head) and a margin of "
            "5% (at least 256 MiB); when the model fits, nothing streams.",
            default_text="required"),
    Setting("prefetch_window", "flexinfer option", "int >= 0", None,
            "Layers read ahead of the one computing (0: synchronous reads).",
            default_text="3, fewer where the budget cannot hold that many layer buffers"),
    Setting("io_threads", "flexinfer option", "int >= 1", 2,
            "Reader threads, and how many streamed tensors' (with `io_engine` threads: layers') reads may be in "
            "flight at once."),
    Setting("io_engine", "flexinfer option", "auto, aio or threads", "auto",
            "How streamed reads run. `aio`: glibc's POSIX AIO, on C reader threads started on the helper cores, "
            "queued and checked by the computing thread in its layer hooks (no Python thread beside the model to "
            "take the GIL from it; CPU only). `threads`: a Python prefetch thread and a pool of `io_threads` "
            "readers. `auto`: `aio` on a CPU where glibc provides it, `threads` on CUDA (its prefetch thread also "
            "issues the copies to the device)."),
    Setting("direct_io", "flexinfer option", "bool", True,
            "Read streamed tensors with `O_DIRECT` (no page cache, so streamed bytes do not count twice)."),
    Setting("policy", "flexinfer option", "choice", "flexinfer",
            "Which tensors stay resident: `flexinfer` (the paper's preservation order, balanced across layers), "
            "ablations `attention_first`, `ffn_first`, `no_balance`, or the `mmap` baseline (the OS pages weights "
            "in and out)."),
    Setting("lock_memory", "flexinfer option", "bool", True,
            "`mlock` resident weights and buffers where the limit allows (on CPUs, resident linear layers "
            "are repacked by vLLM's oneDNN path, whose copies are not locked; they are anonymous memory, "
            "which a cgroup limit does not evict without swap)."),
    Setting("cache_dir", "flexinfer option", "path", None,
            "Where the aligned weight store is written.", default_text="`$VTENSOR_CACHE/flexinfer`"),
    Setting("host_budget", "flexinfer option", "size, fraction or auto", None,
            "Host memory that keeps streamed tensors (read from the weight store once, mlocked), so they are "
            "copied into the stream arena instead of read from disk every forward pass: a size, a fraction of the "
            "weights, or `\"auto\"` (the free host memory less a margin). More than the host can spare is refused.",
            default_text="`auto` on CUDA; 0 on a CPU (the host is the device: `memory_budget` covers it)"),
    Setting("gemv", "flexinfer option", "auto, onednn, linear or mv", "auto",
            "On a CPU, how a decode step at batch 1 multiplies the token by a streamed weight: oneDNN's matmul "
            "(`onednn`), PyTorch's `F.linear` (`linear`) or `torch.mv` (`mv`). `auto`: each is timed at load "
            "over weights of a streamed tensor's shape in the stream arena's memory, and oneDNN's is kept unless "
            "another is more than 10% faster (which wins differs by CPU and dtype)."),
    Setting("expert_prefetch", "flexinfer option", "bool", True,
            "A mixture of experts on a CPU: once an MoE layer's experts are in their slots, apply the next MoE "
            "layer's router to this layer's input and start reading the experts it picks that are not in the "
            "next layer's slots, while this layer computes (one more staging buffer of a layer's top-k experts). "
            "The snapshot's `experts` counts the reads ahead (`ahead`) and those the router then picked "
            "(`ahead_used`)."),
    Setting("packed_experts", "flexinfer option", "bool", True,
            "A mixture of experts on a CPU: read each expert from a copy of the experts already packed for vLLM's "
            "MoE kernel straight into its slot, instead of packing it after each read (packing an expert took as "
            "long as reading it from memory twice). The copy is made once, at the first start, beside the weight "
            "store (as large as the experts; used where no expert is padded and each is whole pages, else experts "
            "are packed as read)."),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def get(name: str):
    """The value of the environment setting ``name``: parsed, checked, or its default when unset."""
    s = SETTINGS_BY_NAME[name]
    if s.kind != "env":
        raise KeyError(f"{name} is a FlexInfer option, read from --model-loader-extra-config")
    raw = os.environ.get(name, "")
    return parse_env(name, raw) if raw else s.default


def parse_env(name: str, raw: str):
    """``raw`` read as the environment setting ``name`` would be: parsed and checked (SettingError names the fix)."""
    s = SETTINGS_BY_NAME.get(name)
    if s is None or s.kind != "env":
        raise SettingError(f"{name} is not an environment setting of this plugin: see docs/user-guide/configuration.md")
    try:
        value = s.parse(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} cannot be read as {s.type}: {s.fix or 'see docs/user-guide/configuration.md'}") from None
    if s.check is not None and not s.check(value):
        raise SettingError(f"{name}={raw!r} is out of range: {s.fix}")
    return value


def raw(name: str) -> str | None:
    """``$name`` as set, unchecked: for a hot path whose setting :func:`check_all` checked at start-up."""
    assert SETTINGS_BY_NAME[name].kind == "env", name
    return os.environ.get(name) or None


def check_all() -> None:
    """Read every environment setting once (at start-up), so a bad value stops the engine with its fix."""
    for s in SETTINGS:
        if s.kind == "env":
            get(s.name)


RAY_COPY = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
PER_HOST = ("VTENSOR_STATS_FILE",)  # a path each host's process tree chooses for itself


def carry_to_ray_workers() -> None:
    """vLLM's Ray executor copies to its workers only the environment variables it knows of, and those
    named in ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY``: name this plugin's there (not the per-host ones)."""
    names = [n for n in os.environ.get(RAY_COPY, "").split(",") if n.strip()]
    names += [s.name for s in SETTINGS if s.kind == "env" and s.name not in PER_HOST]
    os.environ[RAY_COPY] = ",".join(dict.fromkeys(n.strip() for n in names))


def cache_dir() -> Path:
    return Path(get("VTENSOR_CACHE") or Path.home() / ".cache" / "vllm-vtensor")




def markdown_table() -> str:
    rows = ["| name | where | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        where = "environment" if s.kind == "env" else "`--model-loader-extra-config`"
        rows.append(f"| `{s.name}` | {where} | {s.type} | {s.shown_default()} | {s.meaning} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_vtensor.settings", description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the settings table as Markdown")
    args = p.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    for s in SETTINGS:
        if s.kind == "env":
            try:
                value = get(s.name)
            except SettingError as e:
                value = f"ERROR: {e}"
            print(f"{s.name} = {value!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
