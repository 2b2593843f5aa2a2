"""Fuzz the qnn runtime's blob loader in this process: the envelope, the container's section
names (they become file names), the SDK version check, then ONNX Runtime's EPContext model parser
and the QNN HTP backend's context-binary loader (the emulator here), and one run on zero inputs.
Seeds: ``corpus/qnn/``.
"""

from __future__ import annotations

import _harness

EXPECTED: tuple[type[BaseException], ...] = ()
_runtime = None


def setup() -> None:
    global EXPECTED, _runtime
    from handoff import HandoffError
    from handoff_qnn.runtime import QnnRuntime

    _runtime = QnnRuntime()
    ok, why = _runtime.is_available()
    if not ok:
        raise SystemExit(f"qnn fuzzing needs onnxruntime-qnn: {why}")
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    # ONNX Runtime reports a bad model with its own exception types (Fail, InvalidGraph, ...),
    # which the core turns into one line like any other load failure.
    ort_errors = tuple(t for t in vars(state).values() if isinstance(t, type) and issubclass(t, Exception))
    EXPECTED = (HandoffError, ValueError, RuntimeError, *ort_errors)


def one_input(data: bytes) -> None:
    from _blobs import load_and_run

    load_and_run(_runtime, data, lambda handle: list(handle.input_specs), options={})


if __name__ == "__main__":
    _harness.main("fuzz_qnn")
