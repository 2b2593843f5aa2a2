"""Folding what a model computes from its weights alone (handoff.fold), alone and in partition()."""

from __future__ import annotations

import json

import numpy as np
import torch

import handoff
from handoff.export import export_model
from handoff.fold import GROWTH_BYTES, fold_constants, folding
from handoff.zoo import ResolvedModel


class ShiftedWindow(torch.nn.Module):
    """What swin computes from constants at every run, in small: a relative-position bias
    gathered by an int64 index buffer, an attention mask from ``arange``/``eq``/``where``, a roll
    (int64 ``arange``/``fmod`` indices after decomposition) and a transposed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(9, 2))
        self.register_buffer("index", torch.randint(0, 9, (16,)))
        self.weight = torch.nn.Parameter(torch.randn(4, 4) / 2)
        self.register_buffer("unused", torch.zeros(5))  # read by no node, as a batch norm's num_batches_tracked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table[self.index].t().reshape(2, 4, 4)
        ids = torch.arange(4)
        mask = torch.where(ids[:, None] == ids[None, :], 0.0, -1.0)
        y = torch.roll(x, shifts=1, dims=2) @ self.weight.t()
        return torch.softmax(y + bias + mask, dim=-1)


def _export(model: torch.nn.Module, *inputs: torch.Tensor, fold: bool = True):
    return export_model(ResolvedModel(name=type(model).__name__, module=model.eval(), example_inputs=inputs), fold=fold)


def _ops(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_what_depends_on_weights_alone_is_folded_and_the_program_still_matches_eager():
    torch.manual_seed(0)
    model = ShiftedWindow()
    unfolded = _export(model, torch.randn(1, 2, 4, 4), fold=False)
    ep = _export(model, torch.randn(1, 2, 4, 4))
    record = folding(ep)
    assert record is not None and record.nodes and record.constants and not record.kept
    for op in ("aten.arange.start_step", "aten.eq.Tensor", "aten.index.Tensor", "aten.permute.default"):
        assert op in _ops(unfolded) and op not in _ops(ep), op
    # the roll's index (arange + fmod) is folded too, and stored int32: it only indexes
    assert "aten.fmod.Scalar" not in _ops(ep)
    selects = [n for n in ep.graph.nodes if n.target is torch.ops.aten.index_select.default]
    assert selects and all(n.args[2].op == "placeholder" and n.args[2].meta["val"].dtype == torch.int32
                           and ep.constants[ep.graph_signature.inputs_to_lifted_tensor_constants[n.args[2].name]].dtype
                           == torch.int32 for n in selects)
    assert [n.args[2].meta["val"].dtype for n in unfolded.graph.nodes
            if n.target is torch.ops.aten.index_select.default] == [torch.int64]
    assert all(any(i.op == "placeholder" and i.name in ep.graph_signature.user_inputs or i.op == "call_function"
                   for i in n.all_input_nodes) for n in ep.graph.nodes if n.op == "call_function"
               and n.all_input_nodes), "a node left in the graph reads only constants"
    # weights that only folded nodes read leave the program; new constants are lifted constants
    sig = ep.graph_signature
    assert "p_table" not in sig.inputs_to_parameters and "b_index" not in sig.inputs_to_buffers
    assert set(record.constants.values()) <= set(sig.inputs_to_lifted_tensor_constants)
    assert record.removed_bytes == 9 * 2 * 4 + 16 * 8 + 4 * 4 * 4  # not the unused buffer: folding did not drop it
    assert "b_unused" in sig.inputs_to_buffers and "b_unused" in unfolded.graph_signature.inputs_to_buffers
    outs = []
    for seed in (1, 2):
        x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = model(x)
        got = ep.module()(x)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1])


def test_a_value_that_would_grow_the_program_too_much_stays_computed_and_says_why(sink_plugins):
    class Broadcast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(1, 64, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # float32[1, 64, 64, 65] stores 16,384 bytes more than 1 MiB over the 256-byte bias
            return x * self.bias.expand(1, 64, 64, 65).clone() + (self.bias * 2).sum()

    torch.manual_seed(0)
    model = Broadcast()
    ep = _export(model, torch.randn(1, 64, 64, 65))
    record = folding(ep)
    # the expand, sized before it is evaluated (and so the clone that reads it stays too)
    assert [k["op"] for k in record.kept] == ["aten.expand.default"]
    assert [k["bytes"] for k in record.kept] == [64 * 64 * 65 * 4]
    assert f"folding stores at most {GROWTH_BYTES} more" in record.kept[0]["reason"]
    assert "float32[1, 64, 64, 65]" in record.kept[0]["reason"]
    # the bias stays a weight; the small sum is folded
    assert {"aten.clone.default", "aten.expand.default"} <= _ops(ep) and "aten.sum.default" not in _ops(ep)
    assert "p_bias" in ep.graph_signature.inputs_to_parameters
    x = torch.randn(1, 64, 64, 65)
    with torch.no_grad():
        np.testing.assert_allclose(ep.module()(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    # and the delegation report says so
    from rich.console import Console

    report = handoff.partition(model, (x,), backends=[], fallback=False, use_cache=False).report
    assert [k["node"] for k in report.to_json()["folding"]["kept"]] == [k["node"] for k in record.kept]
    console = Console(record=True, width=400)
    report.render(console)
    assert f"not folded {record.kept[0]['node']} (aten.expand.default): its value, float32[1, 64, 64, 65]" \
        in console.export_text()


def test_a_huge_constant_is_sized_from_the_graph_and_never_allocated():
    """A model file is untrusted input: a 4 TiB ``full`` (a crafted .pt2 could hold one) stays a
    node of the graph; folding it would have allocated it at partition time."""

    class Huge(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.full((1 << 20, 1 << 20), 1.0).sum()

    ep = _export(Huge(), torch.randn(3))
    (kept,) = folding(ep).kept
    assert (kept["op"], kept["bytes"]) == ("aten.full.default", 1 << 42)
    assert "its value, float32[1048576, 1048576] (4398046511104 bytes), would store" in kept["reason"]
    assert "aten.full.default" in _ops(ep) and any(op.startswith("aten.sum.") for op in _ops(ep))


def test_dequantize_and_random_ops_are_not_folded():
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed

    class Int8Weight(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randint(-128, 127, (4, 4), dtype=torch.int8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = torch.ops.quantized_decomposed.dequantize_per_tensor(self.w, 0.05, 0, -128, 127, torch.int8)
            return torch.nn.functional.linear(x, w) + torch.rand(4)

    ep = _export(Int8Weight(), torch.randn(2, 4))
    assert "quantized_decomposed.dequantize_per_tensor.default" in _ops(ep)
    assert "aten.rand.default" in _ops(ep)
    assert ep.graph_signature.inputs_to_buffers  # the int8 weight stays int8
    assert not folding(ep).nodes


def test_a_constant_output_and_a_multi_output_op_fold():
    class Pieces(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 4))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a, b, c = self.w.unbind(0)
            return x * a + b, c * 2

    torch.manual_seed(0)
    model = Pieces()
    ep = _export(model, torch.randn(4))
    assert folding(ep).nodes and not any("unbind" in op or "split" in op for op in _ops(ep))
    x = torch.randn(4)
    with torch.no_grad():
        for got, want in zip(ep.module()(x), model(x)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_nothing_to_fold_returns_the_program_itself():
    ep = _export(torch.nn.ReLU(), torch.randn(3))
    assert fold_constants(ep) is ep and not folding(ep).nodes


def test_partition_folds_by_default_reports_it_and_runs_right(sink_plugins):
    torch.manual_seed(0)
    model = ShiftedWindow()
    inputs = (torch.randn(1, 2, 4, 4),)
    folded = handoff.partition(model, inputs, backends=[], fallback=False, use_cache=False)
    unfolded = handoff.partition(model, inputs, backends=[], fallback=False, use_cache=False, fold=False)
    report = folded.report.to_json()
    assert report["folding"]["nodes"] and report["folding"]["constants"]
    assert unfolded.report.to_json()["folding"] is None
    assert folded.assembled.manifest["metadata"]["folded"] is True
    assert unfolded.assembled.manifest["metadata"]["folded"] is False
    assert folded.report.total_nodes < unfolded.report.total_nodes
    json.dumps(report)
    from rich.console import Console

    console = Console(record=True, width=200)
    folded.report.render(console)
    text = console.export_text()
    constants = len(set(report["folding"]["constants"].values()))
    assert f"folded {len(report['folding']['nodes'])} node(s) computed from weights alone into {constants} constant(s)" \
        in text, text
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        want = model(x).numpy()
    for result in (folded, unfolded):
        with handoff.load(result.to_bytes(sign=False)) as program:
            np.testing.assert_allclose(program.run([x.numpy()])[0], want, rtol=1e-5, atol=1e-6)


def test_the_same_value_computed_many_times_is_stored_once():
    class Unrolled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8) / 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(1, 8)
            for step in range(4):  # each step's linear transposes the same weight
                h = torch.tanh(torch.nn.functional.linear(x[:, step] + h, self.w))
            return h

    torch.manual_seed(0)
    model = Unrolled()
    ep = _export(model, torch.randn(1, 4, 8))
    record = folding(ep)
    transposes = [n for n in record.nodes if n.startswith("permute")]
    assert len(transposes) == 4 and len({record.constants[n] for n in transposes}) == 1
    assert record.removed_bytes == 8 * 8 * 4 and record.added_bytes == 8 * 8 * 4 + 8 * 4  # and the zeros h
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        np.testing.assert_allclose(ep.module()(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
