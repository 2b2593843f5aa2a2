"""A child process that compiles ONNX models with the QNN EP, one per :class:`QnnCompiler`.

Why a separate process: the QNN HTP backend keeps device configuration process-wide. Once a
session names a ``soc_model`` (needed for ``precision=fp16``), every later session *compiled* in
that process computes in fp16, whatever its own options say (measured: an fp32 compile after an
fp16 one has fp16 error, even after the first session is released). Loading precompiled context
binaries is not affected (each binary keeps the arithmetic it was compiled with), so only the
compiler half needs this. A crash inside QNN also takes down the worker, not the user's process.

Protocol: the parent writes pickled requests, each prefixed by its length (8 bytes, little
endian), on the child's stdin; the child answers the same way on a private copy of its stdout.
File descriptors 1 and 2 of the child are pointed elsewhere: native code prints a banner on fd 1,
and ONNX Runtime's log lines on fd 2 are captured per request and returned with the answer.
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any, Mapping

_LEN = struct.Struct("<Q")


def _read(stream: Any) -> Any:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("compile worker closed its pipe")
    size = _LEN.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("compile worker closed its pipe mid-message")
    return pickle.loads(data)


def _write(stream: Any, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


class Worker:
    """The parent's handle on one compile worker (started on first use, restarted if it dies).
    Use :func:`worker_for`: one worker per target configuration, shared, closed at exit."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen[bytes]:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        return subprocess.Popen([sys.executable, "-m", "handoff_qnn._worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)

    def call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                _write(proc.stdin, dict(request))
                return _read(proc.stdout)
            except (EOFError, BrokenPipeError, OSError) as exc:
                code = proc.wait()
                self._proc = None
                how = f"signal {-code}" if code < 0 else f"exit status {code}"
                raise RuntimeError(f"the QNN compile worker died ({how}) during {request.get('op')}: {exc}") from None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # type: ignore[union-attr]
                proc.wait(timeout=5)
            except Exception:
                proc.kill()


_WORKERS: dict[str, Worker] = {}
_WORKERS_LOCK = threading.Lock()


def worker_for(provider_options: Mapping[str, str]) -> Worker:
    """The compile worker for one set of QNN provider options (compiles with the same target
    configuration cannot disturb each other, so they share a process)."""
    key = repr(sorted(provider_options.items()))
    with _WORKERS_LOCK:
        if key not in _WORKERS:
            _WORKERS[key] = Worker()
        return _WORKERS[key]


@atexit.register
def _close_all() -> None:
    for worker in list(_WORKERS.values()):
        worker.close()


def _serve() -> None:
    from handoff_qnn import _ort

    channel = os.fdopen(os.dup(1), "wb")
    requests = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the HTP library's banner must not corrupt the protocol
    sys.stdout = open(os.devnull, "w")
    while True:
        try:
            request = _read(requests)
        except EOFError:
            return
        op = request.get("op")
        try:
            if op == "versions":
                _write(channel, {"ok": True, "versions": _ort.versions()})
                continue
            if op != "compile":
                raise ValueError(f"unknown request {op!r}")
            with _ort.captured_stderr() as log:
                try:
                    _ort.session(request["model"], request["provider_options"], request["config"],
                                 severity=request.get("severity", _ort.LOG_ERROR))
                    error = None
                except Exception as exc:
                    error = " ".join(str(exc).split()) or type(exc).__name__
            _write(channel, {"ok": error is None, "error": error, "log": log})
        except Exception as exc:  # a bad request: answer, keep serving
            _write(channel, {"ok": False, "error": f"{type(exc).__name__}: {exc}", "log": []})


if __name__ == "__main__":
    _serve()
