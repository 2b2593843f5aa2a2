"""handoff's conformance suite against the vulkan backend as CI runs it (`handoff.conformance.check_ci`:
a cross-section of the catalogue, the zoo CNN, and the contract checks: the plugin and runtime
modules import neither torch nor the vendor SDK, foreign and corrupt blobs are refused, 4 threads
agree). The full catalogue: `pytest --handoff-backend vulkan`."""

from pathlib import Path

import pytest

from handoff.conformance import check_ci


@pytest.mark.slow
def test_conformance_suite():
    check_ci("vulkan", Path(__file__).with_name("conformance-xfail.yaml"))
