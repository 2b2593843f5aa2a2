"""The ``handoff.backends`` entry point of handoff-vulkan.

Imported by ``handoff.runtime`` too, so it imports neither torch, TVM nor wgpu.
"""

from __future__ import annotations

from handoff import PLUGIN_API_VERSION, BackendSpec, hookimpl

from . import WGPU_VERSION, __version__
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
            api_version=PLUGIN_API_VERSION,
        )
    ]


@hookimpl
def handoff_catalog() -> dict[str, dict]:
    return {"vulkan": {
        "distribution": "handoff-vulkan", "module": "handoff_vulkan", "entry_point": "vulkan", "device": "gpu",
        # where wgpu-py runs; the blob (docs/vulkan-blob.md) is plain WGSL + a launch plan, so a
        # native runtime could run it elsewhere (Android), but none ships yet
        "platforms": ["linux-x86_64", "linux-aarch64", "windows-x86_64"],
        "compiler": {"name": "apache-tvm", "version": "0.27.0.post1"},
        "tvm_target": {"kind": "webgpu", "max_num_threads": 256, "max_shared_memory_per_block": 16384},
        "install": "pip install handoff-vulkan",
        "description": f"TVM-generated WGSL kernels run on Vulkan through wgpu {WGPU_VERSION}",
    }}
