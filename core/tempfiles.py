"""Temporary files and directories that a killed process does not leave behind for good.

Every temporary entry handoff makes carries the id of the process that made it in its name
(``/tmp/handoff-tvm-12345-1a2b3c4d/``, ``.m.hof.12345-1a2b3c4d.tmp``). The normal path, errors
included, removes it. A process that is killed cannot, so the next handoff process that makes an
entry of the same kind in the same directory first removes the ones whose process is gone
(:func:`sweep`, once per process and kind). Entries of other users and of live processes are
never touched; a stale entry whose process id has been reused by a live process stays until that
process ends too.

Public API for plugins: :func:`temp_dir` (``handoff.temp_dir``), for a backend's own scratch
files (QNN's context binaries at load, a vendor compiler's working directory), and
:func:`write_atomic` (``handoff.write_atomic``), for a file in a backend's own cache.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator

_swept: set[tuple[str, str]] = set()
_swept_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's live process (or a value no process can have)
    return True


def unique_name(prefix: str, suffix: str = "") -> str:
    """``PREFIX<pid>-<8 random hex digits>SUFFIX``: the name :func:`sweep` recognises."""
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def sweep(directory: str | os.PathLike[str], prefix: str, suffix: str = "") -> int:
    """Remove ``directory``'s entries named by :func:`unique_name` with this ``prefix`` and
    ``suffix`` whose process is gone and that belong to this user; returns how many. Never raises."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    uid = os.getuid() if hasattr(os, "getuid") else None
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
            continue
        pid_text = name[len(prefix):len(name) - len(suffix)].partition("-")[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if uid is not None and st.st_uid != uid:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def sweep_once(directory: str | os.PathLike[str], prefix: str, suffix: str = "") -> None:
    """:func:`sweep`, the first time this process asks for this directory and kind."""
    key = (os.path.abspath(directory), prefix + "\0" + suffix)
    with _swept_lock:
        if key in _swept:
            return
        _swept.add(key)
    sweep(directory, prefix, suffix)


def create_file(directory: str | os.PathLike[str], prefix: str, suffix: str = "", mode: int = 0o600) -> tuple[int, str]:
    """A new file ``directory/PREFIX<pid>-<random>SUFFIX``, opened for writing (``O_EXCL``):
    ``(fd, path)``. Stale files of the same kind are swept first."""
    sweep_once(directory, prefix, suffix)
    while True:
        path = os.path.join(directory, unique_name(prefix, suffix))
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode), path
        except FileExistsError:
            continue


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) so that a reader sees the old file or the new one,
    never part of one: into a new file next to it (:func:`create_file`, prefix ``.tmp-``, so what
    a killed writer leaves is removed by the next writer there), then renamed over ``path``.
    Raises :class:`OSError`; on any failure the new file is removed."""
    fd, tmp = create_file(os.path.dirname(os.fspath(path)) or ".", ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def temp_dir(kind: str, directory: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A private directory (mode 0700) ``handoff-KIND-<pid>-<random>`` in ``directory`` (default:
    the system's temporary directory), removed with everything in it when the block ends, however
    it ends. Stale directories of the same kind, left by killed processes, are removed first."""
    path = make_temp_dir(kind, directory)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_temp_dir(kind: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """:func:`temp_dir`'s directory, for a caller whose lifetime is not a block (a test session's
    private ``$HANDOFF_HOME``) and that removes it itself."""
    parent = os.fspath(directory) if directory is not None else tempfile.gettempdir()
    prefix = f"handoff-{kind}-"
    sweep_once(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def temp_file(kind: str, suffix: str = "") -> tuple[int, str]:
    """A private file (mode 0600) ``handoff-KIND-<pid>-<random>SUFFIX`` in the system's temporary
    directory, for the caller to write, use and unlink: ``(fd, path)``."""
    return create_file(tempfile.gettempdir(), f"handoff-{kind}-", suffix)
