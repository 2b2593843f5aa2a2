"""Isolation for handoff-qnn's tests: only the plugins a test registers (never every installed
one), caches in a temporary HANDOFF_HOME shared by this session (so the QNN compiles of one test
are reused by the next)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1]
if str(PLUGIN_DIR) not in sys.path:  # not pip-installed: use the source tree
    sys.path.insert(0, str(PLUGIN_DIR))
os.environ["HANDOFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.pop("HANDOFF_PLUGINS", None)


@pytest.fixture(scope="session")
def handoff_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("handoff_home")


@pytest.fixture(autouse=True)
def _isolated(handoff_home, monkeypatch):
    monkeypatch.setenv("HANDOFF_HOME", str(handoff_home))
    from handoff import plugins

    plugins.set_plugins(None)
    yield
    plugins.set_plugins(None)


def register(*modules: str):
    """A plugin manager with the core's built-ins and ``modules``, installed globally."""
    from handoff import plugins

    pm = plugins.Plugins(autoload=False, extra=list(modules))
    assert not pm.broken, pm.broken
    plugins.set_plugins(pm)
    return pm


@pytest.fixture
def qnn_plugins():
    return register("handoff_qnn.plugin")


@pytest.fixture
def plugins_with():
    """``plugins_with("a.plugin", ...)``: :func:`register` as a fixture."""
    return register
