"""Settings (vllm_vtensor/settings.py): defaults, accepted values, errors naming the fix, sizes read
as vLLM reads them, and the configuration page that lists them all."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_vtensor import settings
from vllm_vtensor.settings import SettingError, parse_bytes
from vllm_vtensor.vmm.host import HostBackend
from vllm_vtensor.worker import VTensorConfigError

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@pytest.mark.parametrize("env, bad, fix", [
    ("VTENSOR_STAGE_MAPPINGS", "yes", "give 1 to map by moving page tables, or 0"),
    ("VTENSOR_ASYNC_MAPPING", "off", "give 1 to map beside the compute, or 0"),
])
def test_mapping_switches_are_opt_in(monkeypatch, env, bad, fix):
    monkeypatch.delenv(env, raising=False)
    assert settings.get(env) is False
    monkeypatch.setenv(env, "1")
    assert settings.get(env) is True
    monkeypatch.setenv(env, bad)
    with pytest.raises(SettingError, match=fix):
        settings.get(env)


@pytest.mark.parametrize("env, value, fix, good", [
    *(("VTENSOR_CHUNK_LINGER_S", v, "give seconds from 0", 2.5) for v in ("-1", "1e10", "inf", "nan", "soon")),
    *(("VTENSOR_IDLE_RELEASE_S", v, "give seconds above 0.*leave it unset", 30.0) for v in ("0", "-1", "1e10", "nan")),
])
def test_seconds_outside_their_range_are_refused(monkeypatch, env, value, fix, good):
    """A linger of 1e10 s used to start a healthy server whose reaper thread then died (timestamp out of range)."""
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingError, match=f"{env}.*{fix}"):
        settings.get(env)
    monkeypatch.setenv(env, str(good))
    assert settings.get(env) == good


def test_a_stats_file_in_a_missing_folder_is_refused(monkeypatch, tmp_path):
    for name in ("VTENSOR_STATS_FILE", "FLEXOFFLOAD_STATS_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "no-such-folder" / "stats.json"))
        with pytest.raises(SettingError, match=f"{name}.*existing folder"):
            settings.check_all()
        monkeypatch.setenv(name, str(tmp_path / "stats.json"))
        assert settings.get(name) == str(tmp_path / "stats.json")


@pytest.mark.parametrize("text, expected", [
    ("512M", 512 * MiB), ("512m", 512_000_000), ("2K", 2048), ("2k", 2000), ("1G", 1 << 30), ("1.5GiB", 3 << 29),
    ("800MB", 800_000_000), ("800mb", 800_000_000), ("2 MiB", 2 * MiB), ("4096", 4096), (123, 123),
])
def test_sizes_are_read_as_vllm_reads_them(text, expected):
    assert parse_bytes(text) == expected


def test_single_letter_sizes_agree_with_vllms_own_parser():
    """``--kv-cache-memory-bytes 512M`` and ``VTENSOR_PRECREATE_BYTES=512M`` mean the same size."""
    from vllm.utils.argparse_utils import human_readable_int

    for text in ("512M", "512m", "3K", "3k", "2G", "2g", "1T", "7"):
        assert parse_bytes(text) == human_readable_int(text), text


@pytest.mark.parametrize("bad", ["lots", "12XB", "", "1e999M", True])
def test_sizes_that_are_not_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="as a size"):
        parse_bytes(bad)


def test_the_configuration_page_is_the_settings_table():
    """docs/user-guide/configuration.md holds the table the settings module generates: they cannot drift."""
    page = (ROOT / "docs" / "user-guide" / "configuration.md").read_text()
    assert settings.markdown_table() in page, "regenerate: python -m vllm_vtensor.settings --markdown"
    out = subprocess.run([sys.executable, "-m", "vllm_vtensor.settings", "--markdown"], capture_output=True, text=True,
                         check=True).stdout
    assert out == settings.markdown_table()


def test_flexinfer_options_in_the_table_are_flexconfigs_fields():
    from flexoffload.config import FlexConfig

    table = {s.name: s for s in settings.SETTINGS if s.kind == "flexinfer option"}
    fields = {f.name: f for f in dataclasses.fields(FlexConfig)}
    assert table.keys() == fields.keys()
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            assert table[name].default == f.default, name


def test_settings_are_read_only_through_the_settings_module():
    """No other module of the plugin reads a VTENSOR_* or FLEXOFFLOAD_* variable itself."""
    offenders = []
    for path in list((ROOT / "vllm_vtensor").rglob("*.py")) + list((ROOT / "flexoffload").rglob("*.py")):
        if path.name == "settings.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            reads = re.search(r"(os\.environ\.get|getenv|os\.environ\[[^\]]+\](?!\s*=[^=]))", line)
            if reads and re.search(r"VTENSOR_|FLEXOFFLOAD_|ENV\b", line[reads.start():].split("#")[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("stage", [False, True])
def test_the_host_backend_moves_mappings_only_when_staging(stage):
    b = HostBackend(stage=stage)
    g = 16 * b.granularity
    vr = b.reserve(2 * g)
    h = b.create_chunk(g)
    b.map(vr, 0, h, g)
    b.as_tensor(vr.addr, g).fill_(3)
    b.unmap(vr, 0, g)
    b.map(vr, g, h, g)
    assert int(b.as_tensor(vr.addr + g, g).min()) == 3 and int(b.as_tensor(vr.addr, g).count_nonzero()) == 0
    assert b.moves == (3 if stage else 0)
    b.close()


def test_chunk_padding_over_a_tenth_is_refused_naming_the_block_size():
    """On CUDA a chunk is a multiple of 2 MiB: a block whose KV (all layers) pads by more than 10%
    is refused, and the block size named in the message pads by at most 10%."""
    from vllm_vtensor.policy import check_chunk_padding

    gran = 2 << 20
    check_chunk_padding(128 * 16384, 128, gran)  # exactly one chunk
    per_token = 30 * 3 * 64 * 2 * 2  # SmolLM2-135M in bf16
    with pytest.raises(VTensorConfigError, match=r"--block-size (\d+)") as err:
        check_chunk_padding(16 * per_token, 16, gran)
    fits = int(err.value.args[0].split("--block-size ")[1].split()[0])
    assert fits % 16 == 0 and fits > 16
    check_chunk_padding(fits * per_token, fits, gran)  # the named size passes
    with pytest.raises(VTensorConfigError):
        check_chunk_padding((fits - 16) * per_token, fits - 16, gran)  # and it is the smallest
    check_chunk_padding(16 * per_token, 16, 4096)  # host pages: negligible padding


def test_the_backend_class_follows_the_platform():
    from vllm_vtensor import BACKEND_PATH, backend_path

    assert backend_path() == BACKEND_PATH  # CPU here; on CUDA: vllm_vtensor.backend_cuda.VTensorCudaBackend


def _config(kv_transfer_config=None, enable_sleep_mode=False):
    return SimpleNamespace(kv_transfer_config=kv_transfer_config,
                           model_config=SimpleNamespace(enable_sleep_mode=enable_sleep_mode))


@pytest.mark.parametrize("kw, problem, fix", [
    (dict(kv_transfer_config=SimpleNamespace(kv_connector="OffloadingConnector")), "KV connectors",
     "run without --kv-transfer-config / --kv-offloading-size"),
    (dict(enable_sleep_mode=True), "sleep mode", "run without --enable-sleep-mode"),
])
def test_engine_features_that_bypass_the_kv_space_are_refused(kw, problem, fix):
    from vllm_vtensor.worker import check_engine_features

    check_engine_features(_config())  # neither: runs
    check_engine_features(_config(kv_transfer_config=SimpleNamespace(kv_connector=None)))  # no connector set
    with pytest.raises(VTensorConfigError) as e:
        check_engine_features(_config(**kw))
    assert problem in str(e.value) and fix in str(e.value)
    assert "or run without --attention-backend VTENSOR" in str(e.value)


def test_a_virtual_range_too_large_names_the_flags_that_size_it():
    from vllm_vtensor.worker import kv_space_for

    backend = HostBackend()
    kw = dict(max_model_len=1 << 20, block_size=32, block_bytes=32 * 4096, num_blocks=4, keep_full_blocks=False)
    try:
        kv = kv_space_for(backend, max_num_seqs=2, **kw)  # 2 x 32769 blocks of 128 KiB: 8 GiB, reserved
        assert kv.num_slots == 2 and kv.blocks_per_slot == (1 << 20) // 32 + 1
        kv.close()
        with pytest.raises(VTensorConfigError) as e:  # 2^31 requests of 1M tokens: beyond any address space
            kv_space_for(backend, max_num_seqs=1 << 31, **kw)
        assert "Lower --max-num-seqs or --max-model-len" in str(e.value) and "--max-num-seqs 2147483648" in str(e.value)
    finally:
        backend.close()


def test_a_cuda_range_slow_to_cover_is_warned_about_naming_the_flags(caplog):
    """Warned where covering the range with zero memory takes more than SLOW_COVER_MAPPINGS mappings: a range
    of that many granules is covered one granule each, a larger one with zero pieces (up to 32 granules), so
    the warning comes only where even those are too many (vLLM's default --max-num-seqs 1024 of a server
    on a large GPU at Llama-3.1's 131072 tokens)."""
    import logging

    from vllm_vtensor.policy import SLOW_COVER_MAPPINGS, warn_if_slow_to_cover

    g = 2 << 20
    huge = 1024 * (131072 // 16 + 1) * g
    with caplog.at_level(logging.WARNING):
        assert not warn_if_slow_to_cover("cpu", huge, 4096, 1024, 131072)  # the host maps one zero file: no cost
        assert not warn_if_slow_to_cover("cuda:0", SLOW_COVER_MAPPINGS * g, g, 256, 8192)
        assert not warn_if_slow_to_cover("cuda:0", (SLOW_COVER_MAPPINGS + 1) * g, g, 256, 8193)  # pieces of 8
        assert not warn_if_slow_to_cover("cuda:0", 256 * (131072 // 16 + 1) * g, g, 256, 131072)  # pieces of 32
        assert warn_if_slow_to_cover("cuda:0", huge, g, 1024, 131072)
    assert "--max-num-seqs 1024 x --max-model-len 131072" in caplog.text
    assert "lower --max-num-seqs or --max-model-len" in caplog.text


def test_attention_choice_outside_the_kernels_is_refused(monkeypatch):
    monkeypatch.setenv("VTENSOR_ATTENTION", "flash")
    with pytest.raises(SettingError, match="VTENSOR_ATTENTION.*cpu, triton or reference on a CPU"):
        settings.check_all()


def test_stats_files_are_private_and_do_not_outlive_their_process(monkeypatch, tmp_path):
    """Without VTENSOR_STATS_FILE the snapshot goes to a folder of this server in a folder of this
    user (both 0700), written 0600; the folder goes at exit, and those of processes that died (and
    files of older versions) are removed when a server starts."""
    import os
    import stat
    import tempfile

    from vllm_vtensor import stats

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("VTENSOR_STATS_FILE", "")  # unset for the settings; restored after the test
    folder = tmp_path / f"vllm-vtensor-{os.getuid()}"
    folder.mkdir(mode=0o755)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_file = folder / f"stats-{dead.pid}.json"
    stale_file.write_text("{}")
    stale = folder / f"stats-{dead.pid}"
    stale.mkdir()
    (stale / "stats.json").write_text("{}")
    alive = folder / f"stats-{os.getppid()}"
    alive.mkdir()
    registered = []
    monkeypatch.setattr(stats.atexit, "register", lambda fn, *a: registered.append((fn, a)))
    path = stats.ensure_stats_path()
    assert path == str(folder / f"stats-{os.getpid()}" / "stats.json") and os.environ["VTENSOR_STATS_FILE"] == path
    assert stats._owner(path) == os.getpid()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert not stale_file.exists() and not stale.exists() and alive.exists()
    stats.write_json_atomic(path, {"resident_bytes": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (fn, args), = registered
    fn(*args)  # what runs at exit
    assert not os.path.exists(os.path.dirname(path))


@pytest.mark.parametrize("writer", ["vtensor", "flexinfer"])
def test_a_worker_writing_while_its_server_exits_leaves_nothing(writer, monkeypatch, tmp_path):
    """The server removes its snapshot folder at exit while still alive; a worker's snapshot written
    then (the owner still runs) must not leave a file behind, nor fail: the write finds no folder.
    VTENSOR's figures and FlexInfer's alike."""
    import os
    import tempfile
    import threading
    import time

    from flexoffload import loader
    from flexoffload.runtime import StreamStats
    from vllm_vtensor import stats

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("VTENSOR_STATS_FILE", "")
    monkeypatch.setenv("FLEXOFFLOAD_STATS_FILE", "")
    registered = []
    monkeypatch.setattr(stats.atexit, "register", lambda fn, *a: registered.append((fn, a)))
    if writer == "vtensor":
        path = stats.ensure_stats_path()
        figures = dataclasses.make_dataclass("Figures", [("resident_bytes", int)])
        kv = SimpleNamespace(stats=lambda: figures(1))

        def write():
            stats._write_snapshot(path, kv)
    else:
        path = stats.ensure_private_file("FLEXOFFLOAD_STATS_FILE", "flexinfer.json")
        streamer = SimpleNamespace(stats=StreamStats(forwards=3), locked=False)
        failed = []

        def write():
            reported = loader._Reported(0.0)
            loader._write_stats(path, {"budget_bytes": 1})
            loader._write_snapshot(path, streamer, reported)
            failed.append(reported.failed)
    stop = threading.Event()
    errors = []

    def worker():
        while not stop.is_set():
            try:
                write()  # the owner (this process) stays alive throughout
            except Exception as e:
                errors.append(e)

    writers = [threading.Thread(target=worker) for _ in range(2)]
    for t in writers:
        t.start()
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(path)
        (fn, args), = registered
        fn(*args)
        time.sleep(0.05)
    finally:
        stop.set()
        for t in writers:
            t.join()
    assert not os.path.exists(os.path.dirname(path)) and not errors
    if writer == "flexinfer":
        assert failed and not any(failed)  # nothing to write to is no failure


def test_kv_cache_groups_vtensor_cannot_map_are_refused_naming_them():
    """Full-attention and sliding-window groups (also side by side: hybrid models) run; chunked-local,
    MLA, or groups of different block sizes are refused with the kinds named."""
    import torch
    from vllm.v1.kv_cache_interface import (ChunkedLocalAttentionSpec, FullAttentionSpec, MLAAttentionSpec,
                                            SlidingWindowSpec)

    from vllm_vtensor.worker import _attention_groups

    kw = dict(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)

    def config(*specs):
        return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s, layer_names=[f"l{i}"])
                                                for i, s in enumerate(specs)])

    assert len(_attention_groups(config(FullAttentionSpec(**kw)))) == 1
    assert len(_attention_groups(config(SlidingWindowSpec(**kw, sliding_window=64), FullAttentionSpec(**kw)))) == 2
    for bad, name in ((ChunkedLocalAttentionSpec(**kw, attention_chunk_size=64), "ChunkedLocalAttentionSpec"),
                      (MLAAttentionSpec(**kw), "MLAAttentionSpec"),
                      (FullAttentionSpec(**(kw | {"block_size": 64})), "FullAttentionSpec")):
        with pytest.raises(VTensorConfigError, match=f"{name}.*Run it without VTENSOR"):
            _attention_groups(config(FullAttentionSpec(**kw), bad))


def test_a_snapshot_file_chosen_on_another_node_is_not_used(monkeypatch, tmp_path):
    """Under vLLM's Ray executor a worker on another node inherits the driver's VTENSOR_STATS_FILE;
    a server's snapshot folder that is not on this host makes the worker choose its own."""
    import os
    import tempfile

    from vllm_vtensor import stats

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(stats.atexit, "register", lambda fn, *a: None)
    elsewhere = str(stats.private_folder_path() / "stats-1" / "stats.json")  # the driver's, on its node
    monkeypatch.setenv("VTENSOR_STATS_FILE", elsewhere)
    path = stats.ensure_stats_path()
    assert path == os.environ["VTENSOR_STATS_FILE"] == str(stats.private_folder_path() / f"stats-{os.getpid()}"
                                                           / "stats.json")
    assert os.path.isdir(os.path.dirname(path))
    user_named = tmp_path / "mine.json"  # a file the user named stays theirs
    monkeypatch.setenv("VTENSOR_STATS_FILE", str(user_named))
    assert stats.ensure_stats_path() == str(user_named)


def test_worker_memory_figures_name_one_process():
    """The snapshot carries the worker's RSS (a counter read) and its start time; the PSS, a walk of every
    page table, is read at scrape time, and only from the process that wrote the snapshot."""
    import psutil

    from vllm_vtensor import stats

    mine = stats.process_memory() | {"pid": os.getpid()}
    assert abs(mine["process_rss_bytes"] - psutil.Process().memory_info().rss) < 64 << 20
    pss = stats.process_pss_bytes(mine)
    assert pss is not None and 0 < pss <= psutil.Process().memory_info().rss * 1.1
    assert stats.process_pss_bytes(mine | {"process_start": mine["process_start"] + 1}) is None  # a reused pid
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert stats.process_pss_bytes(mine | {"pid": gone.pid}) is None
    assert stats.process_pss_bytes({}) is None


def test_snapshots_asked_for_every_step_are_written_at_most_every_interval_the_last_state_last(monkeypatch, tmp_path):
    """Every step with requests starting or finishing asks for a snapshot; the publisher writes at most one
    per interval (counting a KV space's figures holds its lock and the GIL the next step's
    block updates wait for), and what it writes last is the state after the last request."""
    import json
    import time

    from vllm_vtensor import stats

    path = str(tmp_path / "stats.json")
    monkeypatch.setenv("VTENSOR_STATS_FILE", path)
    figures = dataclasses.make_dataclass("Figures", [("step", int)])
    state = {"step": 0}
    counted = []

    def count():
        counted.append(state["step"])
        return figures(state["step"])

    kv = SimpleNamespace(stats=count)
    publisher = stats.Publisher(stats._write_snapshot, 0.05, "vtensor-stats")
    monkeypatch.setattr(stats, "_publisher", publisher)
    start = time.monotonic()
    for step in range(1, 101):  # 100 steps of 2 ms
        state["step"] = step
        stats.publish(kv, force=True)
        time.sleep(0.002)
    took = time.monotonic() - start
    def written():  # the figures are counted first, then written: wait for the file, not the count
        try:
            return json.loads(open(path).read())["step"]
        except (OSError, ValueError):
            return None

    deadline = time.monotonic() + 5
    while written() != 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counted[-1] == 100 and written() == 100
    assert 2 <= len(counted) <= took / 0.05 + 2, counted
    assert counted == sorted(counted)
