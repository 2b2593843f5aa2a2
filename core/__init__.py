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

The public API, for users and plugin authors alike, is what ``__all__`` lists here, plus the
modules :mod:`handoff.blob` (the delegate envelope), :mod:`handoff.testing` (checks against eager
PyTorch), :mod:`handoff.tvm` (TVM's Relax importer, for backends that generate code with TVM),
:mod:`handoff.zoo` (the ``zoo:`` models), :mod:`handoff.bench` (timing, percentiles, error
figures), and, for researchers, :mod:`handoff.compare` with :mod:`handoff.strategies` and
:mod:`handoff.numerics` (``handoff compare``, per-delegate checks).
Plugins import nothing else from handoff (a test checks the plugins in this repository).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .backend import (  # noqa: E402
    HOST_MEMORY,
    PLUGIN_API_VERSION,
    BackendSpec,
    Compiler,
    Lowered,
    LoweringError,
    Option,
    Runtime,
)
from .errors import FallbackWarning, HandoffError, ProgramFormatError, one_line  # noqa: E402
from .native import native_library  # noqa: E402
from .quiet import quiet_loggers, quiet_native  # noqa: E402
from .hookspecs import hookimpl, hookspec  # noqa: E402
from .plugins import Plugins, get_plugins  # noqa: E402
from .program import ManifestDict, ManifestList, blob_key  # noqa: E402
from .runtime import Program, load  # noqa: E402
from .tempfiles import temp_dir, write_atomic  # noqa: E402
from .zoo import ResolvedModel, ZooModel  # noqa: E402

# The ahead-of-time API (imports torch when used) and the helpers plugins may use.
_LAZY = {
    "partition": ("pipeline", "partition"),
    "PartitionResult": ("pipeline", "PartitionResult"),
    "quantize": ("quantization", "quantize"),
    "Quantized": ("quantization", "Quantized"),
    "is_quantized": ("quantization", "is_quantized"),
    "quantized_dtype": ("quantization", "quantized_dtype"),
    "Limits": ("partitioner", "Limits"),
    "Report": ("report", "Report"),
    "extract_partition": ("lower", "extract_partition"),
    "first_failing": ("lower", "first_failing"),
    "partition_source": ("lower", "partition_source"),
    "PartitionSource": ("lower", "PartitionSource"),
    "cache_dir": ("cache", "cache_dir"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'handoff' has no attribute {name!r}")


__all__ = ["__version__", "HOST_MEMORY", "PLUGIN_API_VERSION", "BackendSpec", "Compiler", "FallbackWarning",
           "HandoffError", "Limits", "Lowered", "LoweringError", "ManifestDict", "ManifestList", "Option",
           "PartitionResult", "PartitionSource", "Plugins", "Program", "ProgramFormatError", "Quantized", "Report", "ResolvedModel", "Runtime", "ZooModel",
           "blob_key", "cache_dir", "extract_partition", "first_failing", "get_plugins", "hookimpl", "hookspec",
           "is_quantized", "load", "native_library", "one_line", "partition", "partition_source", "quantize",
           "quantized_dtype", "quiet_loggers", "quiet_native", "temp_dir", "write_atomic"]
