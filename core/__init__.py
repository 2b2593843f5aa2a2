"""handoff: partition PyTorch models across pip-installable backends, run them from one file.

Ahead of time (needs torch and the backends' compilers)::

    result = handoff.partition("zoo:small_cnn", backends=["xnnpack"])
    result.write("m.hof")
    result.report.render(rich.console.Console())

On the device (needs neither torch nor a compiler)::

    with handoff.load("m.hof") as program:
        outputs = program.run([x])

Importing ``handoff`` (or ``handoff.runtime``) does not import torch: the ahead-of-time API
below is resolved lazily, on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .backend import BackendSpec, Compiler, Lowered, LoweringError, Runtime  # noqa: E402
from .errors import HandoffError, ProgramFormatError  # noqa: E402
from .hookspecs import hookimpl, hookspec  # noqa: E402
from .plugins import Plugins, get_plugins  # noqa: E402
from .runtime import Program, load  # noqa: E402
from .zoo import ResolvedModel, ZooModel  # noqa: E402

_LAZY = {
    "partition": ("pipeline", "partition"),
    "PartitionResult": ("pipeline", "PartitionResult"),
    "Limits": ("partitioner", "Limits"),
    "Report": ("report", "Report"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'handoff' has no attribute {name!r}")


__all__ = ["__version__", "BackendSpec", "Compiler", "HandoffError", "Limits", "Lowered", "LoweringError",
           "PartitionResult", "Plugins", "Program", "ProgramFormatError", "Report", "ResolvedModel", "Runtime",
           "ZooModel", "get_plugins", "hookimpl", "hookspec", "load", "partition"]
