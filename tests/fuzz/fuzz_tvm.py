"""Fuzz loading programs with tvm delegates (native code) when nobody the user trusts signed them:
the signature block's parser and check (``handoff.signing``), the trust decision
(``handoff.native.admit``), the tvm runtime's metadata check, and ``handoff.native_library``.

The seeds in ``corpus/tvm/`` were signed by a key this harness does not trust (its
``$HANDOFF_HOME`` is its own), so however an input is mutated, no shared library may reach
``dlopen``: the harness replaces TVM's module loader with one that reports a finding. Inputs
are made consistent as in ``fuzz_program`` so mutations of the manifest (the signature, the
segment digests, the metadata) are read, not stopped by its SHA-256.
"""

from __future__ import annotations

import os

import _harness
from fuzz_program import consistent

EXPECTED: tuple[type[BaseException], ...] = ()
_plugins = None


def _dlopen_reached(path: str, *args, **kwargs):
    raise _harness.Finding(f"an untrusted program's native code reached dlopen ({path})")


def setup() -> None:
    global EXPECTED, _plugins
    os.environ["HANDOFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # tvm is built in; nothing else is needed
    from handoff import HandoffError, get_plugins
    from handoff.tvm.runtime import import_tvm

    EXPECTED = (HandoffError,)
    _plugins = get_plugins()
    tvm = import_tvm()
    tvm.runtime.load_module = _dlopen_reached
    import torch  # noqa: F401  host ops: imported once here, not inside the first input's time limit


def one_input(data: bytes) -> None:
    import handoff

    with handoff.load(consistent(data), plugins=_plugins):
        pass


if __name__ == "__main__":
    _harness.main("fuzz_tvm")
