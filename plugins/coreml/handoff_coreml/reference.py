"""Evaluate a Core ML delegate blob on any host with coremltools' own op semantics.

coremltools cannot run a model off macOS (``predict`` needs Core ML). What it does have everywhere
is a numpy implementation of many MIL operations, ``value_inference``, which its constant-folding
passes use. :func:`evaluate` reloads the ML Program *from the blob* (unpacked and checked as the
runtime does, the program read back from its specification and weight file), feeds the inputs as
constants, rebuilds every operation in order with coremltools' builder so that each computes its
value, and returns the outputs converted as the runtime converts them. In an fp16 program the
values are computed in float16 where the program is float16.

It is a check of the conversion (the ops, their attributes, the weights as stored, the casts), not
of Core ML: the Neural Engine, GPU and CPU kernels may round differently. Operations without a
numpy implementation (``conv``, ``max_pool``, ``avg_pool``, ``batch_norm`` among them in
coremltools 9.0) make a program :class:`NotEvaluable`: convolutional networks cannot be checked
numerically on Linux.

Imports coremltools (not torch): for tests and ``tools/check_op_table.py``, never the runtime.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from handoff import temp_dir

from . import _format, _package
from ._quiet import quiet


class NotEvaluable(Exception):
    """The program has operations coremltools has no numpy implementation for."""

    def __init__(self, ops: Sequence[str]):
        self.ops = sorted(set(ops))
        super().__init__(f"coremltools has no numpy implementation (value_inference) of MIL "
                         f"{', '.join(self.ops)}: the program cannot be evaluated off macOS")


def evaluate(blob: bytes | memoryview, inputs: Sequence[Any]) -> list[np.ndarray]:
    """The outputs of the delegate ``blob`` for ``inputs`` (partition dtypes and shapes)."""
    container = _format.unpack(blob)
    header = container.header
    feeds = _format.to_coreml(inputs, header["inputs"])
    with temp_dir("coreml") as tmp, quiet():
        from coremltools.converters.mil.frontend.milproto import load as milproto

        package = _format.extract(container, tmp)
        spec = _package.read_spec(package)
        _package.check_spec(spec, header)
        weights = os.path.join(package, "Data", "com.apple.CoreML", "weights")
        program = milproto.load(spec, spec.specificationVersion, weights)
        values = _run(program.functions["main"], feeds)
    return _format.from_coreml([values[f["name"]] for f in header["outputs"]], header["outputs"])


def _run(function: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import Function

    env: dict[Any, Any] = {}
    lacking: list[str] = []
    with Function({}, opset_version=function.opset_version):
        for name, var in function.inputs.items():
            env[var] = mb.const(val=feeds[name])
        for op in function.operations:
            if op.op_type == "const":
                (out,) = op.outputs
                env[out] = mb.const(val=bool(out.val) if isinstance(out.val, np.bool_) else out.val)
                continue
            kwargs = {k: tuple(env[x] for x in v) if isinstance(v, (list, tuple)) else env[v]
                      for k, v in op.inputs.items()}
            known = all(x.val is not None for v in kwargs.values() for x in (v if isinstance(v, tuple) else [v]))
            result = getattr(mb, op.op_type)(**kwargs)
            for old, new in zip(op.outputs, result if isinstance(result, (list, tuple)) else [result]):
                env[old] = new
                if new.val is None and known:
                    lacking.append(op.op_type)
        if lacking:
            raise NotEvaluable(lacking)
        return {var.name: np.asarray(env[var].val) for var in function.outputs}
