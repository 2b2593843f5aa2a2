"""Isolation for handoff-vulkan's tests (:mod:`handoff.testing`): only the plugins a test registers
(never every installed one), caches in a temporary HANDOFF_HOME shared by this session (so a
partition compiled by one test is reused by the next)."""

from __future__ import annotations

from handoff.testing import handoff_home, isolated_plugins, plugin_tests, use_plugins  # noqa: F401

plugin_tests(__file__)
