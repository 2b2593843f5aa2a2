"""Isolation for handoff-coreml's tests (:mod:`handoff.testing`): only the plugins a test
registers (never every installed one), caches in a temporary HANDOFF_HOME shared by this session
(so the conversions of one test are reused by the next)."""

from __future__ import annotations

import pytest

from handoff.testing import handoff_home, isolated_plugins, plugin_tests, register_plugins, use_plugins  # noqa: F401

plugin_tests(__file__, ".")  # the source tree, and the reference test plugin next to this file


@pytest.fixture
def coreml_plugins():
    return register_plugins("handoff_coreml.plugin")
