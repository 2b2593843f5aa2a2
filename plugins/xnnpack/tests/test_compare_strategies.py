"""handoff compare with real backends: XNNPACK (this plugin) against TVM on a zoo model, each
program measured in its own worker process and checked against eager PyTorch, whole and per
delegate. Tolerances: handoff.testing.TOLERANCE (fp32: 1e-4 relative of eager)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch.backends.xnnpack")
pytest.importorskip("tvm")

from handoff.compare import OK, compare  # noqa: E402
from handoff.strategies import parse  # noqa: E402
from handoff.testing import TOLERANCE  # noqa: E402

pytestmark = pytest.mark.slow


def test_compare_xnnpack_and_tvm_on_a_zoo_model(plugins):
    result = compare("zoo:small_cnn", [parse("xnnpack"), parse("tvm")], runs=6, rounds=2, warmup=1,
                     per_delegate=True, plugins=plugins)
    xnn, tvm = result.strategies
    for s in (xnn, tvm):
        assert s.status == OK, s.reason
        assert sum(s.coverage.values()) == pytest.approx(100.0, abs=0.05)
        assert s.snr_db > 60  # noise under a millionth of the signal's power
        assert all(d["relative_error"] <= TOLERANCE["float32"] for d in s.per_delegate)
        assert len(s.samples_ms) == 6 and s.load_ms > 0 and s.program_bytes > 0 and s.compile_seconds > 0
        assert s.per_delegate and all("skipped" not in d and not d["mismatch"] for d in s.per_delegate)
    assert xnn.coverage == {"xnnpack": 100.0} and xnn.delegates == {"xnnpack": 1}
    assert tvm.coverage == {"tvm": 100.0}
    assert xnn.per_delegate[0]["ops"]["aten.convolution.default"] == 4
