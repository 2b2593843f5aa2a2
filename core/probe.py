"""Step 5a: a delegate blob nobody vouched for is loaded in a throwaway process first.

Some vendor runtimes do not survive a malformed blob: ExecuTorch's XNNPACK delegate aborts the
whole process (``terminate called after throwing ... UnicodeDecodeError``) on some mutated
programs whose checksums are valid, where it should return an error. A runtime that declares
:attr:`handoff.Runtime.isolate_untrusted` gets this treatment from the core: before its ``load``
sees a blob in the user's process, the blob is loaded, run once on zeros and released in a child
process (:func:`_serve`), under a memory cap and a time limit. A crash, a hang or an
allocation past the cap there becomes a one-line :class:`~handoff.HandoffError` here; success is
remembered, so each blob is probed once per ``$HANDOFF_HOME``:

* ``$HANDOFF_HOME/verified/<backend>/<key>`` records a blob that loaded and ran in a probe, or
  that ``partition`` produced on this machine (:func:`remember`, called when a program is
  written); the key is the SHA-256 of the backend, its version, the blob and its metadata;
* a known blob costs one SHA-256 of its bytes at load (measured in ``docs/security.md``), except
  in a program file recorded as checked and unchanged (:mod:`handoff.verified`): its record keeps
  the blob keys computed from its bytes, so later loads of the unchanged file skip the hash; and
  a key this process found known (or probed) is not looked up on disk again (:data:`_KNOWN`).

The child imports only the runtime half named by the backend's spec (``module:Class``), so it
needs no plugin discovery and no torch beyond what that runtime imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from typing import Any, Callable, Mapping, Sequence

from .cache import cache_dir, home_name
from .errors import HandoffError, one_line

#: Seconds a probe may take (loading a big model on a busy machine takes a few seconds).
TIMEOUT_SECONDS = 120
#: Address space of the probe process beyond the blob's own size (the vendor runtime's
#: libraries and what a sane load allocates). A blob that makes the runtime allocate more fails.
MEMORY_ALLOWANCE = 8 << 30
_LEN = struct.Struct("<Q")
#: The child's program. Not ``-m handoff.probe``: runpy warns when handoff's ``__init__`` has
#: imported this module already, and the warning would stand in for a crash's own last words.
_CHILD = "import sys; from handoff.probe import _serve; sys.exit(_serve())"
#: Exit status of a probe whose runtime raised (a clean error, reported as it is).
_RAISED = 3


def blob_key(backend: str, version: str, blob: Any, metadata: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for part in (backend.encode(), version.encode(), json.dumps(metadata, sort_keys=True).encode()):
        h.update(_LEN.pack(len(part)))
        h.update(part)
    h.update(blob)
    return h.hexdigest()


def note_name(segment: int, backend: str, version: str) -> str:
    """The name under which a verified file's record keeps the key of the blob in ``segment``
    (:meth:`handoff.program.ProgramFile.note`), for ``backend`` at ``version``."""
    return f"probe-key {segment} {backend} {version}"


def _record(backend: str, key: str) -> str | None:
    """The memo file of ``key`` (its directory created); ``None`` when ``$HANDOFF_HOME`` cannot be used."""
    try:
        return os.path.join(cache_dir(f"verified/{backend}"), key)
    except OSError:
        return None


#: blobs this process found or made known, as (``$HANDOFF_HOME``, backend, key): asked again, no
#: file system lookup (a blob known once stays known, like its memo file)
_KNOWN: set[tuple[str, str, str]] = set()
_MAX_KNOWN = 4096


def is_known(backend: str, key: str) -> bool:
    home = home_name()
    if (home, backend, key) in _KNOWN:
        return True
    # A lookup creates nothing (two mkdir calls per load otherwise).
    if not os.path.isfile(os.path.join(home, "verified", backend, key)):
        return False
    _know(home, backend, key)
    return True


def _know(home: str, backend: str, key: str) -> None:
    if len(_KNOWN) >= _MAX_KNOWN:
        _KNOWN.clear()
    _KNOWN.add((home, backend, key))


def remember(backend: str, key: str) -> None:
    """Record ``key`` as a blob that is safe to load in-process. Never raises."""
    path = _record(backend, key)
    if path is None:
        return
    try:
        with open(path, "wb"):
            pass
    except OSError:
        return
    _know(home_name(), backend, key)


def vouch(where: Callable[[], str], entry: Mapping[str, Any], inputs: Callable[[], Sequence[tuple[Sequence[int], str]]],
          version: str, runtime_ref: str, blob: Any, options: Mapping[str, Any], key: str | None = None) -> str:
    """Make sure loading ``blob`` cannot take the process down: return when it is known, else
    probe it in a child process and remember it; raise :class:`HandoffError` otherwise. Returns
    the blob's key.

    :param where: returns how errors name the delegate ("m.hof: delegate 0 (xnnpack_0, backend
        'xnnpack', segment 1 at offset 4096)"); called, like ``inputs``, only when the blob is probed.
    :param entry: its manifest entry (a delegate, or one of its fallback copies): backend, metadata.
    :param inputs: returns ``(shape, dtype)`` of each input the probe runs it on (zeros); called
        only when the blob is probed.
    :param key: the blob's key when it is known already (computed from these very bytes: a
        verified file's record keeps it), so the blob is not hashed again.
    """
    backend = entry["backend"]
    key = key or blob_key(backend, version, blob, entry["metadata"])
    if is_known(backend, key):
        return key
    where = where()
    request = json.dumps({"runtime": runtime_ref, "metadata": entry["metadata"], "options": dict(options),
                          "inputs": [[list(shape), dtype] for shape, dtype in inputs()],
                          "memory": MEMORY_ALLOWANCE + len(blob)}).encode()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
    except OSError as exc:
        raise HandoffError(f"{where}: cannot start a process to check the blob in ({one_line(exc)})") from exc
    try:
        out, err = proc.communicate(_LEN.pack(len(request)) + request + bytes(blob), timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise HandoffError(f"{where} hung: loading and running it once took over {TIMEOUT_SECONDS} s in a "
                           f"separate process; the blob is corrupt or hostile: re-partition the model") from None
    except BrokenPipeError:  # the child died before reading everything; its status says why
        out, err = b"", b""
        proc.wait()
    code = proc.returncode
    if code == 0:
        remember(backend, key)
        return key
    message = out.decode("utf-8", "replace").strip()
    if code == _RAISED and message:
        raise HandoffError(f"{where} failed to load: {message}")
    last = " ".join(err.decode("utf-8", "replace").strip().splitlines()[-2:])[-300:]
    how = _signal_name(-code) if code < 0 else f"exit status {code}"
    raise HandoffError(f"{where}: the vendor runtime crashed on this blob ({how}{': ' + last if last else ''}), "
                       f"in a separate process that checks blobs not made on this machine; the blob is corrupt or "
                       f"hostile: re-partition the model")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import the same handoff and plugins as this process, wherever they came from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
    return env


def _serve() -> int:
    """The child: read the request and the blob from stdin, load, run once on zeros, release."""
    import resource

    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vendor chatter on stdout must not mix with the result
    stdin = sys.stdin.buffer
    (size,) = _LEN.unpack(stdin.read(_LEN.size))
    request = json.loads(stdin.read(size))
    blob = stdin.read()
    limit = int(request["memory"])
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    try:
        import numpy as np

        from .backend import import_ref

        runtime = import_ref(request["runtime"])()
        handle = runtime.load(memoryview(blob), request["metadata"], request["options"])
        try:
            zeros = [np.zeros(shape, dtype=dtype) for shape, dtype in request["inputs"]]
            for array in zeros:
                array.flags.writeable = False
            outputs = runtime.execute(handle, zeros)
            if runtime.memory(handle) != "host":
                runtime.to_host(list(outputs))
        finally:
            runtime.release(handle)
    except Exception as exc:
        result.write(one_line(exc))
        result.flush()
        return _RAISED
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
