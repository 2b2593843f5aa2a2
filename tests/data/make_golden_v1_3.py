"""Write ``tests/data/golden_v1_3.hof``, the format-1.3 fixture (fallback copies). Run once; never again.

Like ``golden_v1.hof`` (see ``make_golden.py``), this file is a promise: every handoff release that
reads format 1.x must keep reading it, and ``tests/test_program_format.py`` pins its sha256, checks
its contents against literals, and **loads and runs it** with the kitchen-sink test plugin
(``tests/plugins/kitchen_sink.py``, whose blob format it uses: ``b"SINK"``, a little-endian u32
length, and JSON naming numpy-interpreted ATen ops).

What it covers of format 1.3 (docs/format.md §4.6, "Fallback copies"):

* delegate 0's own backend, ``golden_npu``, is never installed; its ``fallbacks`` list holds two
  copies, the first by ``golden_dsp`` (never installed either) and the second by ``sink``: a
  runtime tries them in order and runs the ``sink`` copy;
* delegate 1 runs on ``sinkb`` where that backend can run, and carries a ``sink`` copy that is
  the same bytes, stored once (both entries name one segment, as 1.2 writers share segments);
* copies with their own ``backend_version``, ``metadata`` and ``options``.

The program computes ``tanh(relu(x * w + 1) * x)`` for ``x: float32[2, 4]`` and the ``w`` below.

Usage (with ``handoff`` importable)::

    python tests/data/make_golden_v1_3.py       # writes tests/data/golden_v1_3.hof if absent
"""

from __future__ import annotations

import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from make_golden import write_golden  # noqa: E402  (the writer both golden files share)

GOLDEN = os.path.join(HERE, "golden_v1_3.hof")
ALIGNMENT = 64
W = [0.5, -1.25, 2.0, 0.75]


def sink_blob(program: list, consts: list, outputs: list) -> bytes:
    """A kitchen-sink delegate blob (``SinkCompiler.preprocess``'s format)."""
    body = json.dumps({"program": program, "consts": consts, "outputs": outputs}, sort_keys=True).encode()
    return b"SINK" + struct.pack("<I", len(body)) + body


def segments() -> list[bytes]:
    return [
        b"GOLDEN-NPU-v1\x00" + bytes(range(64)),  # 0: delegate 0's own blob (its backend is never installed)
        b"GOLDEN-DSP-v1\x00" + bytes(range(32)),  # 1: delegate 0's first copy (never installed either)
        sink_blob([["aten.mul.Tensor", [["input", 0], ["const", 0]], {}],  # 2: delegate 0's sink copy
                   ["aten.add.Tensor", [["tmp", 0], ["scalar", 1.0]], {}],
                   ["aten.relu.default", [["tmp", 1]], {}]], [W], [["tmp", 2]]),
        sink_blob([["aten.mul.Tensor", [["input", 0], ["input", 1]], {}],  # 3: delegate 1, on sinkb or sink
                   ["aten.tanh.default", [["tmp", 0]], {}]], [], [["tmp", 1]]),
    ]


def manifest() -> dict:
    return {
        "handoff_version": "0.1.0",
        "metadata": {"model": "golden_v1_3", "backends": ["golden_npu", "sinkb"],
                     "created_by": "tests/data/make_golden_v1_3.py"},
        "values": [
            {"dtype": "float32", "shape": [2, 4]},  # 0 input x
            {"dtype": "float32", "shape": [2, 4]},  # 1 relu(x * w + 1)
            {"dtype": "float32", "shape": [2, 4]},  # 2 tanh(value 1 * x)
        ],
        "inputs": [{"name": "x", "value": 0}],
        "outputs": [{"name": "y", "value": 2}],
        "constants": [],
        "delegates": [
            {
                "backend": "golden_npu", "backend_version": "3.1.0", "segment": 0, "partition": "golden_npu_0",
                "nodes": 3, "metadata": {"soc": "golden-1"}, "options": {"precision": "fp16"},
                "fallbacks": [
                    {"backend": "golden_dsp", "backend_version": "2.0.0", "segment": 1, "metadata": {"arch": "v73"},
                     "options": {}},
                    {"backend": "sink", "backend_version": "9.9", "segment": 2,
                     "metadata": {"compiler": "sink", "ops": 3}, "options": {"ops": "aten.add.Tensor,aten.mul.Tensor,"
                                                                                    "aten.relu.default"}},
                ],
            },
            {
                "backend": "sinkb", "backend_version": "9.9", "segment": 3, "partition": "sinkb_0", "nodes": 2,
                "metadata": {"compiler": "sink", "ops": 2}, "options": {"ops": "aten.mul.Tensor,aten.tanh.default"},
                "fallbacks": [
                    {"backend": "sink", "backend_version": "9.9", "segment": 3,
                     "metadata": {"compiler": "sink", "ops": 2}, "options": {"ops": "aten.mul.Tensor,aten.tanh.default"}},
                ],
            },
        ],
        "instructions": [
            {"op": "delegate", "delegate": 0, "inputs": [0], "outputs": [1]},
            {"op": "delegate", "delegate": 1, "inputs": [1, 0], "outputs": [2]},
        ],
    }


def build() -> tuple[dict, list[bytes], int]:
    """The golden program's inputs to :func:`handoff.program.write_program`."""
    return manifest(), segments(), ALIGNMENT


def main(argv: list[str] | None = None) -> int:
    return write_golden(argv, GOLDEN, build, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
