"""Fallback copies with a real vendor backend: ``--backends xnnpack --fallback-copies`` stores a
tvm copy of each XNNPACK delegate; a runtime without handoff-xnnpack installed runs the copies
(one warning naming xnnpack and why), one with it runs XNNPACK, and ``strict`` refuses. Outputs
equal eager within handoff.testing's tolerance either way."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch.backends.xnnpack")
pytest.importorskip("tvm")

import handoff  # noqa: E402
from handoff.testing import check_against_eager  # noqa: E402

pytestmark = pytest.mark.slow


def test_xnnpack_program_runs_its_tvm_copies_where_xnnpack_is_not_installed(plugins, tmp_path):
    with_xnnpack = plugins  # the built-ins and handoff-xnnpack (tests/conftest.py)
    zoo = with_xnnpack.zoo()["small_cnn"]
    model, specs = zoo.build(), zoo.inputs
    result = handoff.partition("zoo:small_cnn", backends=["xnnpack"], plugins=with_xnnpack, fallback_copies=True)
    delegates = result.assembled.manifest["delegates"]
    assert [d["backend"] for d in delegates] == ["xnnpack"]
    assert [c["backend"] for c in delegates[0]["fallbacks"]] == ["tvm"]
    assert result.report.copies[0]["copy"] == "tvm" and result.report.copies[0]["bytes"] > 0
    path = tmp_path / "cnn.hof"
    result.write(str(path))  # signed by the local key: the tvm copy's native code is trusted here

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = handoff.load(path, plugins=with_xnnpack)
    with program:
        assert not [w for w in caught if issubclass(w.category, handoff.FallbackWarning)]
        check_against_eager(program, model, specs)
        assert [(d["copy"], d["runtime"]) for d in program.stats()["delegates"]] == [(None, "xnnpack")]

    without = handoff.Plugins(autoload=False)  # a device without handoff-xnnpack
    with pytest.warns(handoff.FallbackWarning) as warned:
        program = handoff.load(path, plugins=without)
    with program:
        check_against_eager(program, model, specs)
        (stats,) = program.stats()["delegates"]
    assert len(warned) == 1
    assert str(warned[0].message).startswith(f"{path}: delegate 0 (xnnpack_0, backend 'xnnpack') runs its fallback "
                                             f"copy 0 (backend 'tvm') because backend 'xnnpack' not installed")
    assert (stats["backend"], stats["copy"], stats["runtime"]) == ("xnnpack", 0, "tvm")

    with pytest.raises(handoff.HandoffError, match=r"delegate 0 needs backend 'xnnpack' not installed.*; strict: "
                                                   r"its fallback copy \(backend 'tvm'\) not used"):
        handoff.load(path, plugins=without, strict=True)
