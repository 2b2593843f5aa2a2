"""Shared fixture of the program-level tests: the core's built-ins plus this plugin only."""

from __future__ import annotations

import pytest

from handoff.plugins import Plugins, set_plugins


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """The core's built-ins plus this plugin only (no autoload), caches in a temp HANDOFF_HOME
    shared by the module, so identical partitions are lowered once."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HANDOFF_HOME", str(tmp_path_factory.mktemp("handoff_home")))
    pm = Plugins(autoload=False, extra=["handoff_xnnpack.plugin"])
    ok, why = pm.runtime_available("xnnpack")
    if not ok:
        pytest.skip(why)
    set_plugins(pm)
    yield pm
    set_plugins(None)
    mp.undo()
