"""Fuzz the xnnpack runtime's blob loader in this process: the envelope (``handoff.blob``), the
header checks, then ExecuTorch's own program loader and XNNPACK's graph builder on the ``.pte``.

In ``handoff.load`` an xnnpack blob that was not made on this machine is first loaded in a child
process (``Runtime.isolate_untrusted``, ``handoff.probe``), because ExecuTorch aborts the process
on some malformed programs; here it is loaded directly, so that such aborts are found. Seeds:
``corpus/xnnpack/``.
"""

from __future__ import annotations

import _harness

EXPECTED: tuple[type[BaseException], ...] = ()
_runtime = None


def setup() -> None:
    global EXPECTED, _runtime
    from handoff import HandoffError
    from handoff_xnnpack.runtime import XnnpackRuntime

    EXPECTED = (HandoffError, ValueError, RuntimeError)
    _runtime = XnnpackRuntime()
    _runtime.threads()  # loads ExecuTorch once, outside the first input's time limit


def one_input(data: bytes) -> None:
    from _blobs import load_and_run

    load_and_run(_runtime, data, lambda handle: list(handle.inputs), options={"threads": 1})


if __name__ == "__main__":
    _harness.main("fuzz_xnnpack")
