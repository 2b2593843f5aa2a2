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
from pathlib import Path

from .backend import Lowered
from .tempfiles import create_file

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
    # ".tmp-<pid>-<random>": what a killed writer leaves is removed by the next writer here.
    fd, tmp = create_file(path.parent, ".tmp-")
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
    blob's sha256, its metadata, and the original compile time, so a cached run still reports it).

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
        blob_path, meta_path = self.root / f"{key}.blob", self.root / f"{key}.json"
        try:
            meta = json.loads(meta_path.read_text())
            blob = blob_path.read_bytes()
            if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
                return None
            return CacheHit(Lowered(blob, dict(meta["metadata"])), float(meta.get("compile_seconds", 0.0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, lowered: Lowered, compile_seconds: float) -> None:
        _atomic_write(self.root / f"{key}.blob", lowered.blob)
        meta = {"sha256": hashlib.sha256(lowered.blob).hexdigest(), "metadata": lowered.metadata,
                "compile_seconds": compile_seconds}
        _atomic_write(self.root / f"{key}.json", json.dumps(meta).encode())
