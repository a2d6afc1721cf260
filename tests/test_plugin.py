"""The plugin is installed as vLLM expects, against the one vLLM version it was written for."""
from __future__ import annotations

import importlib.metadata as md

import pytest

from vllm_vtensor import VLLM_VERSION


def test_vllm_pin_canary():
    """Fails when vLLM moves: the hooks into its internals must be re-checked then."""
    import vllm

    assert vllm.__version__.split("+")[0] == VLLM_VERSION


def test_vllm_distribution_is_visible():
    """`vllm serve` reads this (PackageNotFoundError on the bare CPU wheel)."""
    assert md.version("vllm").startswith(VLLM_VERSION)


def test_entry_points_are_declared():
    eps = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    assert eps["vtensor"] == "vllm_vtensor.plugin:register"
    assert eps["flexoffload"] == "flexoffload.plugin:register"
    loggers = {ep.name: ep.value for ep in md.entry_points(group="vllm.stat_logger_plugins")}
    assert loggers == {"vtensor": "vllm_vtensor.metrics:VTensorStatLogger",
                       "flexinfer": "flexoffload.metrics:FlexInferStatLogger"}


def test_flexinfer_figures_go_to_a_file_of_the_server(monkeypatch, tmp_path):
    """Without FLEXOFFLOAD_STATS_FILE the loader's snapshot goes beside VTENSOR's, in the server's own
    private folder (so /metrics has FlexInfer's figures); a file the user names is kept."""
    import os
    import tempfile

    from flexoffload import plugin

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("VTENSOR_STATS_FILE", "")
    monkeypatch.setenv("FLEXOFFLOAD_STATS_FILE", "")
    monkeypatch.setattr(plugin, "_registered", None)
    assert plugin.register() is True
    own = tmp_path / f"vllm-vtensor-{os.getuid()}" / f"stats-{os.getpid()}"
    assert os.environ["FLEXOFFLOAD_STATS_FILE"] == str(own / "flexinfer.json") and own.is_dir()
    mine = tmp_path / "mine.json"
    monkeypatch.setenv("FLEXOFFLOAD_STATS_FILE", str(mine))
    monkeypatch.setattr(plugin, "_registered", None)
    assert plugin.register() is True
    assert os.environ["FLEXOFFLOAD_STATS_FILE"] == str(mine)


@pytest.mark.parametrize("name", ["vtensor", "flexoffload"])
def test_register_is_idempotent(name, caplog):
    """vLLM may call it again in the same process: the second call registers and logs nothing more."""
    import logging

    ep = next(ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == name)
    register = ep.load()
    assert register() is True
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    assert register() is True
    assert not [r for r in caplog.records if "registered" in r.getMessage()]
    if name == "vtensor":
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        assert "VTENSOR" in AttentionBackendEnum._member_map_


@pytest.mark.parametrize("name", ["vtensor", "flexoffload"])
def test_another_vllm_version_warns_and_stays_out_of_the_way(name, monkeypatch, caplog):
    """With another vLLM installed every vLLM command must still work: the plugin registers nothing
    and warns once, naming the version to install."""
    import logging

    import vllm

    module = __import__({"vtensor": "vllm_vtensor.plugin", "flexoffload": "flexoffload.plugin"}[name],
                        fromlist=["register"])
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    monkeypatch.setattr(module, "_registered", None)
    caplog.set_level(logging.WARNING)
    assert module.register() is False
    assert module.register() is False
    if name == "vtensor":
        warnings = [r.getMessage() for r in caplog.records if "vllm-vtensor is written for" in r.getMessage()]
        assert len(warnings) == 1 and "install vllm==0.32.0" in warnings[0]


def test_settings_reach_ray_workers(monkeypatch):
    """vLLM's Ray executor copies only the environment variables it knows of to its workers (on every
    node): once registered, VTENSOR's settings are among them - the stats file, a per-host path, is not -
    and a user's own extra names are kept."""
    from vllm.ray.ray_env import get_env_vars_to_copy

    from vllm_vtensor import plugin

    monkeypatch.setenv("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "MY_VAR")
    monkeypatch.setenv("VTENSOR_POOL", "chat")
    monkeypatch.setattr(plugin, "_registered", None)
    assert plugin.register() is True
    carried = get_env_vars_to_copy(destination="workers")
    assert {"MY_VAR", "VTENSOR_POOL", "VTENSOR_POOL_BYTES", "VTENSOR_ATTENTION"} <= carried
    assert "VTENSOR_STATS_FILE" not in carried
