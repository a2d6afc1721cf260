"""Shared fixtures: the real model, a tiny model, and one vLLM engine per session."""
from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET once, early (importing vLLM is enough): set it before any test module
# is collected, so the kernel tests run under the interpreter whatever was imported first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _bind_engines_to_this_workers_core() -> None:
    """Under pytest-xdist, the engines each worker starts compute on a core of their own.

    vLLM's CPU worker binds its OpenMP threads by ``VLLM_CPU_OMP_THREADS_BIND``; its default, ``auto``,
    gives one engine the first core of a NUMA node and leaves the rest to the engine core and the front end,
    so two engines started at once (one per test worker) both compute on core 0 and each runs at half speed
    (measured: 8 requests x 96 tokens in 32.5 s each, 16 s each with one core apiece). Worker ``gwN`` of K
    gets the N-th of K equal shares of the cores this process may use (one core each on two cores); a value
    set outside the suite, and tests that set their own (tensor parallel: a core per rank), win."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if torch.cuda.is_available() or not worker.startswith("gw") or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    first = int(worker[2:]) * share % len(cores)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores[first:first + share]))


_bind_engines_to_this_workers_core()

from vllm_vtensor.models import build_smollm2, build_tiny_llama


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With ``$VTENSOR_OUTCOMES`` naming a file, each failure's report is appended to it as it happens,
    each passed test gets one line (a GPU run may be cut off by its time limit before pytest
    prints its summary), and so does each setup or teardown of a second or more."""
    path = os.environ.get("VTENSOR_OUTCOMES")
    if path and report.passed and report.when == "call":
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} PASSED in {report.duration:.1f} s\n")
    if path and report.passed and report.when in ("setup", "teardown") and report.duration >= 1:
        with open(path, "a") as f:  # where shared engines start and stop: what a file costs beyond its tests
            f.write(f"== {report.nodeid} {report.when} in {report.duration:.1f} s\n")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} ({report.when}) FAILED\n{report.longreprtext}\n")
            for name, text in (("stdout", report.capstdout), ("stderr", report.capstderr)):
                if text:  # the engine processes' own errors land here
                    f.write(f"-- captured {name} (last 6000 characters)\n{text[-6000:]}\n")
            f.write("\n")


@pytest.fixture(scope="session")
def smollm2_path():
    return str(build_smollm2())


@pytest.fixture(scope="session")
def tiny_llama_path():
    return str(build_tiny_llama())


@pytest.fixture(scope="session")
def sliding_window_llama_path():
    return str(build_tiny_llama(sliding_window=64))


@pytest.fixture(scope="session")
def vanilla_llm(smollm2_path):
    """One vanilla vLLM engine on SmolLM2 (float32, eager), shared by all tests."""
    from vllm import LLM

    llm = LLM(
        model=smollm2_path,
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        seed=0,
    )
    yield llm
    del llm
