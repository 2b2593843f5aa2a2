"""The ``handoff.backends`` entry point of handoff-xnnpack.

Imported by ``handoff.runtime`` too, so it imports neither torch nor executorch.
"""

from __future__ import annotations

from handoff import PLUGIN_API_VERSION, BackendSpec, hookimpl

from . import EXECUTORCH_VERSION, __version__
from ._format import OPTIONS


@hookimpl
def handoff_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            id="xnnpack",
            version=__version__,
            device="cpu",
            compiler="handoff_xnnpack.compiler:XnnpackCompiler",
            runtime="handoff_xnnpack.runtime:XnnpackRuntime",
            description="XNNPACK CPU kernels through ExecuTorch's XNNPACK delegate (fp32, fp16)",
            options=OPTIONS,  # a compile-time threads value is the delegate's default
            runtime_options=OPTIONS,
            api_version=PLUGIN_API_VERSION,
        )
    ]


@hookimpl
def handoff_catalog() -> dict[str, dict]:
    return {"xnnpack": {
        "distribution": "handoff-xnnpack", "module": "handoff_xnnpack", "entry_point": "xnnpack", "device": "cpu",
        # where executorch publishes wheels (its Python runtime binding); the blob is a plain .pte that
        # ExecuTorch's native Android/iOS runtimes load, but no handoff runtime runs there yet
        "platforms": ["linux-x86_64", "linux-aarch64", "macos-arm64"],
        "compiler": {"name": "executorch", "version": EXECUTORCH_VERSION},
        "install": "pip install handoff-xnnpack",
        "description": "XNNPACK CPU kernels through ExecuTorch's XNNPACK delegate",
    }}
