"""The ``handoff.backends`` entry point of handoff-qnn.

Imported by ``handoff.runtime`` too, so it imports neither torch nor onnxruntime.
"""

from __future__ import annotations

from handoff import PLUGIN_API_VERSION, BackendSpec, hookimpl

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
                        f"(QNN SDK 2.51; fp32, fp16, int8 8a8w/16a8w)",
            options=OPTIONS,
            runtime_options=RUNTIME_OPTIONS,
            api_version=PLUGIN_API_VERSION,
        )
    ]


@hookimpl
def handoff_catalog() -> dict[str, dict]:
    return {"qnn": {
        "distribution": "handoff-qnn", "module": "handoff_qnn", "entry_point": "qnn", "device": "npu",
        # onnxruntime-qnn wheels: linux-x86_64 runs the HTP emulator, windows-arm64 a real Snapdragon NPU
        "platforms": ["linux-x86_64", "windows-x86_64", "windows-arm64"],
        "compiler": {"name": "onnxruntime-qnn", "version": ONNXRUNTIME_QNN_VERSION},
        "install": "pip install handoff-qnn",
        "description": "Qualcomm QNN HTP context binaries through ONNX Runtime's QNN execution provider",
    }}
