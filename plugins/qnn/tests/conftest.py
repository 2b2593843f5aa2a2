"""Isolation for handoff-qnn's tests (:mod:`handoff.testing`): only the plugins a test registers
(never every installed one), caches in a temporary HANDOFF_HOME shared by this session (so the QNN
compiles of one test are reused by the next)."""

from __future__ import annotations

import pytest

from handoff.testing import handoff_home, isolated_plugins, plugin_tests, register_plugins, use_plugins  # noqa: F401

plugin_tests(__file__)


@pytest.fixture
def qnn_plugins():
    return register_plugins("handoff_qnn.plugin")
