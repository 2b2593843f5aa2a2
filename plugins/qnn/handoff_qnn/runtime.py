"""The runtime half of the ``qnn`` backend: loads a delegate's QNN context binary into an ONNX
Runtime session with the QNN execution provider (HTP backend) and runs it on numpy arrays.

Imports neither torch nor onnxruntime at module level (onnxruntime is imported in the methods).

``load`` does not recompile: the session is created from the EPContext model, whose single
``EPContext`` node hands the precompiled context binary to QNN. ONNX Runtime reads the binary by
the file name the node gives, relative to ``ep.context_file_path``; the runtime writes it to a
private temporary directory (mode 0700) for the duration of session creation only, and removes it
before ``load`` returns (QNN has deserialised it by then).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from handoff import Runtime, one_line, temp_dir

from . import INSTALL_HINT, _format, _ort


@dataclasses.dataclass
class _Delegate:
    session: Any
    input_names: list[str]
    input_specs: list[tuple[np.dtype, tuple[Any, ...]]]
    output_names: list[str]
    last_seconds: float = 0.0


class QnnRuntime(Runtime):
    """Runs QNN delegates through ONNX Runtime's QNN EP (see :class:`handoff.backend.Runtime`)."""

    #: The QNN HTP backend dies of SIGSEGV on some malformed context binaries (found by
    #: tests/fuzz/fuzz_qnn.py; the input is in tests/fuzz/crashers/qnn/), where it should fail
    #: ``QnnContext_createFromBinary``: blobs not made here are loaded in a probe process first.
    isolate_untrusted = True

    def is_available(self) -> tuple[bool, str]:
        try:
            _ort.import_ort()
        except ImportError as exc:
            return False, str(exc)
        except Exception as exc:  # a broken install (missing shared library, ABI mismatch)
            return False, f"onnxruntime-qnn cannot be imported ({one_line(exc)}): {INSTALL_HINT}"
        try:
            htp = _ort.htp_library()
            if not os.path.exists(htp):
                return False, f"the QNN HTP backend library {htp} is missing: reinstall with {INSTALL_HINT}"
            _ort.qnn_devices()
        except Exception as exc:
            return False, f"the QNN execution provider cannot be registered with ONNX Runtime: {one_line(exc)}"
        return True, ""

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> _Delegate:
        provider_options = _format.runtime_options(dict(options))
        container = _format.unpack(blob)
        _check_versions(container.header)
        ctx_name, ctx = container.epcontext_model
        with temp_dir("qnn") as tmp:  # created 0700; a killed process's is removed by the next
            for name, data in container.context_binaries:
                fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            config = {"ep.context_file_path": os.path.join(tmp, ctx_name)}
            session = _ort.session(bytes(ctx), provider_options, config)
        names = [i.name for i in session.get_inputs()]
        specs = []
        for spec in container.header.get("inputs", []):
            specs.append((np.dtype(spec["dtype"]), tuple(spec["shape"])))
        if len(specs) != len(names):
            raise ValueError(f"QNN delegate header lists {len(specs)} inputs, its EPContext model has {len(names)}")
        return _Delegate(session, names, specs, [o.name for o in session.get_outputs()])

    def execute(self, handle: _Delegate, inputs: Sequence[Any]) -> list[np.ndarray]:
        if len(inputs) != len(handle.input_names):
            raise ValueError(f"QNN delegate takes {len(handle.input_names)} inputs, got {len(inputs)}")
        feeds = {}
        for i, (name, value, (dtype, shape)) in enumerate(zip(handle.input_names, inputs, handle.input_specs)):
            array = np.ascontiguousarray(value)
            if array.dtype != dtype or tuple(array.shape) != shape:
                raise ValueError(f"QNN delegate input {i} ({name}) must be {dtype}{list(shape)}, "
                                 f"got {array.dtype}{list(array.shape)}")
            feeds[name] = array
        start = time.perf_counter()
        outputs = list(handle.session.run(handle.output_names, feeds))
        handle.last_seconds = time.perf_counter() - start
        return outputs

    def stats(self, handle: _Delegate) -> dict[str, Any]:
        """The last ``execute``: wall time of the ONNX Runtime session run (on the HTP emulator
        here, so not a device measurement)."""
        return {"run_ms": round(1000 * handle.last_seconds, 3)}

    def release(self, handle: _Delegate) -> None:
        handle.session = None  # the last reference: ORT frees the QNN context and graph


def _check_versions(header: Mapping[str, Any]) -> None:
    """Refuse a context binary built by another QNN SDK release: QNN context binaries are tied to
    the SDK (and HTP backend library) that serialised them."""
    built = str(header.get("qnn_sdk_version", "unknown"))
    here = _ort.versions()
    if _format.major_minor(built) != _format.major_minor(here["qnn_sdk_version"]):
        raise ValueError(
            f"QNN context binary was compiled with QNN SDK {built} (onnxruntime-qnn "
            f"{header.get('onnxruntime_qnn', '?')}); this runtime has QNN SDK {here['qnn_sdk_version']} "
            f"(onnxruntime-qnn {here['onnxruntime_qnn']}): install onnxruntime-qnn=={header.get('onnxruntime_qnn', '?')} "
            f"or re-partition the model with this one")

