"""The built-in Apache TVM backend (``tvm``): lowers any partition of core ATen ops that TVM's Relax
importer can convert into a shared library holding a Relax VM executable.

* :mod:`handoff.tvm.plugin` declares the backend (imports neither torch nor TVM);
* :mod:`handoff.tvm.compiler` imports, optionally tunes (MetaSchedule) and builds;
* :mod:`handoff.tvm.runtime` loads the library into a Relax VM and runs it (no torch needed).

The importer helpers are public API for plugins that generate code with TVM (``vulkan``):
``handoff.tvm.import_partition``, ``converters`` (handoff's fixes to the importer's converter
table, for a backend driving the importer itself), ``decline_reason``, ``failing_node``,
``io_spec``, ``tvm_message`` and ``TVM_NAME``. They are resolved lazily: importing ``handoff.tvm`` (as the
runtime does, for the plugin module) imports neither torch nor TVM.
"""

from __future__ import annotations

from typing import Any

_IMPORTER = ("import_partition", "converters", "decline_reason", "failing_node", "io_spec", "tvm_message", "TVM_NAME")


def __getattr__(name: str) -> Any:
    if name in _IMPORTER:
        from . import importer

        return getattr(importer, name)
    raise AttributeError(f"module 'handoff.tvm' has no attribute {name!r}")


__all__ = list(_IMPORTER)
