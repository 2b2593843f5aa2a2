"""torchvision models nobody here wrote (random init) through ``--backends xnnpack``, and the
capability work they needed: ``split_with_sizes`` rewritten into slices, the constants Edge makes
for scalar operands folded, and verdicts taken from the Edge nodes that compute a node's value.

MobileNetV3-small and ShuffleNetV2 run as one XNNPACK delegate each, no more than ExecuTorch's own
``to_edge_transform_and_lower`` + ``XnnpackPartitioner`` makes of them (1 and 15), within the fp32
tolerance of eager on fresh random inputs. The wider sweep over a dozen torchvision models is
``python benchmarks/torchvision_vs_executorch.py --sweep`` (too slow for CI on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the helpers shared with benchmarks/torchvision_vs_executorch.py
    sys.path.insert(0, str(BENCHMARKS))

torch = pytest.importorskip("torch")
pytest.importorskip("executorch.backends.xnnpack")
pytest.importorskip("tvm")
from torch import nn  # noqa: E402

import handoff  # noqa: E402
from handoff.testing import check_against_eager  # noqa: E402
from handoff_xnnpack.compiler import XnnpackCompiler  # noqa: E402
from handoff_xnnpack.rewrites import rewrite  # noqa: E402

pytestmark = pytest.mark.slow  # every test compiles with ExecuTorch's XNNPACK toolchain


@pytest.fixture(scope="module")
def compiler() -> XnnpackCompiler:
    return XnnpackCompiler({})


def _export(compiler: XnnpackCompiler, model: nn.Module, *example: torch.Tensor) -> torch.export.ExportedProgram:
    """As the core exports for xnnpack: core ATen, XNNPACK's ops kept whole."""
    table = torch.export.default_decompositions()
    for op in compiler.ops_to_not_decompose():
        table.pop(op, None)
    return torch.export.export(model.eval(), example).run_decompositions(table)


class Splits(nn.Module):
    """torch.split and chunk (both split_with_sizes in core ATen) on several dims, uneven pieces."""

    def forward(self, x):
        a, b, c = torch.split(x, [2, 3, 1], dim=1)
        d, e = x.chunk(2, dim=-1)
        return torch.cat([c, a * 2, b], 1), (d - e).relu()


def test_split_rewritten_into_slices_matches_eager(compiler):
    ep = _export(compiler, Splits(), torch.randn(2, 6, 4))
    rewritten = rewrite(ep)
    targets = {n.target for n in rewritten.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.split_with_sizes.default not in targets and torch.ops.aten.slice.Tensor in targets
    x = torch.randn(2, 6, 4)
    for got, want in zip(rewritten.module()(x), Splits()(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # slices copy: bit for bit
    assert all(v is None for v in compiler.support(ep).values())


class HardSigmoidGate(nn.Module):
    """MobileNetV3's squeeze-excitation gate: hardsigmoid decomposes to ``(x + 3).clamp(0, 6) / 6``,
    whose integer scalars Edge makes into int64 tensors cast to float32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x * nn.functional.hardsigmoid(self.conv(x))


def test_scalar_operands_folded_and_claimed(compiler, plugins):
    """Without the fold, ExecuTorch leaves two int64 -> float32 copies outside its delegate, and
    handoff declined the add and div for them; folded, XNNPACK takes every node, in one delegate."""
    torch.manual_seed(0)
    model = HardSigmoidGate().eval()
    ep = _export(compiler, model, torch.randn(1, 4, 8, 8))
    ops = {n.name: n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert {torch.ops.aten.add.Tensor, torch.ops.aten.div.Tensor} <= set(ops.values())
    assert compiler.support(ep) == dict.fromkeys(ops)
    result = handoff.partition(model, (torch.randn(1, 4, 8, 8),), backends=["xnnpack"])
    assert result.report.declined == [] and result.report.stats["xnnpack"].partitions == 1
    check_against_eager(result.to_bytes(), model, [((1, 4, 8, 8), "float32")])


class ScaledWeight(nn.Module):
    """A weight computed from a parameter in forward (``w * 0.5``): an ATen node of weights alone,
    which the fold turns into a constant. It then runs wherever its user runs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.cumsum(x @ (self.w * 0.5), 1), x @ (self.w * 2.0).t()


def test_node_of_weights_alone_follows_its_users(compiler, plugins):
    """``w * 2`` feeds a matmul XNNPACK runs: claimed (folded into a constant of that delegate).
    ``w * 0.5`` feeds one too. Only the cumsum is declined, with XNNPACK's reason."""
    torch.manual_seed(0)
    model = ScaledWeight().eval()
    ep = _export(compiler, model, torch.randn(2, 8))
    verdict = compiler.support(ep)
    ops = {n.name: n.target for n in ep.graph.nodes if n.op == "call_function"}
    declined = {name: why for name, why in verdict.items() if why is not None}
    assert declined == {name: "XNNPACK has no kernel for aten.cumsum.default"
                        for name, op in ops.items() if op == torch.ops.aten.cumsum.default}
    # min size 1: the small xnnpack partitions here are what is tested, not the island rule
    result = handoff.partition(model, (torch.randn(2, 8),), backends=["xnnpack", "tvm"],
                               default_limits=handoff.Limits(1))
    assert [d["op"] for d in result.report.declined] == ["aten.cumsum.default"]
    check_against_eager(result.to_bytes(), model, [((2, 8), "float32")])


# -- torchvision ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_torchvision_model_is_one_xnnpack_delegate(name, plugins):
    """The issue's two models at 1x3x64x64: every node on XNNPACK (nothing declined), in no more
    delegates than ExecuTorch's own partitioner makes, and within the fp32 tolerance of eager."""
    import torchvision_vs_executorch as tv

    model, inputs = tv.build(name, 64)
    result = handoff.partition(model, inputs, backends=["xnnpack"])
    report = result.report
    assert report.declined == [], report.declined
    _, executorch_runs = tv.executorch_program(model, inputs, emit=False)
    assert report.stats["xnnpack"].partitions == 1 <= executorch_runs["XnnpackBackend delegates"]
    check_against_eager(result.to_bytes(), model, [(tuple(inputs[0].shape), "float32")])
