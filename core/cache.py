"""``$HANDOFF_HOME`` (default ``~/.handoff``): the tuning databases and the lowering cache.

The lowering cache maps a key (backend, its code, options, the partition's content) to the blob
and metadata a backend produced, so re-partitioning an unchanged model skips the vendor compiler.
Entries are written atomically; a damaged entry is a miss, never an error. Public API for plugins:
:func:`cache_dir` (``handoff.cache_dir``), for a backend's own caches (QNN's compile memo, Mesa's
shader cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .backend import Lowered

HOME_ENV = "HANDOFF_HOME"


def handoff_home() -> Path:
    """The root of every cache handoff keeps; created on demand."""
    home = Path(os.environ.get(HOME_ENV) or Path.home() / ".handoff").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_dir(name: str) -> Path:
    """``$HANDOFF_HOME/NAME``, created on demand (``tuning/tvm``, ``lowered``, ...)."""
    path = handoff_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclasses.dataclass
class CacheHit:
    """A cached blob, its metadata, and the seconds its compiler took to make it."""

    lowered: Lowered
    compile_seconds: float


class LoweringCache:
    """Blobs by content key under ``$HANDOFF_HOME/lowered``: ``KEY.blob`` and ``KEY.json`` (the
    blob's sha256, its metadata, the original compile time, so a cached run still reports it, and
    the local key's signature over all of these: a replaced blob and digest is a miss, not a blob
    a later ``partition`` embeds).

    The key (:meth:`key`) covers the backend, its plugin's code identity (distribution version and
    a digest of its files), the compiler's own ``cache_key()``, the options and the partition's
    content; a damaged entry is a miss, never an error.
    """

    def __init__(self, root: Path | None = None):
        self.root = root or cache_dir("lowered")

    @staticmethod
    def key(*parts: bytes | str) -> str:
        h = hashlib.sha256()
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def get(self, key: str) -> CacheHit | None:
        """The entry under ``key`` when its blob matches its digest and the entry carries the
        local key's signature; anything else (missing, damaged, replaced) is a miss."""
        from .signing import entry_is_authentic

        blob_path, meta_path = self.root / f"{key}.blob", self.root / f"{key}.json"
        try:
            meta = json.loads(meta_path.read_text())
            blob = blob_path.read_bytes()
            digest = hashlib.sha256(blob).hexdigest()
            entry = _signed_part(key, digest, meta["metadata"], meta["compile_seconds"])
            if digest != meta.get("sha256") or not entry_is_authentic(entry, meta.get("signature")):
                return None
            return CacheHit(Lowered(blob, dict(meta["metadata"])), float(meta["compile_seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, lowered: Lowered, compile_seconds: float) -> None:
        from .signing import sign_entry

        digest = hashlib.sha256(lowered.blob).hexdigest()
        meta = {"sha256": digest, "metadata": lowered.metadata, "compile_seconds": compile_seconds,
                "signature": sign_entry(_signed_part(key, digest, lowered.metadata, compile_seconds))}
        _atomic_write(self.root / f"{key}.blob", lowered.blob)
        _atomic_write(self.root / f"{key}.json", json.dumps(meta).encode())


def _signed_part(key: str, digest: str, metadata: Any, compile_seconds: Any) -> bytes:
    """What a cache entry's signature covers: its key, its blob's digest, its metadata and time."""
    return json.dumps([key, digest, metadata, compile_seconds], sort_keys=True).encode()
