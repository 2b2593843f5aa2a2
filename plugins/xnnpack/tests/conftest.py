"""Isolation for handoff-xnnpack's tests (:mod:`handoff.testing`): only the plugins a test registers
(never every installed one), caches in a temporary HANDOFF_HOME shared by this session (so a
partition lowered by one test is reused by the next); and the fixture of the program-level tests."""

from __future__ import annotations

import pytest

from handoff.testing import handoff_home, isolated_plugins, plugin_tests, use_plugins  # noqa: F401

plugin_tests(__file__)


@pytest.fixture
def plugins(use_plugins):
    """The core's built-ins plus this plugin only, installed for the test; skips, with the reason,
    where XNNPACK's runtime cannot run."""
    pm = use_plugins("handoff_xnnpack.plugin")
    ok, why = pm.runtime_available("xnnpack")
    if not ok:
        pytest.skip(why)
    return pm
