"""int8 through handoff-qnn: ``partition --quantize int8`` with ExecuTorch's QnnQuantizer (HTP's
rules), each dequantize -> op -> quantize group lowered as an ONNX QDQ node unit and compiled by
onnxruntime-qnn into an HTP context binary with integer kernels, run on the HTP emulator.

Checked against the quantized eager model (the converted PT2E module) in quantization steps of
the output, and against fp32 eager (SNR, top-1 agreement): the program must be as close to fp32
as the quantized eager model is (HTP's integer softmax, layer norm and GELU round differently
from float compute + quantize, so a transformer's output moves by a few steps either way).

MobileNetV2 int8 on qnn is tested by tests/test_int8_mobilenet.py (marker ``bench``, ``make bench``:
its partition takes minutes).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime_qnn")
pytest.importorskip("torchao")
pytest.importorskip("executorch.backends.qualcomm.quantizer.quantizer")

import handoff  # noqa: E402
from handoff import testing  # noqa: E402



def _quantized_on_qnn(name, backends=("qnn",), **options):
    pm = testing.register_plugins(*[f"handoff_{b}.plugin" for b in backends])
    zoo = pm.zoo()[name]
    model = zoo.build()
    result = handoff.partition(model, testing.random_inputs(zoo.inputs), backends=list(backends), fallback=False,
                               quantize="int8", calibration=2, options={"qnn": options})
    return zoo, model, result


def _check(zoo, model, result, steps):
    """Both references; returns the program's and the quantized eager model's numbers."""
    acc = testing.check_int8(result.to_bytes(), result.quantized, model, zoo.inputs, seeds=(21, 22, 23), steps=steps)
    ref = testing.check_int8(result.quantized.reference, result.quantized, model, zoo.inputs,
                             seeds=(21, 22, 23))
    assert acc["snr_db"] >= ref["snr_db"] - 0.5, (acc, ref)  # as close to fp32 as the quantized eager model
    assert acc["top1_agreement"] >= ref["top1_agreement"] - 0.34, (acc, ref)
    return acc, ref


@pytest.mark.slow
@pytest.mark.parametrize("name, backends, steps", [
    ("small_cnn", ("qnn", "xnnpack"), testing.TOLERANCE["int8"]),  # measured 2 steps
    ("small_transformer", ("qnn",), 8),  # measured 7: HTP's integer softmax / layer norm / GELU
])
def test_zoo_model_int8_on_qnn(name, backends, steps):
    """Every node, quantize/dequantize ops included, in one HTP delegate computing in integers.
    With ``qnn,xnnpack`` (priority order) qnn's quantizer annotates every op, and the report
    says so: xnnpack's annotates none."""
    if "xnnpack" in backends:
        pytest.importorskip("executorch.backends.xnnpack")
    zoo, model, result = _quantized_on_qnn(name, backends)
    report = result.report
    assert report.coverage("qnn") == 100.0 and report.stats["qnn"].partitions == 1
    note = report.quantization
    assert note["annotated_by"]["qnn"].get("aten.linear.default")
    assert all(note["annotated_by"][b] == {} for b in backends[1:]), note["annotated_by"]
    assert note["backends"]["qnn"]["qdq_ops"] > 0
    assert note["backends"]["qnn"]["compute"] == [
        "HTP integer kernels (uint8 activations, int8 weights): the QNN EP fuses each ONNX DequantizeLinear -> "
        "op -> QuantizeLinear unit"]
    _check(zoo, model, result, steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small_cnn", "small_transformer"])
def test_16bit_activations_on_qnn(name):
    """``qnn.activation_bits=16`` (HTP's 16a8w): uint16 QDQ (ONNX opset 21), whole on HTP in one
    delegate. The transformer needs the quantizer's legalization (QnnQuantizer's int16 MatMul
    operand and int16 LayerNorm scale are refused by HTP: made uint16 and uint8). A 16-bit step is
    1/256 of an 8-bit one over the same range: allowed 3 8-bit steps (measured: small_cnn 83
    16-bit steps, small_transformer 189, i.e. 0.33 and 0.74 of an 8-bit step)."""
    zoo, model, result = _quantized_on_qnn(name, activation_bits="16")
    assert result.report.coverage("qnn") == 100.0 and result.report.stats["qnn"].partitions == 1
    assert result.report.quantization["backends"]["qnn"]["compute"] == [
        "HTP integer kernels (uint16 activations, int8 weights): the QNN EP fuses each ONNX DequantizeLinear -> "
        "op -> QuantizeLinear unit"]
    steps = testing.output_steps(result.quantized.reference)
    assert steps[0] < 1e-3  # a 16-bit step, not an 8-bit one
    _check(zoo, model, result, steps=testing.TOLERANCE["int8"] * 256)


# -- capability, without compiling ----------------------------------------------------------------
class _Qdq(torch.nn.Module):
    """quantize -> dequantize with the given range and dtype, then a ReLU."""

    def __init__(self, qmin, qmax, dtype):
        super().__init__()
        self.args = (qmin, qmax, dtype)

    def forward(self, x):
        q = torch.ops.quantized_decomposed.quantize_per_tensor(x, 0.05, 0, *self.args)
        return torch.relu(torch.ops.quantized_decomposed.dequantize_per_tensor(q, 0.05, 0, *self.args))


@pytest.mark.parametrize("qmin, qmax, dtype, reason", [
    (0, 255, torch.uint8, None),
    (-32768, 32767, torch.int16, None),
    (-127, 127, torch.int8, "clamps to [-127, 127], narrower than int8's range"),
    (0, 65535, torch.int32, "HTP's QDQ path takes uint8, int8, uint16, int16"),
])
def test_quantize_ops_claimed_or_declined_with_reason(qmin, qmax, dtype, reason):
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed)

    from handoff_qnn import ops
    from handoff_qnn._format import compile_target

    ep = torch.export.export(_Qdq(qmin, qmax, dtype), (torch.randn(1, 4),))
    got = ops.support(ep, compile_target({}))
    why = got["quantize_per_tensor"]
    assert (why is None) if reason is None else (reason in why), why
    # its dequantize follows it: alone, an 8/16-bit DequantizeLinear would fall to the CPU EP
    # (its own reason, or the quantize's: "reads quantize_per_tensor, which QNN HTP does not take (...)")
    after = got["dequantize_per_tensor"]
    assert (after is None) if reason is None else (reason in after), after
    assert got["relu"] is None


class _SixteenBit(torch.nn.Module):
    """uint16 activations into a layer norm whose scale is int16 (QnnQuantizer's own 16a8w choice)
    and a bmm of uint16 by int16 (its choice for a MatMul's second operand)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.rand(8) + 0.5)

    def forward(self, x, y):
        q = torch.ops.quantized_decomposed

        def u16(t, scale=1e-3):
            return q.dequantize_per_tensor(q.quantize_per_tensor(t, scale, 30000, 0, 65535, torch.uint16),
                                           scale, 30000, 0, 65535, torch.uint16)

        def i16(t):
            return q.dequantize_per_tensor(q.quantize_per_tensor(t, 1e-3, 0, -32768, 32767, torch.int16),
                                           1e-3, 0, -32768, 32767, torch.int16)

        n = u16(torch.nn.functional.layer_norm(u16(x), (8,), i16(self.scale)))
        return u16(torch.bmm(n.view(1, 4, 8), i16(y)), 1e-2)


def test_16bit_encodings_htp_refuses_are_declined_with_reason():
    """Measured on the HTP emulator: LayerNorm with 16-bit activations takes only a uint8 scale,
    MatMul refuses uint16 by int16. A graph quantized elsewhere with those encodings is declined
    there with the reason, instead of failing the partition's compile."""
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed)

    from handoff_qnn import ops
    from handoff_qnn._format import compile_target

    ep = torch.export.export(_SixteenBit(), (torch.randn(4, 8), torch.randn(1, 8, 4))).run_decompositions()
    got = ops.support(ep, compile_target({}))
    norm = next(k for k in got if k.startswith("native_layer_norm"))
    assert "takes only a uint8 scale" in got[norm], got
    assert "MatMul of uint16 by int16" in got["bmm"], got


def test_bisection_keeps_each_quantized_unit_whole():
    """check_partition's bisection (first_failing's ``together``) ties each op to what it reads
    from weights, its result's quantize and that quantize's dequantize users; an input's quantize
    to its dequantize: every cut falls after a dequantize, where float crosses."""
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed)

    from handoff_qnn.compiler import _qdq_units

    ep = torch.export.export(_SixteenBit(), (torch.randn(4, 8), torch.randn(1, 8, 4))).run_decompositions()
    by_name = {n.name: n for n in ep.graph.nodes}
    group = [n.name for n in ep.graph.nodes if n.op == "call_function"]
    order, units = _qdq_units(ep, group, by_name)
    assert sorted(order) == sorted(group)
    norm = next(n for n in group if n.startswith("native_layer_norm"))
    q_out = next(u for g in by_name[norm].users for u in g.users if "quantize" in u.name)  # through getitem
    scale_dq = by_name[norm].args[2].name  # dequantize of the quantized buffer: weights alone
    assert {norm, q_out.name, *(d.name for d in q_out.users), scale_dq} <= set(units[norm])
    assert units[q_out.name] is units[norm]
    first = order[0]  # the quantize of input x (before the scale's weight path), with its dequantize
    assert units[first] == [first, *(u.name for u in by_name[first].users)]
    assert by_name[norm].args[0].name not in units[norm]  # x's dequantize: the cut after it is clean


# -- a 16-bit graph cut where qnn declines a unit ----------------------------------------------------
class _LinearNormLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)
        with torch.no_grad():  # random statistics: a norm that is not the identity
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


def _uint16_activations_only(model):
    """QnnQuantizer's 16a8w annotations with only its int32-carried activations made uint16: its
    own int16 LayerNorm scale stays, as in a graph quantized elsewhere, and HTP refuses it there."""
    import dataclasses

    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    def legal(spec):
        if isinstance(spec, QuantizationSpec) and spec.dtype == torch.int32 and (spec.quant_min, spec.quant_max) == (0, 65535):
            return dataclasses.replace(spec, dtype=torch.uint16)
        return spec

    for node in model.graph.nodes:
        note = node.meta.get(Q_ANNOTATION_KEY)
        if note is not None:
            note.input_qspec_map = {k: legal(v) for k, v in note.input_qspec_map.items()}
            note.output_qspec = legal(note.output_qspec)


@pytest.mark.slow
@pytest.mark.parametrize("backends, norm_on", [(("qnn",), "aten"), (("qnn", "tvm"), "tvm")])
def test_16bit_cut_where_qnn_declines_a_unit_is_written_and_runs(monkeypatch, backends, norm_on):
    """16a8w Linear -> LayerNorm -> Linear with an int16 LayerNorm scale: qnn declines the
    LayerNorm's unit (dequantize -> layer_norm -> quantize), runs both Linear units, and the cut
    between them carries uint16 (program format 1.5): qnn's first delegate ends with its quantize,
    the LayerNorm unit runs on the host's quantize/dequantize ops or on tvm (uint16 in and out),
    qnn's second delegate starts with its dequantize. Loaded, run, and compared with the quantized
    eager model in 16-bit steps (measured 24, i.e. 0.09 of an 8-bit step; HTP's integer Linear)."""
    from handoff_qnn import quantizer

    monkeypatch.setattr(quantizer, "_legalize_16a8w", _uint16_activations_only)
    testing.register_plugins("handoff_qnn.plugin")
    torch.manual_seed(0)
    model = _LinearNormLinear().eval()
    specs = [((4, 16), "float32")]
    result = handoff.partition(model, testing.random_inputs(specs), backends=list(backends), fallback=False,
                               quantize="int8", calibration=2, options={"qnn": {"activation_bits": "16"}})
    report = result.report
    assert report.stats["qnn"].partitions == 2
    norm = next(d for d in report.declined if d["node"].startswith("native_layer_norm"))
    assert "takes only a uint8 scale" in norm["reasons"]["qnn"] and norm["ran_on"] == norm_on, norm
    declined = {d["node"] for d in report.declined}
    assert all(d["ran_on"] == norm_on for d in report.declined)
    assert sum("quantize_per_tensor" in n for n in declined) == 4  # its unit: 3 dequantize ops, 1 quantize

    data = result.to_bytes()
    with handoff.load(data) as program:
        m = program.manifest
        assert program.file.minor >= 5
    calls = [i for i in m["instructions"] if i["op"] == "delegate"]
    qnn = [c for c in calls if m["delegates"][c["delegate"]]["backend"] == "qnn"]
    assert [m["values"][v]["dtype"] for v in qnn[0]["outputs"]] == ["uint16"]  # the integer tensor crosses
    assert "uint16" in [m["values"][v]["dtype"] for v in qnn[1]["inputs"]]
    if norm_on == "aten":
        assert {i["target"] for i in m["instructions"] if i["op"] == "aten"} == {
            "quantized_decomposed.dequantize_per_tensor.default", "aten.native_layer_norm.default",
            "quantized_decomposed.quantize_per_tensor.default"}

    steps = testing.output_steps(result.quantized.reference)
    assert steps[0] < 1e-3  # a 16-bit step
    acc = testing.check_int8(data, result.quantized, model, specs, seeds=(21, 22, 23), steps=testing.TOLERANCE["int8"] * 256)
    ref = testing.check_int8(result.quantized.reference, result.quantized, model, specs, seeds=(21, 22, 23))
    assert acc["snr_db"] >= ref["snr_db"] - 0.5, (acc, ref)
