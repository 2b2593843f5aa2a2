"""``$HANDOFF_HOME`` (default ``~/.handoff``): the tuning databases and the lowering cache.

The lowering cache maps a key (backend, version, options, the partition's graph and weights) to
the blob and metadata a backend produced, so re-partitioning an unchanged model skips the vendor
compiler. Entries are written atomically; a damaged entry is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

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


class LoweringCache:
    """Blobs by content key under ``$HANDOFF_HOME/lowered``."""

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

    def get(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        blob_path, meta_path = self.root / f"{key}.blob", self.root / f"{key}.json"
        try:
            meta = json.loads(meta_path.read_text())
            blob = blob_path.read_bytes()
        except (OSError, ValueError):
            return None
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            return None
        return blob, meta["metadata"]

    def put(self, key: str, blob: bytes, metadata: dict[str, Any]) -> None:
        _atomic_write(self.root / f"{key}.blob", blob)
        meta = {"sha256": hashlib.sha256(blob).hexdigest(), "metadata": metadata}
        _atomic_write(self.root / f"{key}.json", json.dumps(meta).encode())
