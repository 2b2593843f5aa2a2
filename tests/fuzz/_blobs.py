"""The blob harnesses' shared body: a backend's runtime half loads a fuzzed delegate blob, runs it
once on zero inputs when it loads, and releases it, exactly as ``handoff.load``/``Program.run``
would call it (``Runtime.load``, ``execute``, ``to_host``, ``release``).

A runtime's ``load`` may reject a blob with ``ValueError`` or ``RuntimeError`` (the vendor
runtime's own error); the core turns either into a one-line ``HandoffError`` naming the delegate.
Anything else (a ``KeyError`` from a header missing a field, an abort inside the vendor library)
is a finding.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

#: Zero inputs are made only up to this size; a loaded delegate with bigger inputs is not run.
MAX_INPUT_BYTES = 1 << 20


def load_and_run(runtime: Any, data: bytes, input_specs: Callable[[Any], list[tuple[Any, tuple[int, ...]]]],
                 metadata: dict | None = None, options: dict | None = None) -> None:
    handle = runtime.load(memoryview(data), metadata or {}, options or {})
    try:
        specs = input_specs(handle)
        if all(isinstance(dtype, np.dtype) for dtype, _ in specs) and sum(math.prod(shape) * np.dtype(dtype).itemsize for dtype, shape in specs) <= MAX_INPUT_BYTES:
            outputs = runtime.execute(handle, [np.zeros(shape, dtype) for dtype, shape in specs])
            runtime.to_host(outputs)
    finally:
        runtime.release(handle)
