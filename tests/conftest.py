"""Test isolation: installed plugins never leak into core tests, caches go to a temp dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HANDOFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"
sys.path.insert(0, str(Path(__file__).parent / "plugins"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path_factory.mktemp("handoff_home")))
    from handoff import plugins

    plugins.set_plugins(None)
    yield
    plugins.set_plugins(None)


@pytest.fixture
def sink_plugins():
    """A plugin manager with the built-ins and the kitchen-sink plugin, installed globally."""
    import kitchen_sink
    from handoff import plugins

    pm = plugins.Plugins(autoload=False)
    pm.register(kitchen_sink, name="kitchen_sink")
    plugins.set_plugins(pm)
    return pm
