"""int8 end to end in the core: PT2E quantization with the backends' quantizers (composed in
priority order), calibration data, the tvm backend's quantize/dequantize import, and the checks of
handoff.testing against the quantized eager model and fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

import handoff
from handoff import HandoffError, testing
from handoff.zoo import random_inputs
from handoff import is_quantized
from handoff.quantization import QDQ_NAMESPACE, duplicate_dequantize, quantized_dtype


class TwoHeads(torch.nn.Module):
    """conv -> relu feeding two heads (a shared activation), and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = torch.nn.Conv2d(8, 8, 1)
        self.b = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.a(y) + self.b(y)


SPECS = [((1, 3, 16, 16), "float32")]


@pytest.fixture(scope="module")
def quantized_two_heads():
    model = TwoHeads().eval()
    return model, handoff.quantize(model, random_inputs(SPECS), backends=["tvm"], calibration=4)


def test_quantize_annotates_with_the_backend_quantizer_and_records_it(quantized_two_heads):
    _, q = quantized_two_heads
    assert q.annotated["tvm"] == {"aten.conv2d.default": 3, "aten.relu.default": 1, "aten.add.Tensor": 1}
    assert q.calibration == "4 random batches" and q.batches == 4 and q.float_ops == {}
    assert is_quantized(q.exported) and not is_quantized(torch.export.export(TwoHeads().eval(), random_inputs(SPECS)))
    # weights are stored as int8, per output channel, symmetric
    per_channel = [n for n in q.exported.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(per_channel) == 3 and all(n.args[6] == torch.int8 and n.args[4:6] == (-127, 127) for n in per_channel)


@pytest.mark.slow
def test_tvm_runs_int8_within_quantization_steps_and_reports_how(quantized_two_heads, tmp_path):
    model, q = quantized_two_heads
    # also the path of a model quantized before handoff: a .pt2 holding quantize/dequantize ops
    torch.export.save(q.exported, tmp_path / "q.pt2")
    result = handoff.partition(str(tmp_path / "q.pt2"), backends=["tvm"], fallback=False)
    report = result.report
    assert report.coverage("tvm") == 100.0 and report.stats["aten"].nodes == 0
    note = report.quantization
    assert note["backends"]["tvm"]["qdq_ops"] > 0
    assert "dequantize-compute-quantize" in note["backends"]["tvm"]["compute"][0]
    assert "quantized before handoff" in note["calibration"]
    acc = testing.check_int8(result.to_bytes(), q, model, SPECS)
    # TVM imports the ops with torch's own formulas: equal to the rounding step
    assert acc["max_steps"] <= 1 and acc["snr_db"] > 20 and acc["top1_agreement"] >= 0.5


@pytest.mark.slow
def test_quantizers_compose_in_priority_order(sink_plugins):
    """sink (first) annotates the muls it claims, tvm's quantizer the rest, and the report says
    who annotated what. The sink runs no int8 tensor, so each quantized mul travels with its
    quantize/dequantize ops to tvm (a fused span), with that reason; the program matches the
    quantized eager model."""
    import kitchen_sink

    model = kitchen_sink.sink_net()
    specs = [((2, 8), "float32")]
    result = handoff.partition(model, random_inputs(specs), backends=["sink", "tvm"], quantize="int8",
                               calibration=4, options={"sink": {"ops": "aten.mul.Tensor"}},
                               default_limits=handoff.Limits(min_size=1))
    annotated = result.report.quantization["annotated_by"]
    assert annotated["sink"] == {"aten.mul.Tensor": 2}
    assert "aten.mul.Tensor" not in annotated["tvm"] and annotated["tvm"].get("aten.add.Tensor")
    assert result.report.stats["sink"].nodes == 0 and result.report.coverage("tvm") == 100.0
    muls = [d for d in result.report.declined if d["op"] == "aten.mul.Tensor"]
    assert len(muls) == 2 and all(d["reasons"]["sink"].startswith("fused pattern with dequantize")
                                  for d in muls)
    assert result.report.stats["aten"].nodes == 0  # no quantize/dequantize op stranded on the host
    testing.check_int8(result.to_bytes(), result.quantized, model, specs)


def test_duplicate_dequantize_gives_each_consumer_its_own():
    class M(torch.nn.Module):
        def forward(self, x):
            q = torch.ops.quantized_decomposed.quantize_per_tensor(x, 0.1, 0, -128, 127, torch.int8)
            d = torch.ops.quantized_decomposed.dequantize_per_tensor(q, 0.1, 0, -128, 127, torch.int8)
            return d + 1, d * 2

    ep = torch.export.export(M(), (torch.randn(4),))
    x = torch.randn(4)
    want = ep.module()(x)
    assert duplicate_dequantize(ep) == 1
    dqs = [n for n in ep.graph.nodes if "dequantize" in str(n.target)]
    assert len(dqs) == 2 and all(len(n.users) == 1 for n in dqs)
    for got, w in zip(ep.module()(x), want):
        torch.testing.assert_close(got, w)


class _EveryQdq(torch.nn.Module):
    """One of each quantize/dequantize op torch 2.13 defines, each with its own dtype, so that
    reading the wrong argument shows (per_channel_group has a group size where per_channel has
    its dtype)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        qd = torch.ops.quantized_decomposed
        s, z = torch.full((4,), 0.1), torch.zeros(4, dtype=torch.int64)
        q8 = qd.quantize_per_tensor.default(x, 0.1, 0, -128, 127, torch.int8)
        qu8 = qd.quantize_per_tensor.tensor(x, torch.tensor(0.1), torch.tensor(0), 0, 255, torch.uint8)
        q16 = qd.quantize_per_channel.default(x, s, z, 0, -32768, 32767, torch.int16)
        sg, zg = torch.full((8,), 0.1), torch.zeros(8, dtype=torch.int64)  # one per group of 8
        group = qd.quantize_per_channel_group.default(x, sg, zg, -8, 7, torch.int8, 8)
        token = qd.quantize_per_token.default(x, s.reshape(4, 1), z.reshape(4, 1), 0, 65535, torch.uint16)
        return (qd.dequantize_per_tensor.default(q8, 0.1, 0, -128, 127, torch.int8),
                qd.dequantize_per_tensor.tensor(qu8, torch.tensor(0.1), torch.tensor(0), 0, 255, torch.uint8),
                qd.dequantize_per_channel.default(q16, s, z, 0, -32768, 32767, torch.int16),
                qd.dequantize_per_channel_group.default(group, sg, zg, -8, 7, torch.int8, 8, torch.float32),
                qd.dequantize_per_token.default(token, s.reshape(4, 1), z.reshape(4, 1), 0, 65535, torch.uint16,
                                                torch.float32))


def test_quantized_dtype_reads_the_dtype_argument_by_name():
    """handoff.quantized_dtype over every quantize/dequantize op an exported graph holds (the
    dtype sits at index 5 or 6), given as keyword, and None for other ops (choose_qparams has a
    dtype too, but quantizes nothing)."""
    ep = torch.export.export(_EveryQdq(), (torch.randn(4, 16),))
    got = {n.target.__name__: quantized_dtype(n) for n in ep.graph.nodes
           if getattr(n.target, "namespace", None) == QDQ_NAMESPACE}
    assert got == {
        "quantize_per_tensor.default": torch.int8, "dequantize_per_tensor.default": torch.int8,
        "quantize_per_tensor.tensor": torch.uint8, "dequantize_per_tensor.tensor": torch.uint8,
        "quantize_per_channel.default": torch.int16, "dequantize_per_channel.default": torch.int16,
        "quantize_per_channel_group.default": torch.int8, "dequantize_per_channel_group.default": torch.int8,
        "quantize_per_token.default": torch.uint16, "dequantize_per_token.default": torch.uint16,
    }
    assert handoff.quantized_dtype is quantized_dtype

    qd, graph = torch.ops.quantized_decomposed, torch.fx.Graph()
    x = graph.placeholder("x")
    keyword = graph.call_function(qd.dequantize_per_channel.default, (x, x, None, 1, 0, 255),
                                  {"dtype": torch.uint8, "out_dtype": torch.float16})
    assert quantized_dtype(keyword) == torch.uint8
    all_keywords = graph.call_function(qd.quantize_per_channel_group.default, (), dict(
        input=x, scales=x, zero_points=x, quant_min=-8, quant_max=7, dtype=torch.int8, group_size=32))
    assert quantized_dtype(all_keywords) == torch.int8
    assert quantized_dtype(graph.call_function(qd.choose_qparams_per_token_asymmetric.default, (x, torch.int8))) is None
    assert quantized_dtype(graph.call_function(torch.ops.aten.relu.default, (x,))) is None
    assert quantized_dtype(x) is None


def test_tvm_judges_quantize_ops_by_their_dtype_argument():
    """tvm's importer reads the dtype by name as well: per_channel_group (dtype at 5, group size
    at 6) is declined as an op it does not import, a keyword dtype is read, an int64 one refused."""
    tvm_importer = pytest.importorskip("handoff.tvm")
    qd, graph = torch.ops.quantized_decomposed, torch.fx.Graph()
    x = graph.placeholder("x")
    group = graph.call_function(qd.quantize_per_channel_group.default, (x, x, x, -8, 7, torch.int8, 32))
    assert "handoff imports quantize/dequantize ops but not quantized_decomposed.quantize_per_channel_group" in (
        tvm_importer.decline_reason(group))
    keyword = graph.call_function(qd.quantize_per_tensor.default, (x, 0.1, 0, 0, 65535), {"dtype": torch.uint16})
    assert tvm_importer.decline_reason(keyword) is None
    wide = graph.call_function(qd.dequantize_per_channel.default, (x, x, x, 0, 0, 9), {"dtype": torch.int64})
    assert "with dtype torch.int64: handoff imports int8/uint8/int16/uint16/int32 quantization only" in (
        tvm_importer.decline_reason(wide))


def _resolved():
    from handoff.zoo import ResolvedModel

    return ResolvedModel("two_heads", module=TwoHeads().eval(), example_inputs=random_inputs(SPECS))


def test_calibration_data_npz(tmp_path):
    from handoff.quantization import _calibration_batches

    example = random_inputs(SPECS)
    path = tmp_path / "cal.npz"
    np.savez(path, np.random.default_rng(0).standard_normal((5, 1, 3, 16, 16)).astype(np.float32))
    batches, where = _calibration_batches(example, None, str(path))
    assert len(batches) == 5 and where.endswith(": 5 batches") and batches[0][0].shape == (1, 3, 16, 16)
    np.savez(path, np.zeros((1, 3, 16, 16), np.float32))
    assert len(_calibration_batches(example, None, str(path))[0]) == 1


@pytest.mark.parametrize("arrays, message", [
    ([np.zeros((2, 1, 3, 8, 8), np.float32)], r"array 0 has shape \[2, 1, 3, 8, 8\]; input 0 is \[1, 3, 16, 16\], "
                                                r"so give \(N, 1, 3, 16, 16\)"),
    ([np.zeros((2, 1, 3, 16, 16), np.float32)] * 2, r"holds 2 array\(s\), the model has 1 input"),
    ([np.zeros((2, 1, 3, 16, 16), np.float64)], r"batch 0: input 0 is float64\[1, 3, 16, 16\], the model takes float32"),
    ([np.array([object()], dtype=object)], r"not a numpy .npz file .*numpy.savez"),
])
def test_bad_calibration_data_says_what_and_how(tmp_path, arrays, message):
    from handoff.quantization import quantize_resolved

    path = tmp_path / "cal.npz"
    np.savez(path, *arrays, allow_pickle=True)
    with pytest.raises(HandoffError, match=message):
        quantize_resolved(_resolved(), {"tvm": handoff.get_plugins().compiler("tvm", {})}, "int8", None, str(path))


def test_quantize_argument_errors(quantized_two_heads, tmp_path):
    from handoff.quantization import quantize_resolved
    from handoff.zoo import ResolvedModel

    tvm = {"tvm": handoff.get_plugins().compiler("tvm", {})}
    with pytest.raises(HandoffError, match="either --calibration N .* or --calibration-data FILE.npz, not both"):
        quantize_resolved(_resolved(), tvm, "int8", 4, str(tmp_path / "x.npz"))
    with pytest.raises(HandoffError, match="--calibration 0: give a number of batches from 1 to"):
        quantize_resolved(_resolved(), tvm, "int8", 0)
    with pytest.raises(HandoffError, match="--quantize 'int4': choose one of int8"):
        quantize_resolved(_resolved(), tvm, "int4")
    with pytest.raises(HandoffError, match=r"--calibration-data .*missing.npz: no such file"):
        quantize_resolved(_resolved(), tvm, "int8", None, str(tmp_path / "missing.npz"))
    _, q = quantized_two_heads
    with pytest.raises(HandoffError, match=f"already quantized \\(it holds {QDQ_NAMESPACE} ops\\); partition it "
                                           "without --quantize"):
        quantize_resolved(ResolvedModel("q", exported=q.exported, example_inputs=random_inputs(SPECS)), tvm)


def test_no_quantizer_among_the_backends(sink_plugins):
    with pytest.raises(HandoffError, match=r"none of the selected backends \(sink\) offers a quantizer for int8"):
        handoff.quantize(TwoHeads().eval(), random_inputs(SPECS), backends=["sink"],
                         options={"sink": {"ops": "aten.add.Tensor"}})


def test_calibration_needs_quantize(capsys):
    from handoff.cli import main

    assert main(["partition", "zoo:small_cnn", "--backends", "tvm", "--calibration", "2"]) != 0
    assert "--calibration and --calibration-data calibrate --quantize; add --quantize int8" in capsys.readouterr().err


def test_output_steps_and_snr(quantized_two_heads):
    _, q = quantized_two_heads
    (step,) = testing.output_steps(q.reference)
    add = [n for n in q.exported.graph.nodes if "dequantize_per_tensor" in str(n.target)][-1]
    assert step == pytest.approx(add.args[1]) and step > 0
    want = np.linspace(-1, 1, 100)
    assert testing.snr_db(want, want) == float("inf")
    assert testing.snr_db(want + 0.01, want) == pytest.approx(10 * np.log10(np.sum(want ** 2) / (100 * 1e-4)))
    with pytest.raises(AssertionError, match=r"differs from the quantized eager model by 4.00 quantization steps"):
        testing.assert_matches_quantized(np.array([0.4]), np.array([0.0]), 0.1)


@pytest.mark.slow
def test_zoo_transformer_int8_on_tvm():
    """The zoo transformer's linear layers in int8 on tvm (layer norm, softmax and GELU stay float)."""
    zoo = handoff.get_plugins().zoo()["small_transformer"]
    model = zoo.build()
    result = handoff.partition(model, random_inputs(zoo.inputs), backends=["tvm"], fallback=False, quantize="int8",
                               calibration=4)
    q = result.report.quantization
    assert q["annotated_by"]["tvm"]["aten.linear.default"] == 9
    assert result.report.coverage("tvm") == 100.0
    acc = testing.check_int8(result.to_bytes(), result.quantized, model, zoo.inputs, seeds=(51, 52))
    assert acc["max_steps"] <= 1 and acc["snr_db"] > 15


@pytest.mark.slow
def test_cli_quantize_prints_who_annotated_what(sink_plugins, tmp_path, capsys):
    import json

    from handoff.cli import main

    out, report = tmp_path / "q.hof", tmp_path / "r.json"
    assert main(["partition", "sink:net", "--backends", "sink,tvm", "--quantize", "int8", "--calibration", "2",
                 "--option", "sink.ops=aten.mul.Tensor", "-o", str(out), "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "int8: calibration 2 random batches" in text and "sink's quantizer annotated: mul×2" in text
    assert "tvm runs" in text and "dequantize-compute-quantize" in text
    q = json.loads(report.read_text())["quantization"]
    assert q["annotated_by"]["sink"] == {"aten.mul.Tensor": 2} and q["batches"] == 2
    with handoff.load(out) as program:
        assert np.isfinite(program.run([np.ones((2, 8), np.float32)])[0]).all()


def test_quantized_spans_reach_through_a_view_and_leave_float_heads_free():
    """dq -> reshape -> linear -> relu -> q is one unit (no quantize between the reshape, the linear
    and its fused activation);
    the int8-input dequantize of an op whose result stays float (the last linear, then softmax) is
    in no unit, while that op's weight dequantize travels with it."""
    from handoff.quantization import quantized_spans

    qd = torch.ops.quantized_decomposed

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randint(-127, 127, (4, 8), dtype=torch.int8))
            self.register_buffer("w2", torch.randint(-127, 127, (3, 4), dtype=torch.int8))

        def forward(self, x):
            d = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, 0.1, 0, -128, 127, torch.int8),
                                         0.1, 0, -128, 127, torch.int8)
            w = qd.dequantize_per_tensor(self.w, 0.01, 0, -127, 127, torch.int8)
            y = torch.relu(torch.nn.functional.linear(d.reshape(1, 8), w))
            h = qd.dequantize_per_tensor(qd.quantize_per_tensor(y, 0.2, 0, -128, 127, torch.int8),
                                         0.2, 0, -128, 127, torch.int8)
            w2 = qd.dequantize_per_tensor(self.w2, 0.01, 0, -127, 127, torch.int8)
            return torch.softmax(torch.nn.functional.linear(h, w2), -1)

    ep = torch.export.export(M(), (torch.randn(2, 4),))
    ops = {n.name: n.target.__name__.split(".")[0] for n in ep.graph.nodes if n.op == "call_function"}
    spans = sorted(sorted(ops[n] for n in s) for s in quantized_spans(ep))
    assert spans == [sorted(["dequantize_per_tensor"] * 2 + ["reshape", "linear", "relu", "quantize_per_tensor"]),
                     ["dequantize_per_tensor", "linear"]], spans


class _Uint16InOut(torch.nn.Module):
    """A graph quantized elsewhere with 16-bit activations: uint16 in, dequantize -> linear -> relu
    -> quantize, uint16 out (program format 1.5)."""

    Q = (2e-3, 32768, 0, 65535, torch.uint16)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.linear = torch.nn.Linear(16, 8)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        x = ops.dequantize_per_tensor(q, *self.Q)
        return ops.quantize_per_tensor(torch.relu(self.linear(x)), *self.Q)


@pytest.mark.slow
def test_tvm_takes_uint16_in_and_out():
    """tvm imports uint16 quantize/dequantize: a delegate with uint16 inputs and outputs, written as
    format 1.5, loaded and run, equal to the eager graph within one 16-bit step."""
    model = _Uint16InOut().eval()
    example = torch.randint(0, 65536, (4, 16), dtype=torch.int32).to(torch.uint16)
    result = handoff.partition(model, (example,), backends=["tvm"], fallback=False, aten=False)
    assert result.report.coverage("tvm") == 100.0
    with handoff.load(result.to_bytes()) as program:
        m = program.manifest
        assert [m["values"][io[0]["value"]]["dtype"] for io in (m["inputs"], m["outputs"])] == ["uint16", "uint16"]
        rng = np.random.default_rng(0)
        for _ in range(3):
            q = rng.integers(0, 65536, (4, 16), dtype=np.uint16)
            (got,) = program.run([q])
            want = model(torch.from_numpy(q)).numpy()
            assert got.dtype == np.uint16 and len(np.unique(got)) > 4  # not degenerate
            assert np.abs(got.astype(np.int64) - want.astype(np.int64)).max() <= 1
