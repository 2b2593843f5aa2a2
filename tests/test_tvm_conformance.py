"""handoff's conformance suite against the built-in tvm backend: CI's cross-section of the
catalogue (``handoff.conformance.CI_CASES``) in float32 at fixed and drawn dimensions, the zoo CNN
and the contract checks (neither ``handoff.tvm.plugin`` nor the runtime module imports torch or
TVM's compiler; foreign and corrupt blobs are refused; 4 threads agree). Installed plugins stay
out (autoload off). The full catalogue: ``pytest --handoff-backend tvm``."""

from pathlib import Path

import pytest

from handoff.conformance import CI_CASES, run_suite


@pytest.mark.slow
def test_conformance_suite():
    status, report, output = run_suite("tvm", ["--handoff-cases", CI_CASES, "--handoff-dtypes", "float32",
                                               "--handoff-examples", "1", "--handoff-seed", "2026", "--handoff-xfail",
                                               str(Path(__file__).with_name("tvm-conformance-xfail.yaml"))],
                                       autoload=False)
    assert status == 0, output[-6000:]
    backend = report["backends"]["tvm"]
    assert all(c["status"] in ("passed", "xfailed") for c in backend["contract"].values()), backend["contract"]
    assert backend["summary"].get("passed", 0) >= 5, backend["summary"]
