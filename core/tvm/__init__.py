"""The built-in Apache TVM backend (``tvm``): lowers any partition of core ATen ops that TVM's Relax
importer can convert into a shared library holding a Relax VM executable.

* :mod:`handoff.tvm.plugin` declares the backend (imports neither torch nor TVM);
* :mod:`handoff.tvm.compiler` imports, optionally tunes (MetaSchedule) and builds;
* :mod:`handoff.tvm.runtime` loads the library into a Relax VM and runs it (no torch needed).

The importer helpers are public API for plugins that generate code with TVM (``vulkan``):
``handoff.tvm.import_partition``, ``converters`` (handoff's fixes to the importer's converter
table, for a backend driving the importer itself), ``decline_reason``, ``failing_node``,
``io_spec``, ``tvm_message`` and ``TVM_NAME``, and :func:`importer_digest` for such a plugin's
``cache_key()``. They are resolved lazily: importing ``handoff.tvm`` (as the runtime does, for
the plugin module) imports neither torch nor TVM.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

_IMPORTER = ("import_partition", "converters", "decline_reason", "failing_node", "io_spec", "tvm_message", "TVM_NAME")


@functools.cache
def importer_digest() -> str:
    """A digest of the importer's code (:mod:`handoff.tvm.importer`: its converters and checks).

    The lowering and capability caches key a backend by its own plugin's code; a backend that
    imports partitions with this importer returns this from its ``cache_key()`` too, so a fix in
    the importer (a converter of handoff's own) is never answered with blobs or capability
    answers the old importer made."""
    return hashlib.sha256(Path(__file__).with_name("importer.py").read_bytes()).hexdigest()[:16]


def __getattr__(name: str) -> Any:
    if name in _IMPORTER:
        from . import importer

        return getattr(importer, name)
    raise AttributeError(f"module 'handoff.tvm' has no attribute {name!r}")


__all__ = [*_IMPORTER, "importer_digest"]
