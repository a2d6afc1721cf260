"""Monkeypatches: one table, each with its reason and an upstream diff that applies cleanly to
the installed vLLM; applying is idempotent; a different vLLM version is refused, not skipped."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vllm_vtensor import patches

ROOT = Path(__file__).resolve().parents[1]
DIFFS = sorted((ROOT / "patches").glob("*.diff"))


def test_every_patch_names_an_existing_diff_and_a_reason():
    assert len(patches.PATCHES) == 13
    for p in patches.PATCHES:
        assert (ROOT / "patches" / p.upstream).is_file(), p.upstream
        assert len(p.why) > 40 and ":" in p.target


@pytest.mark.parametrize("diff", DIFFS, ids=[d.name for d in DIFFS])
def test_upstream_diff_applies_cleanly_to_installed_vllm(diff, tmp_path):
    import vllm

    site = Path(vllm.__file__).resolve().parents[1]
    for rel in re.findall(r"^--- a/(\S+)", diff.read_text(), re.M):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / rel, tmp_path / rel)
    run = subprocess.run(["git", "apply", "--check", "-p1", str(diff)], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    subprocess.run(["git", "apply", "-p1", str(diff)], cwd=tmp_path, check=True)
    for rel in re.findall(r"^\+\+\+ b/(\S+)", diff.read_text(), re.M):
        compile((tmp_path / rel).read_text(), rel, "exec")  # the patched file is valid Python


def test_apply_all_is_idempotent_and_marks_targets():
    patches.apply_all()
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    first = GPUModelRunner._update_states
    patches.apply_all()
    assert GPUModelRunner._update_states is first
    assert patches._is_ours(first) and patches._is_ours(CpuPlatform.get_attn_backend_cls.__func__)


def test_backend_member_pickles_across_processes():
    import pickle

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    patches.apply_all()
    member = AttentionBackendEnum["VTENSOR"]
    fn, args = member.__reduce_ex__(4)
    assert fn is patches.restore_backend_member and args == ("VTENSOR",)
    assert pickle.loads(pickle.dumps(member)) is member
    assert pickle.loads(pickle.dumps(AttentionBackendEnum.CPU_ATTN)) is AttentionBackendEnum.CPU_ATTN


def test_another_vllm_version_is_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(patches.PatchError, match="install vllm==0.32.0"):
        patches.check_version()


def test_vtensor_runs_with_the_v1_model_runner(monkeypatch):
    """On CUDA vLLM would pick its V2 runner, which never calls VTENSOR's hooks: VTENSOR gets V1,
    and an explicit VLLM_USE_V2_MODEL_RUNNER=1 is refused naming the fix."""
    from types import SimpleNamespace

    from vllm.config.vllm import VllmConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_vtensor.worker import VTensorConfigError

    patches.apply_all()
    cfg = SimpleNamespace(attention_config=SimpleNamespace(backend=AttentionBackendEnum["VTENSOR"]))
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    assert VllmConfig.use_v2_model_runner.fget(cfg) is False
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(VTensorConfigError, match="unset VLLM_USE_V2_MODEL_RUNNER"):
        VllmConfig.use_v2_model_runner.fget(cfg)


def test_ray_executor_on_cpus():
    """On a CPU the Ray executor places each worker in a bundle of one Ray CPU and asks Ray for nothing
    more; its actors are the CPU worker class (no accelerator ids); the older executor is refused."""
    pytest.importorskip("ray", reason="Ray is in the test extra")
    patches.apply_all()
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_executor_v2 as v2
    from vllm.v1.executor.ray_executor import RayDistributedExecutor

    from vllm_vtensor.ray_cpu import CpuRayWorkerProc
    from vllm_vtensor.worker import VTensorConfigError

    assert CpuPlatform.ray_device_key == "CPU"
    assert v2.RayWorkerProc is CpuRayWorkerProc
    assert v2.RayExecutorV2._get_actor_resource_kwargs() == {}
    with pytest.raises(VTensorConfigError, match="unset VLLM_USE_RAY_V2_EXECUTOR_BACKEND"):
        RayDistributedExecutor._init_executor(object.__new__(RayDistributedExecutor))


@pytest.mark.parametrize("bind, rank, cores", [("0|1", 1, [1]), ("0,1|1", 0, [0, 1]), ("nobind", 0, [])])
def test_ray_cpu_worker_takes_the_cores_of_its_rank(monkeypatch, bind, rank, cores):
    """A Ray worker on a CPU binds to the cores vLLM's mp executor gives its rank (VLLM_CPU_OMP_THREADS_BIND)."""
    import os
    from types import SimpleNamespace

    import torch

    pytest.importorskip("ray", reason="Ray is in the test extra")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    from vllm_vtensor.ray_cpu import bind_threads

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    config = SimpleNamespace(parallel_config=SimpleNamespace(local_world_size=2, data_parallel_rank_local=None,
                                                             _api_process_count=1), kv_transfer_config=None)
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        assert bind_threads(config, rank) == cores
        assert os.sched_getaffinity(0) == (set(cores) or affinity)
        assert torch.get_num_threads() == (len(cores) or threads)
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
