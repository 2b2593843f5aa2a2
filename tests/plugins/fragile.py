"""Test plugin ``fragile``: a runtime that behaves like a vendor runtime which does not survive a
bad blob (``Runtime.isolate_untrusted``), for the probe tests in ``tests/test_security.py``.

Its ``load`` looks at the blob's first bytes: ``ABORT`` aborts the process (as ExecuTorch does on
some malformed programs), ``SEGV`` dies of a segmentation fault, ``HANG`` never returns,
``RAISE`` raises ``ValueError``; anything else loads a delegate that returns its input.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Mapping, Sequence

from handoff import PLUGIN_API_VERSION, BackendSpec, Compiler, Runtime, hookimpl


@hookimpl
def handoff_backends() -> list[BackendSpec]:
    return [BackendSpec(id="fragile", version="1.0", compiler=f"{__name__}:FragileCompiler",
                        runtime=f"{__name__}:FragileRuntime", description="a runtime that crashes on bad blobs",
                        api_version=PLUGIN_API_VERSION)]


class FragileCompiler(Compiler):
    """Claims nothing (programs for this backend are written by hand in the tests)."""


class FragileRuntime(Runtime):
    reentrant = True
    isolate_untrusted = True

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
        head = bytes(blob[:5])
        if head == b"ABORT":
            os.abort()
        if head[:4] == b"SEGV":
            os.kill(os.getpid(), signal.SIGSEGV)
        if head[:4] == b"HANG":
            time.sleep(3600)
        if head == b"RAISE":
            raise ValueError("fragile: the blob says no")
        return bytes(blob)

    def execute(self, handle: Any, inputs: Sequence[Any]) -> list[Any]:
        return [inputs[0] * 1]
