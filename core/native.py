"""Native code from program files: the one way a backend turns a blob into a file to ``dlopen``.

A delegate blob that is a shared library (the ``tvm`` backend's) is code. The core lets a runtime
load it only when the user trusts it: the program is signed by a trusted key (``handoff.signing``),
or the user passed ``--allow-unsigned`` / ``allow_unsigned=True``. The core then *approves* the
segment's SHA-256 from the (signed) manifest, and :func:`native_library` writes a blob to a file
only when the SHA-256 of the bytes it was given is approved: bytes that differ from what was signed
never reach ``dlopen``, whichever plugin asks. Compilers approve what they built themselves in
this process (a program partitioned and run in one process, as tests do).

Every runtime with native code declares ``Runtime.native_code = True`` and calls
:func:`native_library`; nothing else in handoff writes a blob to the file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from typing import Any, Iterator, Mapping, Sequence

from .errors import HandoffError

_APPROVED: set[str] = set()
_LOCK = threading.Lock()


def approve(sha256: str) -> None:
    """Allow native code whose SHA-256 is ``sha256`` (hex) to be loaded by this process."""
    with _LOCK:
        _APPROVED.add(sha256)


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def admit(program_file: Any, native: Sequence[tuple[str, Mapping[str, Any]]], trusted_keys: Sequence[Any] = (),
          allow_unsigned: bool = False) -> str:
    """Decide whether the native-code delegate blobs ``native`` of ``program_file`` may load, and
    approve their segments' SHA-256 if so. Each item is ``(what, entry)``: a manifest delegate
    entry, or one of its fallback copies (format 1.3), and the words naming it in the error
    ("delegate 0 (tvm_0, backend 'tvm')").

    :returns: how the program was trusted ("signed by key ... (trusted: the local key)",
        "unsigned, allowed by --allow-unsigned").
    :raises HandoffError: naming the first native delegate, the signature's state, and the
        choices (``--trusted-keys DIR``, ``--allow-unsigned``).
    """
    from . import signing

    manifest = program_file.manifest
    if allow_unsigned:
        how = "unsigned, allowed by --allow-unsigned"
    else:
        verdict = signing.verify(manifest, signing.trusted_keys(trusted_keys))
        if verdict.trusted_by is None:
            raise HandoffError(f"{program_file.name}: {native[0][0]} is native code and the program is "
                               f"{verdict.describe()}; load it only if you trust it: add the signer's public key with "
                               f"--trusted-keys DIR (or to $HANDOFF_HOME/trusted), or pass --allow-unsigned")
        how = verdict.describe()
    for _, entry in native:
        approve(manifest["segments"][entry["segment"]]["sha256"])
    return how


@contextlib.contextmanager
def native_library(blob: bytes | memoryview, what: str, suffix: str = ".so") -> Iterator[str]:
    """The path of a private file holding ``blob``, for as long as the ``with`` block runs; the
    file and its directory are removed afterwards (dlopen keeps the mapping), so nothing is left
    behind even if the process dies later.

    :param what: names the delegate in the error ("delegate 0 (tvm_0, backend 'tvm')").
    :raises HandoffError: the blob's SHA-256 was not approved: its program is not trusted, or its
        bytes differ from the ones that were signed.
    """
    digest = sha256(blob)
    with _LOCK:
        approved = digest in _APPROVED
    if not approved:
        raise HandoffError(f"{what}: native code with sha256 {digest[:16]}… was not approved for loading: its "
                           f"program is not signed by a trusted key, or its bytes differ from the signed ones; sign "
                           f"the program (handoff sign), pass --trusted-keys DIR, or --allow-unsigned if you trust it")
    directory = tempfile.mkdtemp(prefix=f"handoff-native-{os.getpid()}-")  # mode 0700
    try:
        path = os.path.join(directory, f"delegate{suffix}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)
