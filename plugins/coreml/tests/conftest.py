"""Isolation for handoff-coreml's tests: only the plugins a test registers (never every installed
one), caches in a temporary HANDOFF_HOME shared by this session (so the conversions of one test
are reused by the next)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1]
for path in (PLUGIN_DIR, PLUGIN_DIR / "tests"):  # the source tree when not pip-installed; the test plugin
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
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
def coreml_plugins():
    return register("handoff_coreml.plugin")


@pytest.fixture(scope="session")
def use_plugins():
    """:func:`register`, for tests and fixtures that choose their plugins as they go (a test
    module cannot import this conftest by name: the repository's root conftest shares it)."""
    return register
