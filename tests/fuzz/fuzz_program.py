"""Fuzz the ``.hof`` reader and manifest validator: ``ProgramFile.from_bytes``, then every check a
reader can ask for (``verify_all``, each segment, each constant as an array).

Most mutations of a program would stop at the manifest's SHA-256 or the header's file size, so
the harness first makes those two fields agree with the bytes it was given (the attacker can do
the same); one input in seven is read exactly as it is, to keep the header checks covered.
Seeds: ``corpus/program/`` (zoo architectures at tiny widths, every backend, data-only too).
"""

from __future__ import annotations

import hashlib
import struct

import _harness

EXPECTED: tuple[type[BaseException], ...] = ()


def setup() -> None:
    global EXPECTED
    from handoff import HandoffError

    EXPECTED = (HandoffError,)


def consistent(data: bytes) -> bytes:
    """``data`` with ``header.file_size`` and ``header.manifest_sha256`` made to match it."""
    from handoff.program import HEADER_FIELDS, HEADER_SIZE, MAGIC

    if len(data) < HEADER_SIZE or not data.startswith(MAGIC) or len(data) % 7 == 0:
        return data
    out = bytearray(data)
    struct.pack_into("<Q", out, HEADER_FIELDS["file_size"], len(out))
    moff, mlen = struct.unpack_from("<QQ", out, HEADER_FIELDS["manifest_offset"])
    if HEADER_SIZE <= moff <= len(out) and mlen <= len(out) - moff:
        out[HEADER_FIELDS["manifest_sha256"]:HEADER_FIELDS["manifest_sha256"] + 32] = \
            hashlib.sha256(out[moff:moff + mlen]).digest()
    return bytes(out)


def one_input(data: bytes) -> None:
    from handoff.program import ProgramFile, constant_array

    with ProgramFile.from_bytes(consistent(data), name="fuzz.hof") as pf:
        for i in range(len(pf.manifest["constants"])):
            constant_array(pf, i)
        for i in range(len(pf)):
            pf.segment(i).release()
        pf.verify_all()


if __name__ == "__main__":
    _harness.main("fuzz_program")
