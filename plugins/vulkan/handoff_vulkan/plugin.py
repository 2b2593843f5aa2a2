"""The ``handoff.backends`` entry point of handoff-vulkan.

Imported by ``handoff.runtime`` too, so it imports neither torch, TVM nor wgpu.
"""

from __future__ import annotations

from handoff.backend import BackendSpec
from handoff.hookspecs import hookimpl

from . import __version__
from ._format import OPTIONS, RUNTIME_OPTIONS


@hookimpl
def handoff_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            id="vulkan",
            version=__version__,
            device="gpu",
            compiler="handoff_vulkan.compiler:VulkanCompiler",
            runtime="handoff_vulkan.runtime:VulkanRuntime",
            description="TVM 0.27 WGSL kernels (dlight GPU schedules) run on a Vulkan GPU through wgpu 0.32 (fp32, int32)",
            options=OPTIONS,
            runtime_options=RUNTIME_OPTIONS,
        )
    ]
