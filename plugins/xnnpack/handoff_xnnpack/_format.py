"""The delegate blob of handoff-xnnpack, and the options both halves share.

Torch-free and executorch-free: imported by the plugin module, the compiler and the runtime.

A blob is an ExecuTorch program (``.pte``) whose single method ``forward`` is one
``XnnpackBackend`` delegate call, in the core's blob envelope (:mod:`handoff.blob`: magic
``b"HOFXNNPK"``, format version ``FORMAT_VERSION``, a JSON header, one section ``pte``).

The JSON header names what the runtime must match: the ExecuTorch release that wrote the program
(``executorch``), the program's flatbuffer identifier (``pte_identifier``, ``ET12`` in 1.5.1), and
the XNNPACK delegate's header magic and flatbuffer schema identifier (``xnnpack_header`` ``XH00``,
``xnnpack_schema`` ``XN01``).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

from handoff import Option, blob

MAGIC = b"HOFXNNPK"
FORMAT_VERSION = 2  # 1 was the layout before the shared handoff.blob envelope
_ALIGN = 16

#: The most worker threads a delegate may ask for (a program file's metadata or an option must
#: not be able to start thousands of OS threads).
MAX_THREADS = 256

#: Every option the backend accepts, compile time and run time alike (``--option xnnpack.NAME=VALUE``).
OPTIONS: dict[str, Option] = {
    "threads": Option("int", "worker threads of ExecuTorch's thread pool, which runs the XNNPACK kernels "
                             "('auto': ExecuTorch's default of one per core); the pool is process-wide, so every "
                             "XNNPACK delegate of a process uses the same count",
                      default=None, min=1, max=MAX_THREADS, aliases=("auto", "0")),
}


def pack(pte: bytes, header: Mapping[str, Any]) -> bytes:
    """Wrap ``pte`` in the blob envelope."""
    return blob.pack(MAGIC, FORMAT_VERSION, header, {"pte": pte}, align=_ALIGN)


def unpack(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], memoryview]:
    """Split a blob into its JSON header and a view of its .pte bytes; ``ValueError`` when the
    blob is not one of ours, or is of a newer format, truncated or inconsistent."""
    _, header, sections = blob.unpack(data, MAGIC, FORMAT_VERSION, "xnnpack delegate blob")
    if "pte" not in sections:
        raise ValueError("xnnpack delegate blob is corrupt: it has no 'pte' section")
    pte = sections["pte"]
    ident = header.get("pte_identifier")
    if ident and bytes(pte[4:8]) != str(ident).encode():
        raise ValueError(f"xnnpack delegate blob is corrupt: program identifier {bytes(pte[4:8])!r}, "
                         f"header says {ident!r}")
    return header, pte


@functools.cache  # every load compares the same two versions
def _release(version: str) -> tuple[int, ...]:
    """``"1.5.1+cpu"`` -> ``(1, 5, 1)``; ``()`` when it does not start with a number."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def check_compatible(header: Mapping[str, Any], runtime_version: str) -> None:
    """Refuse a blob written by an ExecuTorch release this runtime cannot be trusted to read.

    The program (``ET12``) and XNNPACK delegate (``XH00``/``XN01``) formats are versioned by
    ExecuTorch releases, not by a compatibility promise we can check from Python, so the runtime's
    ExecuTorch must be the same major.minor release as the compiler's (patch releases may differ).
    """
    built = str(header.get("executorch", "?"))
    what = (f"ExecuTorch {built} (program {header.get('pte_identifier', '?')}, XNNPACK delegate "
            f"{header.get('xnnpack_header', '?')}/{header.get('xnnpack_schema', '?')})")
    if len(_release(built)) < 2 or _release(built)[:2] != _release(runtime_version)[:2]:
        raise ValueError(f"xnnpack: delegate was built with {what} but this runtime has ExecuTorch "
                         f"{runtime_version}; rebuild the program with this ExecuTorch, or "
                         f"pip install executorch=={built}")
