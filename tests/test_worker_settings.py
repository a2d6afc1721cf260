"""The worker's environment settings: defaults, accepted values, and errors naming the fix."""
from __future__ import annotations

import pytest

from vllm_vtensor.vmm.host import HostBackend
from vllm_vtensor.worker import (ASYNC_ENV, STAGE_ENV, VTensorConfigError, async_mapping, linger_seconds,
                                 stage_mappings)


def test_mapping_by_moving_page_tables_is_opt_in(monkeypatch):
    monkeypatch.delenv(STAGE_ENV, raising=False)
    assert stage_mappings() is False
    monkeypatch.setenv(STAGE_ENV, "1")
    assert stage_mappings() is True
    monkeypatch.setenv(STAGE_ENV, "yes")
    with pytest.raises(VTensorConfigError, match="give 1 to map by moving page tables, or 0"):
        stage_mappings()


def test_mapping_beside_the_compute_is_opt_in(monkeypatch):
    monkeypatch.delenv(ASYNC_ENV, raising=False)
    assert async_mapping() is False
    monkeypatch.setenv(ASYNC_ENV, "1")
    assert async_mapping() is True
    monkeypatch.setenv(ASYNC_ENV, "off")
    with pytest.raises(VTensorConfigError, match="give 1 to map beside the compute, or 0"):
        async_mapping()


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
