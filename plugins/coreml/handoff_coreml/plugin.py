"""The ``handoff.backends`` entry point of handoff-coreml.

Imported by ``handoff.runtime`` too, so it imports neither torch nor coremltools.
"""

from __future__ import annotations

from handoff import PLUGIN_API_VERSION, BackendSpec, hookimpl

from . import COREMLTOOLS_VERSION, __version__
from ._format import OPTIONS, RUNTIME_OPTIONS


@hookimpl
def handoff_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            id="coreml",
            version=__version__,
            device="npu",
            compiler="handoff_coreml.compiler:CoreMLCompiler",
            runtime="handoff_coreml.runtime:CoreMLRuntime",
            description=f"Apple Core ML ML Programs converted by coremltools {COREMLTOOLS_VERSION} "
                        f"(Neural Engine, GPU, CPU; fp16, fp32)",
            options=OPTIONS,
            runtime_options=RUNTIME_OPTIONS,
            api_version=PLUGIN_API_VERSION,
        )
    ]


@hookimpl
def handoff_catalog() -> dict[str, dict]:
    return {"coreml": {
        "distribution": "handoff-coreml", "module": "handoff_coreml", "entry_point": "coreml", "device": "npu",
        # where Core ML runs a package through coremltools' bindings (macOS wheels); the blob is a plain
        # .mlpackage that an iOS app loads with Core ML itself, but no handoff runtime runs on iOS yet
        "platforms": ["macos-arm64", "ios-arm64"],
        "compiler": {"name": "coremltools", "version": COREMLTOOLS_VERSION},
        "install": "pip install handoff-coreml",
        "description": "Apple Core ML packages (converted on any host, executed on Apple hardware only)",
    }}
