"""Test-only: the ``coreml`` backend with a runtime that evaluates each delegate with
:mod:`handoff_coreml.reference` (coremltools' numpy semantics of MIL ops) instead of Core ML, so
a program with Core ML delegates can be compared with eager torch off macOS. Never installed;
tests load programs through it explicitly. The real runtime is ``handoff_coreml.runtime``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from handoff import PLUGIN_API_VERSION, BackendSpec, Runtime, hookimpl
from handoff_coreml import __version__, _format, reference


class ReferenceRuntime(Runtime):
    reentrant = True  # evaluate keeps no state
    evaluated = 0

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> bytes:
        data = bytes(blob)
        _format.unpack(data)
        return data

    def execute(self, handle: bytes, inputs: Sequence[Any]) -> list[Any]:
        ReferenceRuntime.evaluated += 1
        return reference.evaluate(handle, inputs)


@hookimpl
def handoff_backends() -> list[BackendSpec]:
    return [BackendSpec(id="coreml", version=__version__, device="npu", api_version=PLUGIN_API_VERSION,
                        compiler="handoff_coreml.compiler:CoreMLCompiler", runtime=f"{__name__}:ReferenceRuntime",
                        options=_format.OPTIONS, runtime_options=_format.RUNTIME_OPTIONS)]
