"""ONNX Runtime with the QNN execution provider (HTP backend), shared by the compiler and runtime.

Imports onnxruntime only inside functions, so that ``import handoff_qnn.runtime`` stays free of it.
onnxruntime-qnn 2.x is an EP *plugin library*: it is registered with ONNX Runtime once per
process (:func:`qnn_devices`), and sessions pick the QNN device it exposes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import Any, Iterator, Mapping

from . import INSTALL_HINT

_LOCK = threading.Lock()
_REGISTERED: set[str] = set()
#: ORT log severity for our sessions: errors only (the EP warns about Windows-only features on
#: every session otherwise).
LOG_ERROR = 3
_CFFI_BOUND: list[bool] = []  # non-empty once _bind_cffi_to_system_libffi has run


def _bind_cffi_to_system_libffi() -> None:
    """libQnnHtp.so and libHtpPrepare.so carry their own copy of libffi and export its symbols to
    the whole process. cffi binds its libffi calls lazily, at first use, so once a QNN library is
    loaded a process's first cffi callback (wgpu makes one for every buffer it maps: the vulkan
    backend) binds to QNN's copy and fails with "ffi_prep_closure(): bad user_data". Making and
    calling one callback before any QNN library loads binds cffi to the system libffi for good."""
    try:
        import cffi
    except ImportError:  # no cffi, nothing to protect
        return
    cffi.FFI().callback("int(int)", lambda x: x)(1)


def import_ort() -> tuple[Any, Any]:
    """``(onnxruntime, onnxruntime_qnn)``; ``ImportError`` naming the fix."""
    if not _CFFI_BOUND:
        _bind_cffi_to_system_libffi()
        _CFFI_BOUND.append(True)
    try:
        import onnxruntime
        import onnxruntime_qnn
    except ImportError as exc:
        raise ImportError(f"onnxruntime-qnn not installed ({exc}): {INSTALL_HINT}") from exc
    return onnxruntime, onnxruntime_qnn


def versions() -> dict[str, str]:
    """Versions of what compiles and runs QNN graphs here: ``onnxruntime``, ``onnxruntime_qnn``,
    ``qnn_sdk_version`` (the QNN SDK bundled in the onnxruntime-qnn wheel)."""
    ort, oq = import_ort()
    from onnxruntime_qnn import build_and_package_info as info

    return {"onnxruntime": ort.__version__, "onnxruntime_qnn": str(oq.__version__),
            "qnn_sdk_version": str(getattr(info, "qnn_version", "unknown"))}


def htp_library() -> str:
    """Path of ``libQnnHtp.so`` (the HTP backend; on x86-64 Linux, the HTP emulator)."""
    _, oq = import_ort()
    return oq.get_qnn_htp_path()


def qnn_devices() -> list[Any]:
    """The ``OrtEpDevice`` entries of the QNN EP, registering its library on first use."""
    ort, oq = import_ort()
    name = oq.EP_NAME
    with _LOCK:
        if name not in _REGISTERED:
            try:
                ort.register_execution_provider_library(name, oq.get_library_path())
            except Exception:
                # Already registered by the application (same name): fine if its devices are there.
                if not any(d.ep_name == name for d in ort.get_ep_devices()):
                    raise
            _REGISTERED.add(name)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        raise RuntimeError(f"the {name} library registered but exposes no device")
    return devices


def session(model: bytes | str, provider_options: Mapping[str, str], config: Mapping[str, str],
            severity: int = LOG_ERROR, optimize: bool = True) -> Any:
    """An ``InferenceSession`` for ``model`` with the QNN EP on the HTP backend and CPU fallback
    disabled (every node on QNN, or an error), plus the session ``config`` entries."""
    ort, _ = import_ort()
    so = ort.SessionOptions()
    so.log_severity_level = severity
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    entries = {"session.disable_cpu_ep_fallback": "1", **config}
    for key, value in entries.items():
        so.add_session_config_entry(key, str(value))
    so.add_provider_for_devices(qnn_devices(), {"backend_path": htp_library(), **provider_options})
    with _without_banner():
        return ort.InferenceSession(model, so)


#: Printed on stdout by the HTP backend library (its simulator) the first time it loads in a process.
_BANNER = " # LIBNATIVE:"


@contextlib.contextmanager
def _without_banner() -> Iterator[None]:
    """Run the block with file descriptor 1 captured, then write back everything but the HTP
    library's one-time ``# LIBNATIVE`` banner, so that stdout stays the application's."""
    import sys

    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            saved = os.dup(1)
        except OSError:
            yield
            return
        os.dup2(tmp.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True) if not line.startswith(_BANNER.encode())]
            data = b"".join(kept)
            while data:
                data = data[os.write(1, data):]


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptor 2 (ONNX Runtime's log sink) while the
    block runs; the list is filled with its lines when the block ends."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to redirect: capture nothing
            yield lines
            return
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())
