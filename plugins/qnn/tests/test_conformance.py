"""handoff's conformance suite against the qnn backend: CI's cross-section of the catalogue
(`handoff.conformance.CI_CASES`) in float32 at fixed and drawn dimensions, the zoo CNN and the
contract checks (the plugin and runtime modules import neither torch nor the vendor SDK, foreign
and corrupt blobs are refused, 4 threads agree). The full catalogue: `pytest --handoff-backend qnn`."""

from pathlib import Path

import pytest

from handoff.conformance import CI_CASES, run_suite


@pytest.mark.slow
def test_conformance_suite():
    status, report, output = run_suite("qnn", ["--handoff-cases", CI_CASES, "--handoff-dtypes", "float32",
                                              "--handoff-examples", "1", "--handoff-seed", "2026", "--handoff-xfail",
                                              str(Path(__file__).with_name("conformance-xfail.yaml"))])
    assert status == 0, output[-6000:]
    backend = report["backends"]["qnn"]
    assert all(c["status"] in ("passed", "xfailed") for c in backend["contract"].values()), backend["contract"]
    assert backend["summary"].get("passed", 0) >= 5, backend["summary"]
