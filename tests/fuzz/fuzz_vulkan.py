"""Fuzz the vulkan runtime's blob loader in this process: the envelope, the header (buffers,
kernels, dispatches, device limits), wgpu's WGSL compiler and validation of each kernel, pipeline
and bind group creation, then one run on zero inputs and the read-back. Needs a Vulkan adapter
(lavapipe on CI). Seeds: ``corpus/vulkan/``.
"""

from __future__ import annotations

import _harness

EXPECTED: tuple[type[BaseException], ...] = ()
_runtime = None


def setup() -> None:
    global EXPECTED, _runtime
    from handoff import HandoffError
    from handoff_vulkan.runtime import VulkanRuntime

    EXPECTED = (HandoffError, ValueError, RuntimeError)
    _runtime = VulkanRuntime()
    ok, why = _runtime.is_available()
    if not ok:
        raise SystemExit(f"vulkan fuzzing needs a Vulkan adapter: {why}")


def one_input(data: bytes) -> None:
    from _blobs import load_and_run

    load_and_run(_runtime, data, lambda handle: [(dtype, shape) for _, shape, dtype in handle.inputs])


if __name__ == "__main__":
    _harness.main("fuzz_vulkan")
