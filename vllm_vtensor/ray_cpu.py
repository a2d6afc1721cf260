"""vLLM's Ray executor on CPUs (``--distributed-executor-backend ray``).

vLLM 0.32 places each Ray worker in a placement-group bundle holding one accelerator and asks Ray
for that accelerator's ids; its CPU platform names no accelerator, so a CPU engine under Ray stops
with "current platform cpu does not support ray". On a CPU node a worker's device is a share of the
node's cores: bundles of one Ray ``CPU`` each (what vLLM's placement group asks for once the CPU
platform names ``CPU`` as its Ray device), and a worker that holds no device ids. vLLM's CPU worker
then binds its threads by its rank on the node, as under the ``mp`` executor.

Imported by the patch ``cpu-ray-executor`` (``vllm_vtensor.patches``) in the engine core, and by
Ray in each worker actor (the actor class is pickled by reference to this module).
"""
from __future__ import annotations

import os

import ray
import torch
from vllm.v1.executor.ray_executor_v2 import RayWorkerProc

RAY_DEVICE_KEY = "CPU"  # Ray's own resource: a bundle of one CPU per worker


class CpuRayWorkerProc(RayWorkerProc):
    """vLLM's Ray worker on a CPU node: it holds no accelerator, so it reports no device ids."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), []

    def initialize_worker(self, local_rank: int, env_vars: dict[str, str], distributed_init_method: str,
                          driver_env_vars: dict[str, str] | None = None,
                          assigned_physical_gpu_ids: list[int] | None = None) -> None:
        for key, value in (driver_env_vars or {}).items():  # as vLLM's: node-local values win
            os.environ.setdefault(key, value)
        os.environ.update(env_vars)
        bind_threads(self._init_kwargs["vllm_config"], local_rank)
        super().initialize_worker(local_rank, env_vars, distributed_init_method, driver_env_vars,
                                  assigned_physical_gpu_ids)


def bind_threads(vllm_config, local_rank: int) -> list[int]:
    """Give this worker the cores vLLM's ``mp`` executor would give the worker of that rank on its node
    (``VLLM_CPU_OMP_THREADS_BIND``: a list per rank, or ``auto``: a NUMA node each), as the process's CPU
    affinity and compute threads; Ray starts actors with one OpenMP thread. Returns the cores ([]: left as
    they are, with ``nobind`` or where the binding names no list for this rank)."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    manager = OMPProcessManager(vllm_config)
    if manager.skip_setup or local_rank >= len(manager.cpu_lists):
        return []
    cores = manager.cpu_lists[local_rank]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    return cores


def actor_resource_kwargs() -> dict:
    """Ray options of a CPU worker actor: its bundle reserves its CPU, so the actor asks for nothing
    more (vLLM's default asks for a custom resource named after the device, which Ray forbids for CPU)."""
    return {}
