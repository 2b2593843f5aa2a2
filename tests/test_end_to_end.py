"""Zoo models through the real TVM backend, compared with eager PyTorch on fresh random inputs
(tolerances per dtype: handoff.testing.TOLERANCE; float32 within 1e-4 relative)."""

from __future__ import annotations

import pytest
import torch

import handoff
from handoff.testing import assert_matches_eager, check_against_eager

pytestmark = pytest.mark.slow


def _check_zoo(name: str, tmp_path, **kwargs) -> handoff.PartitionResult:
    plugins = handoff.get_plugins()
    zoo = plugins.zoo()[name]
    model = zoo.build()
    result = handoff.partition(f"zoo:{name}", **kwargs)
    path = tmp_path / f"{name}.hof"
    result.write(str(path))
    check_against_eager(path, model, zoo.inputs)
    return result


@pytest.mark.parametrize("name", ["small_cnn", "small_transformer"])
def test_zoo_model_on_tvm_matches_eager(name, tmp_path):
    result = _check_zoo(name, tmp_path)
    assert result.report.coverage("tvm") == 100.0


def test_op_tvm_cannot_import_runs_as_host_aten(tmp_path):
    class WithBessel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = torch.relu(self.fc(x))
            return torch.special.i1e(y) + y  # TVM 0.27's importer has no converter for i1e

    torch.manual_seed(0)
    model = WithBessel().eval()
    result = handoff.partition(model, (torch.randn(4, 8),), backends=[])
    host = result.report.stats["aten"]
    assert host.ops == {"aten.special_i1e.default": 1}
    declined = [d for d in result.report.declined if d["op"] == "aten.special_i1e.default"]
    assert declined and declined[0]["ran_on"] == "aten" and "converter" in declined[0]["reasons"]["tvm"]
    with handoff.load(result.to_bytes()) as program:
        x = torch.randn(4, 8)
        (got,) = program.run([x])
    with torch.no_grad():
        assert_matches_eager(got, model(x))
    with pytest.raises(handoff.HandoffError, match=r"--no-aten\): .*special_i1e.*tvm: "):
        handoff.partition(model, (torch.randn(4, 8),), backends=[], aten=False)


def test_an_input_cast_lowers_and_runs(tmp_path):
    """``x.to(dtype)`` on an input exports an ``_assert_tensor_metadata`` node with no users; it is
    dropped, not planned as a partition of its own that no backend can build."""
    class CastsItsInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x.to(torch.float32))

    torch.manual_seed(0)
    model = CastsItsInput().eval()
    exported = torch.export.export(model, (torch.randn(2, 8),))
    assert any("_assert_tensor_metadata" in str(n.target) for n in exported.graph.nodes)
    result = handoff.partition(exported, backends=["tvm"], fallback=False)
    assert result.report.coverage("tvm") == 100.0
    path = tmp_path / "cast.hof"
    result.write(str(path))
    check_against_eager(path, model, [((2, 8), "float32")])


def test_aarch64_program_is_built_and_refused_here(tmp_path):
    import shutil

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("gcc-aarch64-linux-gnu not installed (make installs it)")
    result = handoff.partition("zoo:small_cnn", options={"tvm": {"target": "aarch64"}})
    path = tmp_path / "arm.hof"
    result.write(str(path))
    from handoff.program import ProgramFile

    with ProgramFile.open(str(path)) as pf:
        (delegate,) = pf.manifest["delegates"]
        assert delegate["metadata"]["triple"] == "aarch64-linux-gnu"
        blob = bytes(pf.segment(delegate["segment"]))
    assert blob[:4] == b"\x7fELF" and int.from_bytes(blob[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(handoff.HandoffError, match="aarch64"):
        handoff.load(path)
