"""The runtime half of the ``coreml`` backend: Core ML prediction through coremltools, on macOS.

Imports neither torch nor coremltools at module level. Off Apple platforms :meth:`is_available`
is false with the reason, which is the normal case on Linux: a program's Core ML delegates run
where Core ML is.

``load`` checks the blob (:func:`handoff_coreml._format.unpack`), unpacks the package into a
private temporary directory (``handoff.temp_dir``, mode 0700; one a killed process left is removed
by the next process that makes one) after checking every archive
member's name, size and kind (:func:`handoff_coreml._format.extract`), checks the package is an
ML Program with exactly the header's features and that this macOS runs its specification version,
and loads it with ``coremltools.models.MLModel(path, compute_units=...)``, which has Core ML
compile it. The directory lives until :meth:`release`. ``execute`` gives the inputs their Core ML
dtypes, calls ``predict`` and returns the outputs with the partition's dtypes and shapes.

Note: ``import coremltools`` imports torch when torch is installed (coremltools checks its
version); on a Mac without torch it does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import sys
import time
from typing import Any, Mapping, Sequence

from handoff import Runtime, one_line, temp_dir

from . import INSTALL_HINT, NOT_APPLE, _format, _package
from ._quiet import quiet


@dataclasses.dataclass
class _Delegate:
    model: Any
    scratch: contextlib.ExitStack  # holds the package's temporary directory until release
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    compute_units: str
    last_seconds: float = 0.0


class CoreMLRuntime(Runtime):
    """Runs Core ML delegates (see :class:`handoff.backend.Runtime`)."""

    def is_available(self) -> tuple[bool, str]:
        if sys.platform != "darwin":
            return False, NOT_APPLE
        try:
            with quiet():
                from coremltools.libcoremlpython import _MLModelProxy  # noqa: F401
        except ImportError as exc:
            return False, f"coremltools' Core ML bindings cannot be imported ({exc}): {INSTALL_HINT}"
        except Exception as exc:  # a broken install
            return False, f"coremltools cannot be imported ({one_line(exc)}): {INSTALL_HINT}"
        return True, ""

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> _Delegate:
        container = _format.unpack(blob)
        header = container.header
        units = options.get("compute_units") or header["compute_units"]
        scratch = contextlib.ExitStack()
        try:
            package = _format.extract(container, str(scratch.enter_context(temp_dir("coreml"))))
            _package.check_spec(_package.read_spec(package), header)
            model = _open(package, units, header)
        except BaseException:
            scratch.close()
            raise
        return _Delegate(model, scratch, header["inputs"], header["outputs"], units)

    def execute(self, handle: _Delegate, inputs: Sequence[Any]) -> list[Any]:
        feeds = _format.to_coreml(inputs, handle.inputs)
        start = time.perf_counter()
        results = handle.model.predict(feeds)
        handle.last_seconds = time.perf_counter() - start
        return _format.from_coreml([results[f["name"]] for f in handle.outputs], handle.outputs)

    def stats(self, handle: _Delegate) -> dict[str, Any]:
        """The last ``execute``: wall time of Core ML's prediction, and the compute units allowed."""
        return {"predict_ms": round(1000 * handle.last_seconds, 3), "compute_units": handle.compute_units}

    def release(self, handle: _Delegate) -> None:
        handle.model = None
        handle.scratch.close()


def _open(package: str, units: str, header: Mapping[str, Any]) -> Any:
    """Load the package into Core ML; ``ValueError`` saying why not (an older macOS, a model Core
    ML refuses)."""
    ok, why = CoreMLRuntime().is_available()
    if not ok:
        raise RuntimeError(why)
    needs = _format.MACOS_FOR_SPEC[header["spec_version"]]
    have = platform.mac_ver()[0]
    major = int(have.split(".")[0]) if have.split(".")[0].isdigit() else needs
    if major < needs:
        older = [t for t, spec in _format.DEPLOYMENT_TARGETS.items() if _format.MACOS_FOR_SPEC[spec] <= major]
        raise ValueError(f"the Core ML model was converted for {header.get('deployment_target')} (specification "
                         f"version {header['spec_version']}), which needs macOS {needs} or newer; this Mac runs macOS "
                         f"{have}: re-partition with --option coreml.deployment_target= one of "
                         f"{', '.join(older) or 'none (ML Programs need macOS 12)'}")
    with quiet():
        import coremltools as ct

        model = ct.models.MLModel(package, compute_units=ct.ComputeUnit[units.upper()])
    if getattr(model, "__proxy__", None) is None:
        error = getattr(model, "_framework_error", None)
        raise ValueError(f"Core ML could not load the model ({header.get('deployment_target')}, specification version "
                         f"{header['spec_version']}): {one_line(error) if error else 'no reason given'}")
    return model
