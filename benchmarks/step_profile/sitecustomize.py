"""Per-step timing inside vLLM's workers, for profiling a benchmark run (not used by the plugin).

    VTENSOR_STEP_PROFILE=/tmp/steps PYTHONPATH=benchmarks/step_profile:. \\
        .venv/bin/python benchmarks/serve_compare.py --batches 2 --rounds 2 --out /tmp/steps/run.json
    .venv/bin/python benchmarks/step_profile/report.py /tmp/steps

Python imports this file at start-up in every process of the run (it is first on PYTHONPATH). In
a worker it wraps the model runner's ``execute_model`` (one step: block updates, input preparation,
forward pass) and VTENSOR's block updates within it, and appends one line per step to
``$VTENSOR_STEP_PROFILE/steps-<pid>.txt``: the engine (``vt`` when the runner has a VTENSOR KV
space, else ``va``), the step's milliseconds, VTENSOR's block-update milliseconds, the VMM backend
calls within those updates and those made beside them on other threads since the last step
(``ops=`` and ``beside=``: ``op:calls:ms``, see vmm_ops.py), and the step's shape (tokens, new,
finished and scheduled requests), so steps of the same shape can be compared across engines.
"""
import os

_DIR = os.environ.get("VTENSOR_STEP_PROFILE")
_LABEL = os.environ.get("VTENSOR_STEP_PROFILE_LABEL")  # the engine's name, where a benchmark runs several

if _DIR:
    import dataclasses
    import time

    os.makedirs(_DIR, exist_ok=True)
    _out = []
    _updates = [0.0]

    def _log(line: str) -> None:
        if not _out:
            _out.append(open(os.path.join(_DIR, f"steps-{os.getpid()}.txt"), "a", buffering=1))
        _out[0].write(line + "\n")

    import vllm_vtensor.patches as _patches
    import vllm_vtensor.worker as _worker
    from vllm_vtensor.vmm import base as _vmm_base, cuda as _vmm_cuda, host as _vmm_host
    from vmm_ops import OpTimes, format_ops

    _ops = OpTimes()
    for _cls in (_vmm_base.VMMBackend, _vmm_host.HostBackend, _vmm_cuda.CudaBackend):
        _ops.wrap(_cls)
    _translate = _worker.translate_scheduler_output

    def _timed_translate(kv, so):
        t0 = time.perf_counter()
        try:
            with _ops.updating():
                _translate(kv, so)
        finally:
            _updates[0] += time.perf_counter() - t0

    _worker.translate_scheduler_output = _timed_translate  # before the runner patch imports it
    _apply_runner_patch = _patches._patch_runner_update_states

    def _runner_patch_with_timing():
        _apply_runner_patch()
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        execute = GPUModelRunner.execute_model

        def execute_model(self, so, *args, **kwargs):
            _updates[0] = 0.0
            t0 = time.perf_counter()
            out = execute(self, so, *args, **kwargs)
            ms = (time.perf_counter() - t0) * 1e3
            engine = _LABEL or ("vt" if getattr(self, "_vtensor_kv", None) is not None else "va")
            own, beside = _ops.take()
            _log(f"{time.time():.4f} {engine} {ms:.3f} {_updates[0] * 1e3:.3f} ops={format_ops(own)} "
                 f"beside={format_ops(beside)} tok={so.total_num_scheduled_tokens} "
                 f"new={len(so.scheduled_new_reqs)} fin={len(so.finished_req_ids)} sched={len(so.num_scheduled_tokens)}")
            return out

        GPUModelRunner.execute_model = execute_model

    _patches.PATCHES = tuple(
        dataclasses.replace(p, apply=_runner_patch_with_timing) if p.name == "runner-virtual-block-ids" else p
        for p in _patches.PATCHES
    )
