"""The worker's environment settings: defaults, accepted values, and errors naming the fix."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_vtensor.vmm.host import HostBackend
from vllm_vtensor.worker import (ASYNC_ENV, STAGE_ENV, VTensorConfigError, async_mapping, linger_seconds,
                                 stage_mappings)


@pytest.mark.parametrize("env, read, bad, fix", [
    (STAGE_ENV, stage_mappings, "yes", "give 1 to map by moving page tables, or 0"),
    (ASYNC_ENV, async_mapping, "off", "give 1 to map beside the compute, or 0"),
])
def test_mapping_switches_are_opt_in(monkeypatch, env, read, bad, fix):
    monkeypatch.delenv(env, raising=False)
    assert read() is False
    monkeypatch.setenv(env, "1")
    assert read() is True
    monkeypatch.setenv(env, bad)
    with pytest.raises(VTensorConfigError, match=fix):
        read()


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


def test_linger_seconds_refuses_a_negative_value(monkeypatch):
    monkeypatch.setenv("VTENSOR_CHUNK_LINGER_S", "-1")
    with pytest.raises(VTensorConfigError, match="seconds >= 0"):
        linger_seconds()


def test_chunk_padding_over_a_tenth_is_refused_naming_the_block_size():
    """On CUDA a chunk is a multiple of 2 MiB: a block whose KV (all layers) pads by more than 10%
    is refused, and the block size named in the message pads by at most 10%."""
    from vllm_vtensor.worker import check_chunk_padding

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
    import logging

    from vllm_vtensor.worker import SLOW_COVER_GRANULES, warn_if_slow_to_cover

    big = (SLOW_COVER_GRANULES + 1) * (2 << 20)
    with caplog.at_level(logging.WARNING):
        assert not warn_if_slow_to_cover("cpu", big, 4096, 256, 8192)  # the host maps one zero file: no cost
        assert not warn_if_slow_to_cover("cuda:0", SLOW_COVER_GRANULES * (2 << 20), 2 << 20, 256, 8192)
        assert warn_if_slow_to_cover("cuda:0", big, 2 << 20, 1024, 131072)
    assert "--max-num-seqs 1024 x --max-model-len 131072" in caplog.text
    assert "lower --max-num-seqs or --max-model-len" in caplog.text
