"""`--load-format flexinfer` on SmolLM2: greedy outputs equal vLLM's default loader at 25%, 50% and
100% of the weight bytes, at 25% with a host tier of another 25% (tensors from memory, disk and the
host tier at once), and with the budget "auto" (which here, with the model fitting in the free
memory, streams nothing); the worker's memory shrinks by what is streamed (measured), and loading,
the weight store's first build included, stays within the budget (measured); at 100% nothing
streams; the engine core sleeps between checks of the worker's replies instead of keeping a core
busy (VTENSOR_ENGINE_POLL_US=auto); a resident lm_head is packed from the store while layers
stream, tied (SmolLM2) or not (a tiny untied llama, whose load never holds two copies of it and
whose embedding table is read by rows below 100%); a budget below the minimum fails with the
minimum named."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three fruits."}],
    [{"role": "user", "content": "Explain what a compiler does. " * 10}],
]


def _params():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=24)


def _processes(title: str) -> dict[int, psutil.Process]:
    """This test's vLLM processes whose title holds ``title`` (``Worker``, ``EngineCore``), by pid."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(p.cmdline() or [p.name()]):
                found[p.pid] = p
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue  # an earlier engine's process that has exited and not been reaped yet
    return found


def _workers() -> dict[int, psutil.Process]:
    return _processes("Worker")


def _engine_cores() -> dict[int, psutil.Process]:
    return _processes("EngineCore")


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


@pytest.fixture(scope="module")
def reference(vanilla_llm):
    outs = vanilla_llm.chat(PROMPTS, _params())
    rss = max(p.memory_info().rss for p in _workers().values())
    return [list(o.outputs[0].token_ids) for o in outs], rss


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0, "auto", "0.25+host"])
def test_flexinfer_matches_default_loader(fraction, reference, smollm2_path, tmp_path):
    from vllm import LLM

    ref_ids, vanilla_rss = reference
    stats_path = tmp_path / "flex.json"
    os.environ["FLEXOFFLOAD_STATS_FILE"] = str(stats_path)
    before, cores_before = set(_workers()), set(_engine_cores())
    # at 25% the weight store is built from the checkpoint in a fresh folder: that first load must stay
    # within the budget too
    fresh = {"cache_dir": str(tmp_path / "store")} if fraction == 0.25 else {}
    extra = {"memory_budget": 0.25, "host_budget": 0.25} if fraction == "0.25+host" else {"memory_budget": fraction}
    llm = LLM(model=smollm2_path, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=256 << 20, load_format="flexinfer", model_loader_extra_config={**extra, **fresh})
    (core,) = [p for pid, p in _engine_cores().items() if pid not in cores_before]
    cpu0, t0 = _cpu_s(core), time.monotonic()
    out = [list(o.outputs[0].token_ids) for o in llm.chat(PROMPTS, _params())]
    core_busy = (_cpu_s(core) - cpu0) / (time.monotonic() - t0)
    (worker,) = [p for pid, p in _workers().items() if pid not in before]
    rss = worker.memory_info().rss
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    stats = json.loads(stats_path.read_text())

    assert out == ref_ids
    # the engine core waits for each step's reply asleep (vLLM's sched_yield loop: ~0.7-1.0 of a core)
    assert core_busy < 0.3, core_busy
    assert stats["resident_bytes"] + stats["arena_bytes"] <= stats["budget_bytes"]
    if fresh:
        assert list((tmp_path / "store").glob("flexinfer/*.bin")), "the store was not built in the fresh folder"
        # measured: the worker's anonymous memory grew by no more than the budget while it loaded
        # (a load that held the model, as vLLM's loader does, grows by all 540 MB of it)
        assert stats["load_peak_anon_bytes"] <= stats["budget_bytes"] + (32 << 20), stats
    if fraction == "auto":  # SmolLM2's 540 MB fit in what this machine has free: all of it, nothing streams
        assert stats["auto"]["room_bytes"] >= stats["weight_bytes"] == stats["budget_bytes"], stats["auto"]
        assert stats["auto"]["kv_bytes"] == 256 << 20 and stats["auto"]["free_bytes"] > stats["auto"]["room_bytes"]
    if fraction == "0.25+host":  # three tiers: resident, host tier, disk
        assert 0 < stats["host_bytes"] <= stats["host_budget_bytes"] and stats["disk_bytes_per_forward"] > 0
        assert stats["host_bytes_per_forward"] + stats["disk_bytes_per_forward"] == stats["streamed_bytes_per_forward"]
        assert stats["bytes_from_host"] >= stats["forwards"] * stats["host_bytes_per_forward"] * 0.9
        assert stats["bytes_streamed"] >= stats["forwards"] * stats["disk_bytes_per_forward"] * 0.9
    else:
        assert stats["host_bytes"] == 0  # no host tier on a CPU unless asked for
    if fraction in (1.0, "auto"):
        assert stats["streamed_bytes_per_forward"] == 0 and stats["bytes_streamed"] == 0
    else:
        assert stats["forwards"] > 0
        # a resident lm_head (SmolLM2's is its embedding table) is packed for oneDNN from the store; a
        # streamed one is read and computed in runs of rows (no larger than a layer or an eighth of it)
        assert stats["head_packed"] == (not stats["head_streamed"]), stats
        assert (stats["head_runs"] >= 8) == stats["head_streamed"], stats
        assert stats["gemv"] in ("onednn", "linear", "mv"), stats  # timed at load (choose_gemv)
        # the forward pass waits only while reads are in flight (counted even when they never drain)
        assert stats["io_seconds"] >= stats["wait_seconds"] > 0, stats
        assert stats["bytes_streamed"] + stats["bytes_from_host"] >= (
            stats["forwards"] * stats["streamed_bytes_per_forward"] * 0.9)
        # measured: the worker holds at least 3/4 of the bytes the plan keeps out of memory less than vanilla's
        saved = stats["weight_bytes"] - stats["resident_bytes"] - stats["arena_bytes"] - stats["host_bytes"]
        assert vanilla_rss - rss > 0.75 * saved, (vanilla_rss, rss, saved)


def test_budget_below_the_minimum_names_it(smollm2_path):
    code = textwrap.dedent(f"""
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={smollm2_path!r}, dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=64 << 20,
                load_format="flexinfer", model_loader_extra_config={{"memory_budget": "8MiB"}})
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    out = run.stdout + run.stderr  # vLLM logs the worker's error to stdout, the traceback to stderr
    assert "below the minimum" in out and "raise the budget" in out


@pytest.mark.parametrize("extra, message", [
    ({"memory_budget": "50%", "prefetch": 2}, "unknown flexinfer option(s) ['prefetch']"),
    ({}, "flexinfer needs a memory budget"),
    ({"memory_budget": "-1GiB"}, "must be positive"),
    ({"memory_budget": 0.5, "host_budget": 1.5}, "host_budget fraction 1.5 must be in [0, 1]"),
])
def test_bad_options_are_refused_before_the_engine_starts(extra, message, smollm2_path):
    """In this process, as LLM() makes its configuration: a ValueError naming the fix (an engine that had
    started would report a RuntimeError)."""
    from test_e2e_bad_config import refused_at_config

    assert message in refused_at_config(smollm2_path, load_format="flexinfer", model_loader_extra_config=extra)


def test_quantized_weights_are_refused_before_the_engine_starts(tiny_llama_path):
    """Quantized weights (fp8 asked for): refused as LLM() makes its configuration, naming the fix; it
    failed inside the worker, where vLLM converts the weights it had left empty."""
    from test_e2e_bad_config import refused_at_config

    flex = dict(load_format="flexinfer", model_loader_extra_config={"memory_budget": 0.5})
    message = refused_at_config(tiny_llama_path, quantization="fp8", dtype="bfloat16", **flex)
    assert "this model's weights are quantized (fp8)" in message
    assert "load it without --load-format flexinfer" in message


UNTIED = dict(head_dim=64, num_layers=12, num_heads=8, num_kv_heads=2, hidden_size=512, intermediate_size=1024,
              tie_word_embeddings=False)
UNTIED_PROMPTS = ["The lighthouse keeper", "Once upon a time, in a city by the sea, " * 8]


def _untied_run(model: str, extra: dict | None, stats_path) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    os.environ["FLEXOFFLOAD_STATS_FILE"] = str(stats_path)
    kw = {"load_format": "flexinfer", "model_loader_extra_config": extra} if extra else {}
    llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=64 << 20, **kw)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(
        UNTIED_PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return out


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A tiny llama whose lm_head is not its embedding table (as Llama-3.1-8B's), and vLLM's tokens."""
    from vllm_vtensor.models import build_tiny_llama

    model = str(build_tiny_llama(**UNTIED))
    return model, _untied_run(model, None, tmp_path_factory.mktemp("untied") / "vanilla.json")


@pytest.mark.parametrize("fraction", [0.8, 0.4])
def test_an_untied_embedding_table_is_read_by_rows_and_the_lm_head_packed(fraction, untied, tmp_path):
    """Below 100% the untied embedding table is not held (lookups read its rows from the store), so at
    80% everything else fits and nothing streams; at 40% the lm_head streams alone.  A resident lm_head
    is packed for oneDNN as vLLM packs it, straight from the store's pages, so loading never holds its
    unpacked weight beside the packed one (measured: the worker's anonymous memory grows by no more
    than the budget).  Greedy tokens equal vLLM's default loader's."""
    model, ref = untied
    stats_path = tmp_path / "flex.json"
    out = _untied_run(model, {"memory_budget": fraction, "cache_dir": str(tmp_path / "store")}, stats_path)
    stats = json.loads(stats_path.read_text())
    table = 49152 * UNTIED["hidden_size"] * 4  # SmolLM2's vocabulary, float32

    assert out == ref
    assert stats["embed_rows"] == "model.embed_tokens.weight", stats
    assert stats["resident_bytes"] + stats["streamed_bytes_per_forward"] + table == stats["weight_bytes"], stats
    assert stats["load_peak_anon_bytes"] <= stats["budget_bytes"] + (32 << 20), stats
    if fraction == 0.8:
        assert stats["head_packed"] and stats["streamed_bytes_per_forward"] == 0, stats
    else:
        assert stats["head_streamed"] and not stats["head_packed"] and stats["head_runs"] > 1, stats
        assert stats["bytes_streamed"] >= stats["forwards"] * stats["streamed_bytes_per_forward"] * 0.9, stats


@pytest.mark.parametrize("tied", [True, False])
def test_a_pooling_model_reads_its_embedding_table_by_rows(tied, tiny_llama_path, tmp_path):
    """An embedding model (a tiny llama converted by vLLM, `--convert embed`, which leaves out an untied
    lm_head) at 40% of its weights: it computes no logits, so its embedding table is only looked up and
    read by rows (a tied one was streamed whole every forward pass as a head); what is left fits,
    nothing streams; the embeddings of vLLM's default loader."""
    import torch
    from vllm import LLM

    from vllm_vtensor.models import build_tiny_llama

    model = tiny_llama_path if tied else str(build_tiny_llama(tie_word_embeddings=False))

    prompts = [{"prompt_token_ids": [100 + (i * 7 + k) % 900 for k in range(30 + 20 * i)]} for i in range(4)]

    def run(**kw):
        llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=32 << 20, runner="pooling", convert="embed", **kw)
        out = [torch.tensor(o.outputs.embedding) for o in llm.embed(prompts, use_tqdm=False)]
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        return out

    ref = run()
    stats_path = tmp_path / "flex.json"
    os.environ["FLEXOFFLOAD_STATS_FILE"] = str(stats_path)
    out = run(load_format="flexinfer", model_loader_extra_config={"memory_budget": 0.4,
                                                                 "cache_dir": str(tmp_path / "store")})
    stats = json.loads(stats_path.read_text())
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert stats["embed_rows"] == "model.embed_tokens.weight" and not stats["head_streamed"], stats
    assert stats["streamed_bytes_per_forward"] == 0 and stats["resident_bytes"] <= stats["budget_bytes"], stats
    table = 49152 * 256 * 4  # SmolLM2's vocabulary, the tiny llama's width, float32
    assert stats["resident_bytes"] == stats["weight_bytes"] - table, stats
