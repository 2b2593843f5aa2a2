"""Repository-wide pytest settings.

In CI (``CI`` set), every dependency is installed by ``make``, so a skipped test means a missing
install step or a broken environment, not an optional feature: the run fails and says which. The
one exception is by design: a conformance item whose backend's runtime does not support this
platform at all (Core ML's predictions need macOS) skips its run half, its lowering still checked.
"""

from __future__ import annotations

import os

import pytest

from handoff.conformance.plugin import UNSUPPORTED_PLATFORM


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [r for r in (reporter.stats.get("skipped", []) if reporter else [])
               if not any(key == UNSUPPORTED_PLATFORM for key, _ in getattr(r, "user_properties", ()))]
    if skipped:
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reporter.write_line(f"CI: skipped {report.nodeid}: {reason}")
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; in CI everything they need is installed, so this fails")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
