"""benchmarks/multi_engine.py's parts that need no engine: the server flags it builds for each device
(read by vLLM's own argument parser), and its comparison of phases when a run has only some of them
(a GPU run's default: one busy phase and the balanced one)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import multi_engine  # noqa: E402


def _parse_as_vllm(flags: list[str]):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return EngineArgs.from_cli_args(EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "m", *flags]))


@pytest.mark.parametrize("native_ops", [False, True])
def test_cuda_server_flags_are_vllms(monkeypatch, native_ops):
    monkeypatch.setenv("VTENSOR_NO_VLLM_OPS", "1") if native_ops else monkeypatch.delenv("VTENSOR_NO_VLLM_OPS", raising=False)
    flags = multi_engine.device_flags(argparse.Namespace(cuda=True, gpu_memory_utilization=0.4))
    e = _parse_as_vllm([*flags, "--kv-cache-memory-bytes", str(1 << 30), "--attention-backend", "TRITON_ATTN"])
    assert (e.dtype, e.load_format, e.skip_tokenizer_init, e.gpu_memory_utilization) == ("bfloat16", "dummy", True, 0.4)
    if native_ops:  # what gpu_vllm.sh's harness needs: no compiled op is asked for
        assert e.compilation_config.custom_ops == ["none"]
        assert json.loads(flags[flags.index("--kernel-config") + 1])["ir_op_priority"]["rms_norm"] == ["native"]


def test_cpu_server_flags_are_vllms():
    e = _parse_as_vllm(multi_engine.device_flags(argparse.Namespace(cuda=False)))
    assert e.dtype == "float32" and e.load_format == "auto"


def _phase(tok_s: float, p99: float, failed: int = 0) -> dict:
    return {"tok_s": tok_s, "ttft_p99_s": p99, "failed": failed}


def test_comparison_of_the_phases_a_run_has():
    def config(phases, alive=True):
        return {"phases": phases, "cgroup": None, "servers_alive": [alive, alive]}

    static = config({"busy-0": _phase(100, 6.0), "all": _phase(180, 2.0)})
    shared = config({"busy-0": _phase(120, 3.0), "all": _phase(175, 2.5)}) | {"pool_overdrawn_bytes": 0}
    out = multi_engine.compare({"static": static, "shared": shared})
    assert set(out) == {"busy-0", "all", "goals"}
    assert out["busy-0"] == {"tok_s_ratio": 1.2, "ttft_p99_ratio": 0.5}
    assert out["goals"] == {"skewed_met": True, "balanced_met": True, "no_failures": True, "no_oom_kills": True,
                            "pool_never_passed": True}
    shared["phases"]["all"] = _phase(160, 2.5, failed=1)  # 0.89x and a failed request
    goals = multi_engine.compare({"static": static, "shared": shared})["goals"]
    assert (goals["balanced_met"], goals["no_failures"]) == (False, False)
    shared["servers_alive"] = [True, False]
    assert not multi_engine.compare({"static": static, "shared": shared})["goals"]["no_oom_kills"]
