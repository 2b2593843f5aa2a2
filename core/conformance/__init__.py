"""handoff's backend conformance suite: a pytest plugin (``pytest --handoff-backend NAME``, see
:mod:`handoff.conformance.plugin` and docs/plugin-guide.md) and :func:`run_suite`, which a
backend's own tests call to run the suite against it in a child pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

#: A small cross-section of the catalogue (one case or two per family, a block, a zoo model) for
#: CI runs that cannot afford the whole catalogue on every commit.
CI_CASES = ("add,gelu,conv2d,max_pool2d,layer_norm,linear,softmax,cat,quantized_linear,conv_bn_relu,"
            "zoo_small_cnn")


def run_suite(backend: str, args: Sequence[str] = (), autoload: bool = True, timeout: float = 1800
              ) -> tuple[int, dict[str, Any], str]:
    """Run the suite against ``backend`` in a child ``pytest`` with extra ``args``; installed
    plugins are autoloaded there unless ``autoload`` is false (a built-in backend's tests).

    :returns: pytest's exit status, the JSON report (``{}`` when none was written) and the
        child's output (stdout, then stderr).
    """
    child = {k: v for k, v in os.environ.items() if k not in ("HANDOFF_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")}
    if not autoload:
        child["HANDOFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    with tempfile.TemporaryDirectory(prefix="handoff-suite-") as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                               "--rootdir", tmp, "-c", os.devnull, "--handoff-backend", backend,
                               "--handoff-report", str(report), *args],
                              cwd=tmp, env=child, capture_output=True, text=True, timeout=timeout)
        data = json.loads(report.read_text()) if report.exists() else {}
    return proc.returncode, data, proc.stdout + proc.stderr


def check_ci(backend: str, xfail: str | Path, autoload: bool = True) -> dict[str, Any]:
    """The suite as a backend's CI runs it: :data:`CI_CASES` in float32, fixed and one drawn
    example (seed 2026, so reruns agree), with the backend's strict ``xfail`` file. Raises
    ``AssertionError`` with the suite's output unless every item and contract check passes (or is
    a listed known failure) and at least five cases ran; returns the backend's report."""
    status, report, output = run_suite(backend, ["--handoff-cases", CI_CASES, "--handoff-dtypes", "float32",
                                                 "--handoff-examples", "1", "--handoff-seed", "2026",
                                                 "--handoff-xfail", str(xfail)], autoload=autoload)
    if status != 0:
        raise AssertionError(f"conformance suite against {backend}: pytest exit {status}\n{output[-6000:]}")
    result = report["backends"][backend]
    bad = {k: c for k, c in result["contract"].items() if c["status"] not in ("passed", "xfailed")}
    if bad or result["summary"].get("passed", 0) < 5:
        raise AssertionError(f"conformance suite against {backend}: contract {bad}, summary {result['summary']}")
    return result
