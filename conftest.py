"""Repository-wide pytest settings.

In CI (``CI`` set), every dependency is installed by ``make``, so a skipped test means a missing
install step or a broken environment, not an optional feature: the run fails and says which. The
one exception is by design: a conformance item whose backend's runtime does not support this
platform at all (Core ML's predictions need macOS) skips its run half, its lowering still checked.

Under pytest-xdist (``make test`` runs ``-n 2``) each worker process gets its own temporary
directory (``TMPDIR``, inherited by the subprocesses tests start): tests that look in the default
temporary directory for what a process left behind must see only their own worker's files.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from handoff.conformance.plugin import UNSUPPORTED_PLATFORM

_WORKER_TMPDIR = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        config.stash[_WORKER_TMPDIR] = os.environ["TMPDIR"] = tempfile.mkdtemp(prefix=f"pytest-{worker}-")
        tempfile.tempdir = None  # gettempdir() caches its first answer: look again


def pytest_unconfigure(config: pytest.Config) -> None:
    if _WORKER_TMPDIR in config.stash:
        shutil.rmtree(config.stash[_WORKER_TMPDIR], ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Under xdist the controller sees every worker's reports; a worker's own stats are not shown.
    if not os.environ.get("CI") or hasattr(session.config, "workerinput"):
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
