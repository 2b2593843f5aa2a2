"""The ``handoff.backends`` entry point of handoff-xnnpack.

Imported by ``handoff.runtime`` too, so it imports neither torch nor executorch.
"""

from __future__ import annotations

from handoff.backend import BackendSpec
from handoff.hookspecs import hookimpl

from . import __version__
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
        )
    ]
