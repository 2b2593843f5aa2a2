"""int8 through handoff-xnnpack: ``partition --quantize int8`` with ExecuTorch's XNNPACKQuantizer,
lowered through ExecuTorch's quantized XNNPACK path, checked against the quantized eager model
(in quantization steps of the output, handoff.testing.TOLERANCE["int8"]), against fp32 eager
(SNR, top-1 agreement) and against ExecuTorch's own int8 XNNPACK program of the same graph.

MobileNetV2 int8 is measured by ``benchmarks/int8.py`` and tested by tests/test_int8_mobilenet.py (marker
``bench``, ``make bench``; its lowering takes minutes on 2 cores).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch.backends.xnnpack")
pytest.importorskip("tvm")

import handoff  # noqa: E402
from handoff import testing  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["small_cnn", "small_transformer"])
def test_zoo_model_int8_on_xnnpack(name, plugins):
    """Every node, quantize/dequantize ops included, runs on XNNPACK in one delegate, as int8."""
    zoo = plugins.zoo()[name]
    model = zoo.build()
    result = handoff.partition(model, testing.random_inputs(zoo.inputs), backends=["xnnpack"], fallback=False,
                               quantize="int8", calibration=4)
    report = result.report
    assert report.coverage("xnnpack") == 100.0 and report.stats["xnnpack"].partitions == 1
    note = report.quantization
    assert set(note["annotated_by"]) == {"xnnpack"} and note["annotated_by"]["xnnpack"].get("aten.linear.default")
    assert note["backends"]["xnnpack"]["qdq_ops"] > 0 and "QS8" in note["backends"]["xnnpack"]["compute"][0]
    program = result.to_bytes()
    acc = testing.check_int8(program, result.quantized, model, zoo.inputs)
    assert acc["max_steps"] <= testing.TOLERANCE["int8"]
    assert acc["snr_db"] > 15, acc  # int8 against fp32: measured ~30 dB (CNN) / ~25 dB (transformer)

    # ExecuTorch's own int8 XNNPACK program of the same converted graph: the same numbers
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    pte = to_edge_transform_and_lower(result.quantized.exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    method = Runtime.get().load_program(pte.buffer).load_method("forward")
    (step,) = testing.output_steps(result.quantized.reference)
    with handoff.load(program) as prog:
        for seed in (31, 32):
            x = testing.random_inputs(zoo.inputs, seed=seed)
            ours, theirs = prog.run(x)[0], method.execute(list(x))[0].numpy()
            # one XNNPACK kernel set, one graph: at most a rounding step apart (threading may differ)
            testing.assert_matches_quantized(ours, theirs, step, steps=1)


def test_int8_model_mixed_with_tvm(plugins):
    """xnnpack first, tvm second: XNNPACK's quantizer annotates everything it runs, the program
    stays whole on XNNPACK and tvm's quantizer has nothing left to annotate."""
    zoo = plugins.zoo()["small_cnn"]
    model = zoo.build()
    result = handoff.partition(model, testing.random_inputs(zoo.inputs), backends=["xnnpack", "tvm"], quantize="int8",
                               calibration=2)
    note = result.report.quantization
    assert note["annotated_by"]["tvm"] == {} and note["annotated_by"]["xnnpack"]
    assert result.report.coverage("xnnpack") == 100.0
    testing.check_int8(result.to_bytes(), result.quantized, model, zoo.inputs, seeds=(41, 42))



class _InvertedResidual(torch.nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, ReLU6 (hardtanh) after both, 1x1
    projection, residual add."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        nn, h = torch.nn, c * expand
        self.conv = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


def _tiny_mobilenet():
    """Stem, an inverted residual block, pooled classifier, its batch norms calibrated on random
    data (activations of unit scale, so ReLU6's clamp is reached, as in the zoo's MobileNetV2)."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                          _InvertedResidual(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.75, 1.25)
            m.bias.normal_(0, 0.1)
            m.momentum = None  # the running statistics become this batch's
        model.train()(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    return model.eval()


class _Eager:
    """The quantized eager model as a program (check_int8 then measures its own SNR vs fp32)."""

    def __init__(self, module):
        self.module = module

    def run(self, xs):
        with torch.no_grad():
            return [self.module(*xs).numpy()]


def test_mobilenet_block_int8_matches_executorch(plugins):
    """Regression (benchmarks/int8.py on MobileNetV2 failed check_int8 by 24-27 steps): the depthwise
    conv, ReLU6 and residual add pattern lowers whole to XNNPACK, and handoff's program gives
    ExecuTorch's own int8 program's numbers (MobileNetV2: bit-identical) and is as close to fp32 as
    the quantized eager model. Steps from the quantized eager model are not bounded: XNNPACK's
    in-kernel rounding (ExecuTorch's program, within a step of handoff's) is 7 steps from it on two
    such blocks with calibrated norms, 22-32 on MobileNetV2's 17."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    model, specs = _tiny_mobilenet(), [((1, 3, 16, 16), "float32")]
    result = handoff.partition(model, testing.random_inputs(specs), backends=["xnnpack"], fallback=False,
                               quantize="int8", calibration=2)
    assert result.report.coverage("xnnpack") == 100.0 and result.report.stats["xnnpack"].partitions == 1
    annotated = result.report.quantization["annotated_by"]["xnnpack"]
    assert annotated.get("aten.hardtanh.default") == 3 and annotated.get("aten.add.Tensor") == 1, annotated
    program = result.to_bytes()

    pte = to_edge_transform_and_lower(result.quantized.exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    method = Runtime.get().load_program(pte.buffer).load_method("forward")
    (step,) = testing.output_steps(result.quantized.reference)
    with handoff.load(program) as prog:
        for seed in (21, 22):
            x = testing.random_inputs(specs, seed=seed)
            testing.assert_matches_quantized(prog.run(x)[0], method.execute(list(x))[0].numpy(), step, steps=1)

    acc = testing.check_int8(program, result.quantized, model, specs, seeds=(23, 24), steps=float("inf"))
    ref = testing.check_int8(_Eager(result.quantized.reference), result.quantized, model, specs, seeds=(23, 24))
    assert acc["snr_db"] >= ref["snr_db"] - 0.5, (acc, ref)


class _FusedHead(torch.nn.Module):
    """conv -> relu (PT2E: dq -> conv -> relu -> q, no quantize between them), permute and reshape
    (shape ops), linear, and a softmax head no quantizer annotates (its output stays float)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x)).permute(0, 1, 3, 2).reshape(1, -1)
        return torch.softmax(self.fc(y), -1)


class _SharedQuantize(torch.nn.Module):
    """One quantize op (the conv's result) read by three dequantize ops: relu, cumsum (XNNPACK has
    no kernel for it: float, on tvm or the host) and sigmoid * x."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y), torch.cumsum(y, 1), y * y.sigmoid()


_GROUP_SPECS = [((1, 3, 8, 8), "float32")]


def _quantized(model):
    return handoff.quantize(model, testing.random_inputs(_GROUP_SPECS), backends=["xnnpack"], calibration=2)


@pytest.mark.parametrize("model,backends", [(_FusedHead, ["xnnpack"]), (_FusedHead, ["tvm"]),
                                            (_SharedQuantize, ["xnnpack"]), (_SharedQuantize, ["xnnpack", "tvm"])],
                         ids=["fused-head-xnnpack", "fused-head-tvm", "shared-q-xnnpack", "shared-q-xnnpack,tvm"])
def test_no_quantize_op_is_stranded_on_the_host(model, backends, plugins):
    """Non-direct PT2E shapes (fused activation, shape ops, float head, a quantize read by consumers
    on different backends): no quantize/dequantize op runs on the host, and the program is within
    TOLERANCE["int8"] steps of the quantized eager model."""
    model = model().eval()
    q = _quantized(model)
    result = handoff.partition(q.exported, backends=backends, fallback=False)
    report = result.report
    on_host = [d for d in report.declined if d["ran_on"] == "aten"]
    assert not [d for d in on_host if d["op"].startswith("quantized_decomposed")], on_host
    if model.__class__ is _SharedQuantize:  # only the float cumsum may leave XNNPACK
        assert [d["op"] for d in report.declined] == ["aten.cumsum.default"]
        assert report.declined[0]["ran_on"] == ("tvm" if "tvm" in backends else "aten")
    else:
        assert report.coverage(backends[0]) == 100.0 and report.stats[backends[0]].partitions == 1
    acc = testing.check_int8(result.to_bytes(), q, model, _GROUP_SPECS)
    assert acc["max_steps"] <= testing.TOLERANCE["int8"]


def test_int8_op_table_rows_are_claimed_and_match(tmp_path, monkeypatch):
    """handoff.testing's int8 one-op samples (dq -> conv/linear/add/relu -> q), each exported as
    ``handoff partition`` does, judged by XNNPACK's capability, lowered through ExecuTorch's
    quantized XNNPACK path and run by its runtime: every one claimed and within one output
    quantization step of eager torch; the 16-bit and per-channel-activation samples declined, and
    their lowering fails (XNNPACK has no tools/check_op_table.py; its float ops are covered by the
    conformance suite)."""
    import json

    from handoff.testing import check_op_table, int8_samples

    keep = testing.register_plugins("handoff_xnnpack.plugin").compiler("xnnpack", {}).ops_to_not_decompose()
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path / "home"))
    out = tmp_path / "rows.json"
    assert check_op_table("xnnpack", int8_samples(keep=keep), ["--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(r["verdict"] == "agree" for r in rows), rows
    assert [r["claimed"] for r in rows] == [True] * 4 + [False] * 3, rows
    # 16-bit activations and per-channel ones: declined with the reason, and the lowering does fail
    assert all("with dtype uint16: XNNPACK's quantized operators take int8 and uint8" in r["reason"] for r in rows[4:6])
    assert rows[6]["reason"] == "XNNPACK has no kernel for quantized_decomposed.quantize_per_channel.default", rows[6]
