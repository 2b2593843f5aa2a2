"""Verified-file records: a program file whose segments were all checked once, and that has not
changed since, is not checked again.

The checksum pass over the segments is most of what loading a program costs on top of the vendor
runtime (2 ms of CRC-32 for MobileNetV2's 14 MB blob, against ExecuTorch's 13 ms load + first
inference). Like git's index, a record is keyed by what ``stat`` says about the file: device,
inode, size, and modification and change times in nanoseconds. Any write to the file, a
``touch``, a rename over it or a copy changes at least one of them, so a file that differs from the
one that was checked is checked again, and damage still gives its one-line error.

Records live in ``$HANDOFF_HOME/verified``, one small file per key holding the manifest's
SHA-256 (so a record also names the content it was made for), then any notes about the file
computed from its bytes while it was checked, one ``name value`` per line: the blob keys of
:mod:`handoff.probe`, so that a later load of the unchanged file does not hash its blobs again, and
the release that validated its manifest (:data:`handoff.program.VALIDATED_NOTE`), so that the same
release decodes it without validating it again.
A process also remembers the recorded files it opened (:data:`handoff.program._OPENED`, under
this directory and key): its next open of the unchanged file reads only the header.
They are written after a load has checked every segment (``Program``), and by ``partition`` for
the file it wrote, from the digests computed while writing (:func:`record_written`: nothing is
read back). A record that cannot be read or written is a miss, never an error: it only saves time.

*Racy files.* File times come from a clock that ticks coarsely (a few ms on Linux, 1-2 s on some
file systems), so a file changed in the same tick in which it was checked keeps its times. As git
does, a file whose times are not clearly older than the start of the check is not recorded
(:data:`RACY_NS`); it is checked again by the next load, when it no longer is racy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import Mapping

from .cache import home_name
from .tempfiles import write_atomic

DIRECTORY = "verified"
#: a file changed less than this before its check began may still change unseen
RACY_NS = 50_000_000
#: ... and this on file systems with whole-second (or coarser) times
RACY_COARSE_NS = 2_000_000_000
#: at most this many records are kept; writing one more removes the oldest half
MAX_RECORDS = 4096
#: a record is read up to this size (a manifest digest and a few notes)
_MAX_RECORD_BYTES = 1 << 16


def _directory() -> Path:
    return Path(directory_name())


def directory_name() -> str:
    """Where records are kept now (``$HANDOFF_HOME/verified``)."""
    return _directory_of(home_name())


@functools.lru_cache(maxsize=16)
def _directory_of(home: str) -> str:
    return os.path.join(home, DIRECTORY)


def record_key(st: os.stat_result) -> str:
    """The name of the record of a file with this ``stat``: what identifies the file and its version."""
    return f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}"


def is_recorded(st: os.stat_result, manifest_sha256: bytes) -> bool:
    """Whether a file with exactly this ``stat`` and manifest digest was checked before."""
    return lookup(st, manifest_sha256) is not None


def lookup(st: os.stat_result, manifest_sha256: bytes) -> dict[str, str] | None:
    """The notes of the record of a file with exactly this ``stat`` and manifest digest (``{}``
    when it has none), or ``None`` when there is no such record."""
    try:  # on the first load of a recorded file in a process: one open, one read, one close
        fd = os.open(os.path.join(directory_name(), record_key(st)), os.O_RDONLY)
    except (OSError, ValueError):
        return None
    try:
        data = os.read(fd, _MAX_RECORD_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    first, _, rest = data.partition(b"\n")
    if first != manifest_sha256.hex().encode():
        return None
    notes = {}
    for line in rest.decode("ascii", "replace").splitlines():
        name, _, value = line.rpartition(" ")
        if name and value:
            notes[name] = value
    return notes


def racy(st: os.stat_result, started_ns: int) -> bool:
    """Whether the file may have changed, unseen by its times, after a check that began at
    ``started_ns`` (``time.time_ns()``)."""
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    coarse = st.st_mtime_ns % 1_000_000 == 0 and st.st_ctime_ns % 1_000_000 == 0
    return newest > started_ns - (RACY_COARSE_NS if coarse else RACY_NS)


def record(st: os.stat_result, manifest_sha256: bytes, started_ns: int, notes: Mapping[str, str] | None = None) -> bool:
    """Remember that the file with this ``stat`` was fully checked by a check that began at
    ``started_ns``, with ``notes`` (name -> value, neither holding a newline; names may hold
    spaces, values may not) computed from its bytes. Returns whether a record was written (not
    for a racy file, nor when ``$HANDOFF_HOME`` is not writable)."""
    if racy(st, started_ns):
        return False
    return _write_record(st, manifest_sha256, notes)


def record_written(path: str, written: os.stat_result, manifest_sha256: bytes, started_ns: int,
                   notes: Mapping[str, str] | None = None) -> bool:
    """Remember a program file this process has just written, without reading it back.
    ``written`` is the ``fstat`` of the (private, temporary) file before it was renamed to
    ``path``, taken once its times were no longer racy at ``started_ns``
    (:func:`wait_until_not_racy`); ``manifest_sha256`` the digest computed while writing;
    ``notes`` as for :func:`record`.

    The rename changes the file's ctime only. So the file now at ``path`` is the one written, with
    that content, when its device, inode, size and mtime still match ``written``: a write since
    would have moved its mtime past ``started_ns``, clearly later than the written file's (the
    racy rule, applied to the written file). Returns whether a record was written."""
    if racy(written, started_ns):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    same = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if same != (written.st_dev, written.st_ino, written.st_size, written.st_mtime_ns):
        return False
    return _write_record(st, manifest_sha256, notes)


def _write_record(st: os.stat_result, manifest_sha256: bytes, notes: Mapping[str, str] | None) -> bool:
    directory = _directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        text = manifest_sha256.hex() + "".join(f"\n{name} {value}" for name, value in sorted((notes or {}).items()))
        write_atomic(directory / record_key(st), text.encode())
        _prune(directory)
        return True
    except OSError:
        return False


def _prune(directory: Path) -> None:
    """Keep at most :data:`MAX_RECORDS` records (the newest)."""
    with contextlib.suppress(OSError):
        with os.scandir(directory) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        if len(entries) <= MAX_RECORDS:
            return
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        for e in entries[: len(entries) // 2]:
            with contextlib.suppress(OSError):
                os.unlink(e.path)


def wait_until_not_racy(st: os.stat_result) -> int:
    """Sleep until a check beginning now would not be racy for ``st`` (at most
    :data:`RACY_NS`, or :data:`RACY_COARSE_NS` on coarse file systems); returns ``time.time_ns()``."""
    now = time.time_ns()
    coarse = st.st_mtime_ns % 1_000_000 == 0 and st.st_ctime_ns % 1_000_000 == 0
    wait = max(st.st_mtime_ns, st.st_ctime_ns) + (RACY_COARSE_NS if coarse else RACY_NS) - now
    if wait > 0:
        time.sleep(wait / 1e9 + 0.001)
        now = time.time_ns()
    return now
