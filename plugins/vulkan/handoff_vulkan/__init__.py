"""A GPU backend for handoff: TVM-generated WGSL kernels run on Vulkan through wgpu.

Importing this package is cheap: it imports neither torch, TVM nor wgpu. The compiler half
(:mod:`handoff_vulkan.compiler`) lowers a partition with Apache TVM for the ``webgpu`` target
(dlight GPU schedules, WGSL code generation) into a blob of kernels, a launch plan and weights
(``docs/vulkan-blob.md``); the runtime half (:mod:`handoff_vulkan.runtime`) replays that plan on
a Vulkan adapter through wgpu, with neither TVM nor torch.
"""

__version__ = "0.1.0"

#: The wgpu-py release the runtime is written and tested against.
WGPU_VERSION = "0.32.0"

__all__ = ["WGPU_VERSION", "__version__"]
