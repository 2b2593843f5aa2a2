"""The runtime half of the contract checks, run in a child process (``python -m
handoff.conformance.probe REQUEST.json``), so that a runtime that crashes or hangs on a bad blob
fails its check instead of taking the test session down.

The request names the backend, the plugin and runtime modules, one delegate blob with its
metadata, parsed runtime options and inputs (``.npz``), and the checks to run. Each check prints
one JSON line ``{"check", "ok", "message"}`` *before* (``"ok": null``) and after it runs, so the
parent knows which check was in progress when the process died.
"""

from __future__ import annotations

import json
import resource
import struct
import sys
import threading
from typing import Any, Callable

#: Heap growth (ru_maxrss) a runtime may show while refusing a bad blob before the check says it
#: allocated what the blob merely declares.
MAX_GROWTH_BYTES = 512 * 1024 * 1024
THREADS, ROUNDS = 4, 8


def _say(check: str, ok: bool | None, message: str = "", **extra: Any) -> None:
    print(json.dumps({"check": check, "ok": ok, "message": message, **extra}), flush=True)


def _modules() -> list[str]:
    return sorted({m.partition(".")[0] for m in sys.modules if not m.startswith("_")})


def _maxrss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def main(path: str) -> int:
    with open(path) as f:
        req = json.load(f)
    import importlib

    import handoff  # noqa: F401
    import handoff.runtime  # noqa: F401
    import numpy as np

    if req.get("mode") == "compiler":  # only: what importing the compiler half pulls in
        before = set(_modules())
        importlib.import_module(req["compiler_module"])
        _say("compiler-modules", True, modules=sorted(set(_modules()) - before))
        return 0
    baseline = _modules()
    importlib.import_module(req["plugin_module"])
    after_plugin = _modules()
    importlib.import_module(req["runtime_module"])
    after_runtime = _modules()
    _say("modules", True, baseline=baseline, plugin=after_plugin, runtime=after_runtime)
    if not req.get("blob"):
        return 0

    from handoff.plugins import Plugins

    plugins = Plugins(extra=req["plugins_env"])  # the parent's environment: the same plugins
    runtime = plugins.runtime(req["backend"])
    blob = open(req["blob"], "rb").read()
    if getattr(runtime, "native_code", False):
        # The suite built this blob itself, so it is trusted, as a signed program's segment would
        # be; the bad blobs the checks make are not approved: handoff.native_library refuses them.
        from handoff.native import approve, sha256

        approve(sha256(blob))
    metadata, options = req["metadata"], req["options"]
    with np.load(req["inputs"]) as data:
        inputs = [np.ascontiguousarray(data[f"arr_{i}"]) for i in range(len(data.files))]
    for a in inputs:
        a.flags.writeable = False  # as the core hands them over

    def run(handle: Any) -> list[Any]:
        outs = list(runtime.execute(handle, inputs))
        if runtime.memory(handle) != "host":
            outs = list(runtime.to_host(outs))
        return [np.array(o, copy=True) for o in outs]

    handle = runtime.load(memoryview(blob), metadata, options)
    reference = run(handle)
    runtime.release(handle)
    _say("runtime-modules", True, modules=_modules())
    checks: dict[str, Callable[[], str | None]] = {
        "foreign-blob": lambda: _foreign(runtime, blob, metadata, options),
        "corrupt-blob": lambda: _corrupt(runtime, blob, metadata, options),
        "threads": lambda: _threads(runtime, blob, metadata, options, run, reference),
    }
    for name in req["checks"]:
        _say(name, None)
        try:
            problem = checks[name]()
        except Exception as exc:
            problem = f"the check itself raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        _say(name, problem is None, problem or "")
    return 0


def _refusal(runtime: Any, blob: bytes, metadata: Any, options: Any, what: str) -> str | None:
    """``None`` when ``load`` refuses the blob with a message; what went wrong otherwise."""
    before = _maxrss()
    try:
        handle = runtime.load(memoryview(blob), metadata, options)
    except Exception as exc:
        if not str(exc).strip():
            return f"{what}: load raised {type(exc).__name__} with no message; say what is wrong and the fix"
        grew = _maxrss() - before
        if grew > MAX_GROWTH_BYTES:
            return f"{what}: refused, but only after growing the heap by {grew >> 20} MB for a {len(blob)}-byte blob"
        return None
    try:
        runtime.release(handle)
    except Exception:
        pass
    return f"{what}: load accepted it; refuse it with ValueError and a one-line message"


_ENVELOPE = struct.Struct("<8sII")


def _envelope(blob: bytes) -> tuple[bytes, int, dict[str, Any], dict[str, memoryview]] | None:
    """``(magic, version, header, sections)`` when ``blob`` is a handoff.blob envelope."""
    from handoff import blob as envelope

    if len(blob) < _ENVELOPE.size:
        return None
    magic, version, _ = _ENVELOPE.unpack_from(blob)
    try:
        _, header, sections = envelope.unpack(blob, magic, version, "blob")
    except ValueError:
        return None
    return magic, version, header, sections


def _foreign(runtime: Any, blob: bytes, metadata: Any, options: Any) -> str | None:
    """A blob of a newer format (handoff.blob envelope), or recorded as made by another version
    of the vendor compiler (metadata ``*version`` fields), must be refused."""
    env = _envelope(blob)
    if env is not None:
        magic, version, header, sections = env
        newer = bytearray(blob)
        struct.pack_into("<I", newer, 8, version + 1)
        return _refusal(runtime, bytes(newer), metadata, options, f"a blob of format {version + 1} (this one is {version})")
    keys = [k for k in metadata if str(k).lower().endswith("version")]
    if not keys:
        return ("the blob carries no version marker the suite can find: wrap it with handoff.blob.pack (a format "
                "version load checks), or record the compiler's version in metadata (a KEY ending in 'version') "
                "and refuse other versions in load")
    foreign = dict(metadata, **{k: "999.0.0" for k in keys})
    return _refusal(runtime, blob, foreign, options, f"metadata {', '.join(f'{k}=999.0.0' for k in keys)}")


def _corrupt(runtime: Any, blob: bytes, metadata: Any, options: Any) -> str | None:
    """Empty, truncated and garbage blobs (and, for envelopes, lengths that lie) are refused."""
    import random

    rng = random.Random(1234)
    bad = {"an empty blob": b"", "8 bytes of it": blob[:8], "its first half": blob[:len(blob) // 2],
           f"{len(blob)} random bytes": bytes(rng.getrandbits(8) for _ in range(len(blob)))}
    if _envelope(blob) is not None:
        huge = bytearray(blob)
        struct.pack_into("<I", huge, 12, 0xFFFFFFF0)
        bad["an envelope whose header claims 4 GB"] = bytes(huge)
    problems = [p for what, data in bad.items() if (p := _refusal(runtime, data, metadata, options, what))]
    return "; ".join(problems) or None


def _threads(runtime: Any, blob: bytes, metadata: Any, options: Any, run: Callable[[Any], Any],
             reference: list[Any]) -> str | None:
    """``execute`` from 4 threads at once gives the single-threaded result every time (one shared
    handle for a reentrant runtime, a handle per thread otherwise)."""
    import numpy as np

    shared = bool(getattr(runtime, "reentrant", False))
    handles = [runtime.load(memoryview(blob), metadata, options)] * THREADS if shared else \
        [runtime.load(memoryview(blob), metadata, options) for _ in range(THREADS)]
    problems: list[str] = []
    barrier = threading.Barrier(THREADS)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for r in range(ROUNDS):
                for k, (got, want) in enumerate(zip(run(handles[i]), reference)):
                    if got.shape != want.shape or not np.array_equal(got, want, equal_nan=True):
                        problems.append(f"thread {i}, round {r}: output {k} differs from the single-threaded run")
                        return
        except Exception as exc:
            problems.append(f"thread {i}: execute raised {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for handle in {id(h): h for h in handles}.values():
        runtime.release(handle)
    if problems:
        how = "one shared handle (reentrant = True)" if shared else "a handle per thread"
        return f"{THREADS} threads, {how}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
