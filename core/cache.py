"""``$HANDOFF_HOME`` (default ``~/.handoff``): the tuning databases and the lowering cache.

The lowering cache maps a key (backend, its code, options, the partition's content) to the blob
and metadata a backend produced, so re-partitioning an unchanged model skips the vendor compiler.
Entries are written atomically; a damaged entry is a miss, never an error. Public API for plugins:
:func:`cache_dir` (``handoff.cache_dir``), for a backend's own caches (QNN's compile memo, Mesa's
shader cache).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .backend import Lowered
from .tempfiles import write_atomic

HOME_ENV = "HANDOFF_HOME"


def home_name() -> str:
    """``$HANDOFF_HOME`` (default ``~/.handoff``), ``~`` expanded; nothing is created (lookups
    that find nothing must not make directories)."""
    home = os.environ.get(HOME_ENV)
    if home and home[0] != "~":  # nothing to expand (every load asks: records and blob memos live here)
        return home
    return _expanded(home or "~/.handoff", os.environ.get("HOME"))


@functools.lru_cache(maxsize=16)
def _expanded(home: str, user_home: str | None) -> str:
    """``home`` with ``~`` expanded (``os.path.expanduser`` reads ``$HOME``, part of the key)."""
    return os.path.expanduser(home)


def handoff_home() -> Path:
    """The root of every cache handoff keeps; created on demand."""
    home = Path(home_name())
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_dir(name: str) -> Path:
    """``$HANDOFF_HOME/NAME``, created on demand (``tuning/tvm``, ``lowered``, ...)."""
    path = handoff_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass
class CacheHit:
    """A cached blob, its metadata, and the seconds its compiler took to make it."""

    lowered: Lowered
    compile_seconds: float


class LoweringCache:
    """Blobs by content key under ``$HANDOFF_HOME/lowered``: ``KEY.blob`` and ``KEY.json`` (the
    blob's sha256, its metadata, the original compile time, so a cached run still reports it, and
    the local key's signature over all of these: a replaced blob and digest is a miss, not a blob
    a later ``partition`` embeds). Failures are kept beside them (``KEY.failed.json``,
    :meth:`failure`).

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
        write_atomic(self.root / f"{key}.blob", lowered.blob)
        write_atomic(self.root / f"{key}.json", json.dumps(meta).encode())


    def failure(self, key: str) -> dict[str, str] | None:
        """The failure remembered under ``key`` (``first_op`` and ``message``), else ``None``."""
        try:
            entry = json.loads((self.root / f"{key}.failed.json").read_text())
            return {"first_op": str(entry["first_op"]), "message": str(entry["message"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put_failure(self, key: str, first_op: str, message: str, seconds: float) -> None:
        """Remember that the partition under ``key`` failed to lower: where (the first failing op,
        found by probing: a lowering per node) and the compiler's words, so a strategy or run that
        plans the same partition gets the same failure without compiling or probing again.

        Plain JSON, not signed: an entry only moves a partition to the next backend (or stops the
        run with its message), it never supplies code. A failure that may not recur (the machine
        ran out of memory) is retried with ``--no-cache`` (``use_cache=False``)."""
        entry = {"first_op": first_op, "message": message, "seconds": seconds}
        write_atomic(self.root / f"{key}.failed.json", json.dumps(entry).encode())


def _signed_part(key: str, digest: str, metadata: Any, compile_seconds: Any) -> bytes:
    """What a cache entry's signature covers: its key, its blob's digest, its metadata and time."""
    return json.dumps([key, digest, metadata, compile_seconds], sort_keys=True).encode()


class CapabilityCache:
    """Backends' answers about one graph, remembered: ``Compiler.support`` and ``fused_patterns``
    per backend, and ``Compiler.check_partition`` per planned partition (QNN and Core ML compile
    each candidate to answer it). :func:`handoff.partition` asks through one of these, so a
    backend is asked once per graph: ``handoff compare`` shares one across its strategies, and
    on disk (``$HANDOFF_HOME/capability``, unless ``disk=False``) later runs share the answers.

    Keys (:meth:`key`) are built like the lowering cache's: the backend, its plugin's code
    identity, the compiler's ``cache_key()``, its options and a digest of the graph's content
    (:func:`handoff.lower.graph_digest`: nodes, their dtypes and shapes, the weights). An entry is
    only a claim about what a backend takes: a damaged or edited one is a miss or, at worst, a
    partition that fails to lower and moves on (``--on-lower-error fallback``), never code that
    runs; so entries are plain JSON, not signed like lowered blobs.
    """

    def __init__(self, root: Path | None = None, disk: bool = True):
        self.root = (root or cache_dir("capability")) if disk else None
        self.memory: dict[str, Any] = {}
        self.hits = 0
        self.misses = 0

    key = staticmethod(LoweringCache.key)

    def get(self, key: str, compute: Any) -> Any:
        """The answer under ``key``, else ``compute()`` (a JSON value), remembered."""
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        if self.root is not None:
            try:
                value = json.loads((self.root / f"{key}.json").read_text())["answer"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
            else:
                self.hits += 1
                self.memory[key] = value
                return value
        value = compute()
        self.misses += 1
        self.memory[key] = value
        if self.root is not None:
            write_atomic(self.root / f"{key}.json", json.dumps({"answer": value}).encode())
        return value
