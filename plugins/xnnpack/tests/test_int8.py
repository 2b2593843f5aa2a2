"""int8 through handoff-xnnpack: ``partition --quantize int8`` with ExecuTorch's XNNPACKQuantizer,
lowered through ExecuTorch's quantized XNNPACK path, checked against the quantized eager model
(in quantization steps of the output, handoff.testing.TOLERANCE["int8"]), against fp32 eager
(SNR, top-1 agreement) and against ExecuTorch's own int8 XNNPACK program of the same graph.

MobileNetV2 int8 is measured by ``benchmarks/int8.py`` (its lowering takes minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1]
if str(PLUGIN_DIR) not in sys.path:  # not pip-installed: use the source tree
    sys.path.insert(0, str(PLUGIN_DIR))

torch = pytest.importorskip("torch")
pytest.importorskip("executorch.backends.xnnpack")
pytest.importorskip("tvm")

import numpy as np  # noqa: E402

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

