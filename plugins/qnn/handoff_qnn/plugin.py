"""The ``handoff.backends`` entry point of handoff-qnn.

Imported by ``handoff.runtime`` too, so it imports neither torch nor onnxruntime.
"""

from __future__ import annotations

from handoff.backend import BackendSpec
from handoff.hookspecs import hookimpl

from . import ONNXRUNTIME_QNN_VERSION, __version__
from ._format import OPTIONS, RUNTIME_OPTIONS


@hookimpl
def handoff_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            id="qnn",
            version=__version__,
            device="npu",
            compiler="handoff_qnn.compiler:QnnCompiler",
            runtime="handoff_qnn.runtime:QnnRuntime",
            description=f"Qualcomm QNN HTP context binaries through onnxruntime-qnn {ONNXRUNTIME_QNN_VERSION} "
                        f"(QNN SDK 2.51; fp32, fp16)",
            options=OPTIONS,
            runtime_options=RUNTIME_OPTIONS,
        )
    ]
