"""Native libraries' diagnostic output kept off the user's terminal.

Vendor libraries print straight to file descriptors 1 and 2 from C++ when they load (ExecuTorch's
cpuinfo: five ``[cpuinfo_utils.cpp:…]`` lines in every process; torchao, through Python logging:
``Failed to load …/_C_*.so`` for CUDA kernels a CPU wheel cannot load). Python-level filters
cannot reach the C++ prints, so :func:`quiet_native` redirects the descriptors themselves to a
temporary file around the calls that print, and drops what was captured. The core wraps every call
into a backend that loads native code (importing a compiler or runtime half, ``is_available``,
``Runtime.load``); plugins wrap their own lazy imports with it (``handoff.quiet_native``).

With ``--debug`` (or ``HANDOFF_DEBUG=1``) nothing is redirected. When the block raises, what was
captured is attached to the exception as a note (Python shows it with the traceback, i.e. with
``--debug``), because it may say why a library failed to load.

The redirect is process-wide (file descriptors are), so blocks on several threads share one: the
first to enter redirects, the last to leave restores.

What libraries log through Python's ``logging`` (torchao's warnings about kernels a CPU wheel cannot
load, ExecuTorch's per-node partitioner lines, the ONNX exporter's registrations) is muted by
:func:`quiet_loggers` instead, around the calls that log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from typing import Iterator

#: set by ``handoff --debug``; the environment variable does the same for library users
DEBUG_ENV = "HANDOFF_DEBUG"
_debug = [False]
#: at most this much captured output is kept for an exception's note
_NOTE_BYTES = 4096

_lock = threading.Lock()
_depth = 0
_saved: list[int] = []
_sink = None


def set_debug(on: bool) -> None:
    """Let native output through (``--debug``)."""
    _debug[0] = bool(on)


def _passthrough() -> bool:
    return _debug[0] or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _enter() -> bool:
    global _depth, _sink
    with _lock:
        if _depth == 0:
            try:
                sink = tempfile.TemporaryFile(mode="w+b")
            except OSError:
                return False
            _flush()
            saved = []
            try:
                for fd in (1, 2):
                    saved.append(os.dup(fd))
                    os.dup2(sink.fileno(), fd)
            except OSError:  # e.g. a descriptor is closed: leave the process as it was
                for fd, copy in zip((1, 2), saved):
                    os.dup2(copy, fd)
                    os.close(copy)
                sink.close()
                return False
            _saved[:] = saved
            _sink = sink
        _depth += 1
        return True


def _leave() -> bytes:
    """Undo one :func:`_enter`; returns the tail of what was captured when this was the last."""
    global _depth, _sink
    with _lock:
        _depth -= 1
        if _depth:
            return b""
        _flush()
        for fd, copy in zip((1, 2), _saved):
            os.dup2(copy, fd)
            os.close(copy)
        _saved.clear()
        sink, _sink = _sink, None
    try:
        size = sink.seek(0, os.SEEK_END)
        sink.seek(max(0, size - _NOTE_BYTES))
        return sink.read()
    finally:
        sink.close()


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Run the block with file descriptors 1 and 2 redirected to a temporary file, then drop what
    native code printed there (module docstring). A no-op with ``--debug``."""
    if _passthrough() or not _enter():
        yield
        return
    try:
        yield
    except BaseException as exc:
        captured = _leave()
        if captured.strip():
            exc.add_note("output of native code while this failed:\n"
                         + captured.decode("utf-8", "replace").rstrip())
        raise
    else:
        _leave()


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the Python loggers ``names`` (their children included) to ``level`` for the block,
    then restore the levels they had: a library used by the caller too keeps its settings. A no-op
    with ``--debug``."""
    if _passthrough():
        yield
        return
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)
