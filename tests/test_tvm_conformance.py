"""handoff's conformance suite against the built-in tvm backend as CI runs it
(``handoff.conformance.check_ci``: a cross-section of the catalogue, the zoo CNN, and the contract
checks: neither ``handoff.tvm.plugin`` nor the runtime module imports torch or TVM's compiler;
foreign and corrupt blobs are refused; 4 threads agree). Installed plugins stay out (autoload off).
The full catalogue: ``pytest --handoff-backend tvm``."""

from pathlib import Path

import pytest

from handoff.conformance import check_ci


@pytest.mark.slow
def test_conformance_suite():
    check_ci("tvm", Path(__file__).with_name("tvm-conformance-xfail.yaml"), autoload=False)
