"""A versioned container for delegate blobs, for backends that want one (torch-free).

The core treats a blob as opaque bytes. Most backends still need the same envelope around their
vendor payload: a magic that says whose blob it is, a format version the runtime can refuse, a
small JSON header (compiler versions, shapes, the launch plan) and one or more binary sections.
This module is that envelope::

    offset 0    8 bytes    magic (the backend's own, e.g. b"HOFXNNPK")
    offset 8    u32 LE     the backend's blob format version (>= 1)
    offset 12   u32 LE     length N of the JSON header
    offset 16   N bytes    JSON header, UTF-8; zero padding up to a multiple of ``align``
    data        ...        the sections, each at an offset that is a multiple of ``align``

``header["sections"]`` lists ``{"name", "offset", "size"}`` with offsets from the start of the
data area (the first multiple of ``align`` at or after 16 + N), and ``header["align"]`` the
alignment, so readers need nothing else. :func:`unpack` bounds-checks everything and raises
``ValueError`` naming the problem, never anything else.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping

PREFIX = struct.Struct("<8sII")
MAX_HEADER = 16 * 1024 * 1024


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def pack(magic: bytes, version: int, header: Mapping[str, Any], sections: Mapping[str, Any], align: int = 16) -> bytes:
    """The blob: ``header`` (``sections`` and ``align`` are filled in) and each section's bytes."""
    if len(magic) != 8 or version < 1 or align < 1 or align & (align - 1):
        raise ValueError("magic must be 8 bytes, version >= 1, align a power of two")
    fields = dict(header)
    table, offset = [], 0
    for name, data in sections.items():
        size = memoryview(data).nbytes
        table.append({"name": name, "offset": offset, "size": size})
        offset = _round_up(offset + size, align)
    fields["sections"], fields["align"] = table, align
    text = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    start = _round_up(PREFIX.size + len(text), align)
    parts = [PREFIX.pack(magic, version, len(text)), text, b"\0" * (start - PREFIX.size - len(text))]
    for i, (entry, data) in enumerate(zip(table, sections.values())):
        if i:  # pad up to this section; nothing follows the last one
            parts.append(b"\0" * (entry["offset"] - table[i - 1]["offset"] - table[i - 1]["size"]))
        parts.append(bytes(memoryview(data).cast("B")))
    return b"".join(parts)


def unpack(blob: bytes | bytearray | memoryview, magic: bytes, version: int,
           what: str) -> tuple[int, dict[str, Any], dict[str, memoryview]]:
    """``(format version, header, {section name: zero-copy view})`` of a blob written by
    :func:`pack` with ``magic`` and a format version from 1 to ``version``.

    :param what: how messages name the blob ("xnnpack delegate blob").
    :raises ValueError: foreign magic, a newer format (with the fix), or any inconsistency.
    """
    view = memoryview(blob).cast("B")
    if len(view) < PREFIX.size:
        raise ValueError(f"{what} is truncated ({len(view)} bytes)")
    got_magic, got_version, length = PREFIX.unpack_from(view, 0)
    if got_magic != magic:
        raise ValueError(f"not a {what} (magic {bytes(got_magic)!r}, expected {magic!r}); "
                         f"it was written by another backend, or is corrupt")
    if got_version > version:
        raise ValueError(f"{what} format {got_version} is newer than this runtime reads ({version}); "
                         f"upgrade the plugin, or re-partition with the installed one")
    if got_version < 1:
        raise ValueError(f"{what} format {got_version} is invalid")
    if length > MAX_HEADER or PREFIX.size + length > len(view):
        raise ValueError(f"{what} is truncated or corrupt: header of {length} bytes, blob of {len(view)}")
    try:
        header = json.loads(bytes(view[PREFIX.size:PREFIX.size + length]))
        align = int(header["align"])
        table = [(str(s["name"]), int(s["offset"]), int(s["size"])) for s in header["sections"]]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ValueError(f"{what} header is corrupt: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict) or align < 1 or align & (align - 1):
        raise ValueError(f"{what} header is corrupt: bad alignment")
    start = _round_up(PREFIX.size + length, align)
    sections: dict[str, memoryview] = {}
    end = 0
    for name, offset, size in table:
        if name in sections or offset < end or size < 0 or offset % align or start + offset + size > len(view):
            raise ValueError(f"{what} is truncated or corrupt: section {name!r} ({size} bytes at {offset}) does "
                             f"not fit a blob of {len(view)} bytes")
        sections[name] = view[start + offset:start + offset + size]
        end = offset + size
    return got_version, header, sections
