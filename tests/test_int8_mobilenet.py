"""MobileNetV2 int8 end to end on xnnpack, tvm and qnn (issue 14), marked ``bench``: run by
``make bench`` (``pytest -m bench``), not by ``make test``. Partitioning the quantized MobileNetV2
takes minutes per backend on 2 cores (ExecuTorch's Edge conversion and XNNPACK passes, TVM's
untuned build of 52 convolutions; numbers in docs/quantization.md), more than CI's headroom.

Each program is checked against the quantized eager model (the converted PT2E module) within a
stated number of output quantization steps, and against fp32 eager: its SNR must be within
0.5 dB of the quantized eager model's own SNR, its top-1 agreement as good. Step bounds are per
backend and measured: integer kernels (XNNPACK's QS8, HTP) round inside every op (requantization,
fused ReLU6 clamps, pooling), a step at most per op, which grows through 52 convolutions to tens of
output steps; ExecuTorch's own int8 XNNPACK program of the same graph is exactly as far from the
quantized eager model, and the xnnpack program must be within one step of it.

xnnpack and tvm share one export quantized by XNNPACK's quantizer (module-scoped fixture); qnn
quantizes with its own QnnQuantizer (HTP's rules: int32 biases, uint8 activations), since HTP
declines convolutions whose bias stays float as XNNPACK's config leaves it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")
pytest.importorskip("tvm")

import handoff  # noqa: E402
from handoff import testing  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.bench]

SEEDS = (21, 22, 23)
CALIBRATION = 2



def _plugins(*backends):
    return testing.register_plugins(*[f"handoff_{b}.plugin" for b in backends])


@pytest.fixture(scope="module")
def mobilenet():
    """The zoo's MobileNetV2 (calibrated batch-norm statistics) and its input specs."""
    zoo = _plugins().zoo()["mobilenet_v2"]
    return zoo, zoo.build()


@pytest.fixture(scope="module")
def xnnpack_quantized(mobilenet):
    """MobileNetV2 quantized once by XNNPACK's quantizer (symmetric int8, per-channel weights)."""
    pytest.importorskip("executorch.backends.xnnpack")
    zoo, model = mobilenet
    _plugins("xnnpack")
    return handoff.quantize(model, testing.random_inputs(zoo.inputs), backends=["xnnpack"], calibration=CALIBRATION)


def _check(program, quantized, mobilenet, steps):
    """Both references; the program must be as close to fp32 as the quantized eager model."""
    zoo, model = mobilenet
    acc = testing.check_int8(program, quantized, model, zoo.inputs, seeds=SEEDS, steps=steps)
    ref = testing.check_int8(quantized.reference, quantized, model, zoo.inputs, seeds=SEEDS)
    assert acc["snr_db"] >= ref["snr_db"] - 0.5, (acc, ref)
    assert acc["top1_agreement"] >= ref["top1_agreement"] - 0.34, (acc, ref)
    return acc, ref


def _whole(result, backend):
    report = result.report
    assert report.coverage(backend) == 100.0 and report.stats[backend].partitions == 1, report.stats
    assert report.quantization["backends"][backend]["qdq_ops"] > 200


def test_mobilenet_v2_int8_on_xnnpack(mobilenet, xnnpack_quantized):
    """Whole on one XNNPACK delegate as int8; within one step of ExecuTorch's own program of the
    same graph (measured 0 steps), within 40 steps of the quantized eager model (measured 22-32,
    ExecuTorch's program the same)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    zoo, _ = mobilenet
    _plugins("xnnpack")
    result = handoff.partition(xnnpack_quantized.exported, backends=["xnnpack"], fallback=False)
    _whole(result, "xnnpack")
    program = result.to_bytes()
    _check(program, xnnpack_quantized, mobilenet, steps=40)

    pte = to_edge_transform_and_lower(xnnpack_quantized.exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    method = Runtime.get().load_program(pte.buffer).load_method("forward")
    (step,) = testing.output_steps(xnnpack_quantized.reference)
    with handoff.load(program) as prog:
        x = testing.random_inputs(zoo.inputs, seed=SEEDS[0])
        testing.assert_matches_quantized(prog.run(x)[0], method.execute(list(x))[0].numpy(), step, steps=1)


def test_mobilenet_v2_int8_on_tvm(mobilenet, xnnpack_quantized):
    """Whole on one TVM delegate, dequantize-compute-quantize with torch's rounding formulas; within
    16 steps of the quantized eager model (measured 11: TVM's float kernels sum in another order
    than torch's, a value next to a rounding boundary flips by a step, and the flip propagates)."""
    _plugins()
    result = handoff.partition(xnnpack_quantized.exported, backends=["tvm"], fallback=False)
    _whole(result, "tvm")
    _check(result.to_bytes(), xnnpack_quantized, mobilenet, steps=16)


def test_mobilenet_v2_int8_on_qnn(mobilenet):
    """Quantized by QnnQuantizer, whole on one HTP delegate (integer kernels, HTP emulator);
    within 48 steps of the quantized eager model (measured 39: HTP's requantization)."""
    pytest.importorskip("onnxruntime_qnn")
    pytest.importorskip("executorch.backends.qualcomm.quantizer.quantizer")
    zoo, model = mobilenet
    _plugins("qnn")
    result = handoff.partition(model, testing.random_inputs(zoo.inputs), backends=["qnn"], fallback=False,
                               quantize="int8", calibration=CALIBRATION)
    _whole(result, "qnn")
    _check(result.to_bytes(), result.quantized, mobilenet, steps=48)
