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


@pytest.mark.parametrize("name", ["vtensor", "flexoffload"])
def test_register_is_idempotent(name, caplog):
    ep = next(ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == name)
    register = ep.load()
    register()
    register()  # vLLM may call it again in the same process; nothing breaks or repeats
