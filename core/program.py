"""The ``.hof`` program file, format version 1.5: reader, writer and validation.

A program file is one header, the segments (delegate blobs and constant tensors, each aligned),
and a JSON manifest that says what the segments are and how to run them::

    0      96-byte header (magic, version, sizes, manifest offset/length/sha256)
    96     zero padding up to the first aligned offset
    ...    segment 0 | padding | segment 1 | padding | ...      (each at a multiple of alignment)
    ...    manifest: compact UTF-8 JSON                          (last, ends the file)

``docs/format.md`` is the specification; this module is its reference implementation. It imports
only the standard library and numpy, because the runtime (which must not import torch) reads
programs with it.

Reading never trusts the file: every failure, whatever the bytes, is a
:class:`~handoff.errors.ProgramFormatError` naming the field and byte offset, never another
exception type, and nothing is allocated from a size the file claims before that size has been
checked against the file. Segments are handed out as read-only, zero-copy memoryviews into a
read-only memory map, checked on first access against their XXH3-64 (format 1.4, from the
maintained ``xxhash`` library: 4x faster than CRC-32 here, and what catches a damaged file), or in
older files their CRC-32 (1.1) or SHA-256 (1.0). Format 1.5 added the unsigned ``uint16``,
``uint32`` and ``uint64`` dtypes (16-bit quantized activations cross partitions as ``uint16``).
A file opened by path whose segments were all checked before and that has not changed since
(:mod:`handoff.verified`, keyed like git's index by device, inode, size and times) is not checked
again. :meth:`ProgramFile.verify_all` checks every segment's SHA-256. Segments are zero-copy views
into the memory map, or into the file read whole when it is small (:data:`READ_BELOW_BYTES`).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import mmap
import operator
import os
import stat
import struct
import time
import weakref
import zlib
from typing import Any, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np

from . import verified
from .errors import HandoffError, ProgramFormatError
from .tempfiles import create_file

__all__ = [
    "MAGIC",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "HEADER_SIZE",
    "HEADER_FIELDS",
    "DTYPES",
    "ProgramFile",
    "write_program",
    "program_bytes",
    "value_nbytes",
    "constant_array",
]

#: First 8 bytes of every program (PNG-style: non-ASCII byte, name, CR LF, ^Z, LF).
MAGIC = b"\x89HOF\r\n\x1a\n"
FORMAT_MAJOR = 1
FORMAT_MINOR = 5
HEADER_SIZE = 96

#: Header flag bits understood by this reader (none are defined in 1.0).
KNOWN_FLAGS = 0
MIN_ALIGNMENT = 8
MAX_ALIGNMENT = 65536
DEFAULT_ALIGNMENT = 64
MAX_MANIFEST_LENGTH = 64 * 1024 * 1024
#: Dimensions are ``0 <= d < MAX_DIM``.
MAX_DIM = 2**31
#: At most this many dimensions (numpy 1.x's limit).
MAX_RANK = 32
#: ``element count * itemsize`` of any value.
MAX_VALUE_NBYTES = 2**40
#: Encoded instruction arguments nest at most this deep (an element of ``args`` is depth 1).
MAX_ARG_DEPTH = 32
#: The manifest JSON as a whole nests at most this deep (the top-level object is depth 1).
MAX_JSON_DEPTH = 64
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_U64_MAX = 2**64 - 1

#: dtype name in the manifest -> numpy dtype (explicitly little-endian).
DTYPES: dict[str, str] = {
    "float32": "<f4",
    "float16": "<f2",
    "float64": "<f8",
    "int8": "i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint8": "u1",
    "bool": "?",
    # format 1.5
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
}
_ITEMSIZE = {name: np.dtype(code).itemsize for name, code in DTYPES.items()}

#: Header layout: little-endian, no implicit padding.
_HEADER = struct.Struct("<8sHHIQQQII32s16s")
assert _HEADER.size == HEADER_SIZE

#: Byte offset of each header field; errors name ``header.<field>`` at this offset.
HEADER_FIELDS = {
    "magic": 0,
    "major": 8,
    "minor": 10,
    "flags": 12,
    "file_size": 16,
    "manifest_offset": 24,
    "manifest_length": 32,
    "alignment": 40,
    "reserved0": 44,
    "manifest_sha256": 48,
    "reserved1": 80,
}

_ARG_TAGS = ("value", "float", "dtype", "device", "layout", "memory_format")
_SPECIAL_FLOATS = ("inf", "-inf", "nan")
_REQUIRED_KEYS = (
    "handoff_version",
    "values",
    "inputs",
    "outputs",
    "constants",
    "delegates",
    "instructions",
    "segments",
    "metadata",
)


class _Header(NamedTuple):
    major: int
    minor: int
    flags: int
    file_size: int
    manifest_offset: int
    manifest_length: int
    alignment: int


# ----------------------------------------------------------------------------------------------
# Header


def _fail_header(name: str, field: str, problem: str) -> ProgramFormatError:
    return ProgramFormatError(name, f"header.{field}", HEADER_FIELDS[field], problem)


def _parse_header(head: bytes, size: int, name: str) -> tuple[_Header, bytes]:
    """Check the header against the file size. ``head`` is the file's first bytes (up to 96)."""
    if size < HEADER_SIZE:
        n = min(size, len(MAGIC))
        if head[:n] != MAGIC[:n]:
            raise _fail_header(name, "magic", f"not a handoff program (magic is {bytes(head[:n])!r})")
        raise ProgramFormatError(
            name, "header", 0, f"file is {size} bytes, shorter than the {HEADER_SIZE}-byte header (truncated?)"
        )
    (magic, major, minor, flags, file_size, moff, mlen, alignment, reserved0, digest, reserved1) = _HEADER.unpack(
        bytes(head[:HEADER_SIZE])
    )
    if magic != MAGIC:
        raise _fail_header(name, "magic", f"not a handoff program (magic is {magic!r}, expected {MAGIC!r})")
    if major != FORMAT_MAJOR:
        raise _fail_header(
            name,
            "major",
            f"format version {major}.{minor} is not supported by this reader (supports {FORMAT_MAJOR}.x); "
            "re-partition with this handoff version or upgrade handoff",
        )
    # Any minor is accepted: 1.x readers ignore what they do not know.
    if flags & ~KNOWN_FLAGS:
        raise _fail_header(
            name,
            "flags",
            f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:08x} set (format {major}.{minor}; this reader "
            f"supports {FORMAT_MAJOR}.{FORMAT_MINOR}); upgrade handoff",
        )
    if file_size != size:
        what = "truncated" if size < file_size else "trailing data"
        raise _fail_header(name, "file_size", f"header says {file_size} bytes but the file is {size} bytes ({what})")
    if not (MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT) or alignment & (alignment - 1):
        raise _fail_header(
            name, "alignment", f"{alignment} is not a power of two between {MIN_ALIGNMENT} and {MAX_ALIGNMENT}"
        )
    if reserved0 != 0:
        raise _fail_header(name, "reserved0", f"reserved field is 0x{reserved0:08x}, must be 0")
    if reserved1 != bytes(16):
        raise _fail_header(name, "reserved1", f"reserved bytes are {reserved1.hex()}, must be zero")
    if moff < HEADER_SIZE or moff > size:
        raise _fail_header(
            name, "manifest_offset", f"{moff} is outside the file's body [{HEADER_SIZE}, {size}]"
        )
    if mlen > MAX_MANIFEST_LENGTH:
        raise _fail_header(name, "manifest_length", f"{mlen} bytes exceeds the {MAX_MANIFEST_LENGTH}-byte limit")
    if mlen > size - moff:
        raise _fail_header(
            name, "manifest_length", f"manifest [{moff}, {moff + mlen}) runs past the end of the file ({size} bytes)"
        )
    return _Header(major, minor, flags, file_size, moff, mlen, alignment), digest


# ----------------------------------------------------------------------------------------------
# Manifest: JSON decoding


class _JSONReject(Exception):
    pass


def _reject_constant(token: str) -> Any:
    raise _JSONReject(f"{token} is not valid JSON (encode special floats as {{\"float\": \"nan\"}})")


def _parse_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _JSONReject(f"number {token[:40]} overflows a float64")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JSONReject(f"duplicate key {key[:60]!r} in an object")
            seen.add(key)
    return result


_BRACKET_DELTA = np.zeros(256, dtype=np.int8)
_BRACKET_DELTA[[ord("["), ord("{")]] = 1
_BRACKET_DELTA[[ord("]"), ord("}")]] = -1
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_CHUNK = 1 << 20


def _json_depth(valid_json: bytes) -> int:
    """Maximum nesting depth of arrays and objects in text that json.loads accepted.

    Vectorised, in 1 MiB chunks (bounded temporaries): a quote is a string delimiter unless an
    odd run of backslashes precedes it; brackets between delimiters are string contents. (In
    UTF-8 these ASCII bytes never occur inside a multi-byte character.)
    """
    data = np.frombuffer(valid_json, dtype=np.uint8)
    depth = deepest = 0
    quotes_so_far = 0  # delimiting quotes before this chunk
    backslash_run = 0  # backslashes ending the previous chunk
    for start in range(0, len(data), _CHUNK):
        c = data[start : start + _CHUNK]
        is_backslash = c == _BACKSLASH
        delimiter = c == _QUOTE
        if backslash_run or is_backslash.any():
            pos = np.arange(len(c), dtype=np.int64)
            # Index of the last non-backslash at or before i (carried in from the last chunk).
            last = np.where(is_backslash, -1 - backslash_run, pos)
            np.maximum.accumulate(last, out=last)
            run_before = np.empty(len(c), dtype=np.int64)  # backslashes immediately before i
            run_before[0] = backslash_run
            np.subtract(pos[:-1], last[:-1], out=run_before[1:])
            delimiter &= (run_before & 1) == 0
            backslash_run = int(len(c) - 1 - last[-1])
        count = np.cumsum(delimiter, dtype=np.int32)
        delta = _BRACKET_DELTA[c]
        delta[((count + quotes_so_far) & 1).astype(bool)] = 0  # brackets inside strings
        running = np.cumsum(delta, dtype=np.int32)
        deepest = max(deepest, depth + int(running.max()))
        depth += int(running[-1])
        quotes_so_far += int(count[-1])
    return deepest


def _decode_manifest(data: bytes, name: str, moff: int) -> Any:
    def fail(problem: str) -> ProgramFormatError:
        return ProgramFormatError(name, "manifest", moff, problem)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 (byte 0x{data[e.start]:02x} at manifest byte {e.start})") from None
    # Millions of small containers (a hostile 64 MiB manifest) make the cyclic GC run over and
    # over during parsing (10x slower); nothing cyclic is created here, so pause it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        obj = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
            object_pairs_hook=_no_duplicate_keys,
        )
    except _JSONReject as e:
        raise fail(str(e)) from None
    except json.JSONDecodeError as e:
        raise fail(f"not valid JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:
        raise fail(f"JSON nests more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, MemoryError) as e:  # e.g. an integer literal over Python's digit limit
        raise fail(f"not valid JSON ({' '.join(str(e).split())[:120]})") from None
    finally:
        if gc_was_enabled:
            gc.enable()
    # Fewer brackets than the limit cannot nest deeper than it (most manifests: no scan at all).
    depth = 0 if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH else _json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise fail(f"JSON nests {depth} levels deep, more than {MAX_JSON_DEPTH}")
    return obj


# ----------------------------------------------------------------------------------------------
# Manifest: schema and dataflow validation


def _tname(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, int):
        return "an integer"
    if isinstance(x, float):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


class _Validator:
    """Checks a decoded manifest against the schema, the file layout and the dataflow rules."""

    def __init__(self, name: str, header: _Header):
        self.name = name
        self.h = header
        self.moff = header.manifest_offset

    def fail(self, field: str, problem: str, offset: int | None = None) -> ProgramFormatError:
        return ProgramFormatError(self.name, field, self.moff if offset is None else offset, problem)

    def newer(self) -> str:
        """For an unknown enumeration value (op, dtype): the upgrade hint where the file's minor
        version is newer than this reader's (a later minor may add values, docs/format.md §6)."""
        if self.h.minor <= FORMAT_MINOR:
            return ""
        return (f"; the file is format {self.h.major}.{self.h.minor}, newer than this reader's "
                f"{FORMAT_MAJOR}.{FORMAT_MINOR}: upgrade handoff")

    # -- typed accessors
    def key(self, obj: dict, key: str, path: str) -> Any:
        if key not in obj:
            raise self.fail(f"{path}.{key}", "is missing")
        return obj[key]

    def dict_(self, x: Any, path: str) -> dict:
        if not isinstance(x, dict):
            raise self.fail(path, f"expected an object, got {_tname(x)}")
        return x

    def list_(self, x: Any, path: str) -> list:
        if not isinstance(x, list):
            raise self.fail(path, f"expected a list, got {_tname(x)}")
        return x

    def str_(self, x: Any, path: str, nonempty: bool = False) -> str:
        if not isinstance(x, str):
            raise self.fail(path, f"expected a string, got {_tname(x)}")
        if not x.isascii():
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise self.fail(path, "string holds an unpaired UTF-16 surrogate") from None
        if nonempty and not x:
            raise self.fail(path, "must not be empty")
        return x

    def int_(self, x: Any, path: str, lo: int, hi: int, what: str = "") -> int:
        if type(x) is not int:
            raise self.fail(path, f"expected an integer, got {_tname(x)}")
        if not lo <= x <= hi:
            raise self.fail(path, f"{_short(x)} is out of range [{lo}, {hi}]{what}")
        return x

    def ref(self, x: Any, path: str, count: int, kind: str) -> int:
        if type(x) is not int:
            raise self.fail(path, f"expected an integer {kind} index, got {_tname(x)}")
        if not 0 <= x < count:
            raise self.fail(path, f"{kind} {_short(x)} does not exist (there are {count})")
        return x

    # -- the manifest
    def run(self, m: Any) -> None:
        if not isinstance(m, dict):
            raise self.fail("manifest", f"expected a JSON object, got {_tname(m)}")
        for key in _REQUIRED_KEYS:
            self.key(m, key, "manifest")
        self.str_(m["handoff_version"], "manifest.handoff_version")
        self.dict_(m["metadata"], "manifest.metadata")
        if "signatures" in m:  # format 1.2, optional
            for i, sig in enumerate(self.list_(m["signatures"], "manifest.signatures")):
                path = f"manifest.signatures[{i}]"
                self.dict_(sig, path)
                for key, length in (("key", 64), ("signature", 128)):
                    text = self.str_(self.key(sig, key, path), f"{path}.{key}")
                    if len(text) != length or text.strip("0123456789abcdef"):
                        raise self.fail(f"{path}.{key}", f"expected {length} lowercase hex digits")

        values = self.list_(m["values"], "manifest.values")
        self.nbytes = [self.value(v, i) for i, v in enumerate(values)]
        self.nvalues = len(values)
        self.seglen = self.segments(self.list_(m["segments"], "manifest.segments"))
        nsegs = len(self.seglen)

        # Who defines each value: a path for inputs and constants, an instruction index otherwise.
        definer: list[Any] = [None] * self.nvalues

        def define(v: int, path: str, by: Any) -> None:
            if definer[v] is not None:
                was = definer[v]
                was = f"manifest.instructions[{was}]" if type(was) is int else was
                verb = "written by" if type(definer[v]) is int else "defined by"
                raise self.fail(path, f"value {v} is written twice (already {verb} {was})")
            definer[v] = by

        for io in ("inputs", "outputs"):
            names: set[str] = set()
            for i, entry in enumerate(self.list_(m[io], f"manifest.{io}")):
                path = f"manifest.{io}[{i}]"
                self.dict_(entry, path)
                nm = self.str_(self.key(entry, "name", path), f"{path}.name")
                if nm in names:
                    raise self.fail(f"{path}.name", f"duplicate name {_short(nm)}")
                names.add(nm)
                v = self.ref(self.key(entry, "value", path), f"{path}.value", self.nvalues, "value")
                if io == "inputs":
                    define(v, f"{path}.value", path)

        for i, entry in enumerate(self.list_(m["constants"], "manifest.constants")):
            path = f"manifest.constants[{i}]"
            self.dict_(entry, path)
            v = self.ref(self.key(entry, "value", path), f"{path}.value", self.nvalues, "value")
            s = self.ref(self.key(entry, "segment", path), f"{path}.segment", nsegs, "segment")
            if self.seglen[s] != self.nbytes[v]:
                raise self.fail(
                    f"{path}.segment",
                    f"segment {s} is {self.seglen[s]} bytes but value {v} needs {self.nbytes[v]}",
                )
            define(v, f"{path}.value", path)

        delegates = self.list_(m["delegates"], "manifest.delegates")
        for i, entry in enumerate(delegates):
            path = f"manifest.delegates[{i}]"
            self.delegate(entry, path, nsegs)
            self.str_(self.key(entry, "partition", path), f"{path}.partition")
            if "fallbacks" in entry:  # format 1.3, optional: the same partition by other backends
                for j, copy in enumerate(self.list_(entry["fallbacks"], f"{path}.fallbacks")):
                    self.delegate(copy, f"{path}.fallbacks[{j}]", nsegs)

        # The hot loop (one pass per instruction): field paths are only formatted on failure.
        nvalues, ndelegates = self.nvalues, len(delegates)
        for i, ins in enumerate(self.list_(m["instructions"], "manifest.instructions")):
            if type(ins) is not dict:
                self.dict_(ins, f"manifest.instructions[{i}]")
            op = ins.get("op")
            reads: list[int]
            if op == "delegate":
                d = ins.get("delegate")
                if type(d) is not int or not 0 <= d < ndelegates:
                    path = f"manifest.instructions[{i}]"
                    self.ref(self.key(ins, "delegate", path), f"{path}.delegate", ndelegates, "delegate")
                reads = self.refs(ins, "inputs", i, nvalues)
                writes = self.refs(ins, "outputs", i, nvalues)
            elif op == "aten":
                target = ins.get("target")
                if type(target) is not str or not target or not target.isascii():
                    path = f"manifest.instructions[{i}]"
                    self.str_(self.key(ins, "target", path), f"{path}.target", nonempty=True)
                args, kwargs = ins.get("args"), ins.get("kwargs")
                if type(args) is not list or type(kwargs) is not dict:
                    path = f"manifest.instructions[{i}]"
                    self.list_(self.key(ins, "args", path), f"{path}.args")
                    self.dict_(self.key(ins, "kwargs", path), f"{path}.kwargs")
                reads = []
                try:
                    self.args(args, 1, reads)
                except _ArgError as e:
                    raise self.fail(f"manifest.instructions[{i}].args{''.join(reversed(e.where))}", e.problem) from None
                try:
                    for k, a in kwargs.items():
                        try:
                            self.arg(a, 1, reads)
                        except _ArgError as e:
                            e.where.append(f"[{_short(k)}]")
                            raise
                        if not k.isascii():
                            self.str_(k, f"manifest.instructions[{i}].kwargs")
                except _ArgError as e:
                    raise self.fail(f"manifest.instructions[{i}].kwargs{''.join(reversed(e.where))}", e.problem) from None
                writes = self.refs(ins, "outputs", i, nvalues, allow_null=True)
            else:
                path = f"manifest.instructions[{i}]"
                op = self.key(ins, "op", path)
                if isinstance(op, str):
                    raise self.fail(f"{path}.op", f"unknown op {_short(op)} (this reader knows 'delegate' and 'aten')"
                                    + self.newer())
                raise self.fail(f"{path}.op", f"expected a string, got {_tname(op)}")
            for v in reads:
                if definer[v] is None:
                    where = _find_read(ins, v) or ""
                    raise self.fail(f"manifest.instructions[{i}]{where}", f"value {v} is read before it is written")
            for j, v in enumerate(writes):
                if v is not None:
                    define(v, f"manifest.instructions[{i}].outputs[{j}]", i)

        for i, entry in enumerate(m["outputs"]):
            v = entry["value"]
            if definer[v] is None:
                raise self.fail(f"manifest.outputs[{i}].value", f"value {v} is never written")

    def delegate(self, entry: Any, path: str, nsegs: int) -> None:
        """A delegate entry's backend, version, blob segment, metadata and options (§4.6)."""
        self.dict_(entry, path)
        for key in ("backend", "backend_version"):
            self.str_(self.key(entry, key, path), f"{path}.{key}", nonempty=key == "backend")
        self.ref(self.key(entry, "segment", path), f"{path}.segment", nsegs, "segment")
        self.dict_(self.key(entry, "metadata", path), f"{path}.metadata")
        options = self.dict_(self.key(entry, "options", path), f"{path}.options")
        for k, val in options.items():
            self.str_(k, f"{path}.options")
            self.str_(val, f"{path}.options[{_short(k)}]")

    def refs(self, ins: dict, key: str, i: int, count: int, allow_null: bool = False) -> list:
        """``ins[key]``, a list of value ids (or nulls), checked."""
        ids = ins.get(key)
        if type(ids) is not list:
            path = f"manifest.instructions[{i}]"
            self.list_(self.key(ins, key, path), f"{path}.{key}")
        for j, v in enumerate(ids):
            if type(v) is not int or not 0 <= v < count:
                if v is None and allow_null:
                    continue
                self.ref(v, f"manifest.instructions[{i}].{key}[{j}]", count, "value")
        return ids

    def value(self, v: Any, i: int) -> int:
        """The nbytes of ``values[i]``, checked."""
        if type(v) is dict:  # fast path for valid entries
            dtype, shape = v.get("dtype"), v.get("shape")
            if type(dtype) is str and dtype in _ITEMSIZE and type(shape) is list and len(shape) <= MAX_RANK:
                count = 1
                for d in shape:
                    if type(d) is not int or not 0 <= d < MAX_DIM:
                        break
                    count *= d
                else:
                    if count * _ITEMSIZE[dtype] <= MAX_VALUE_NBYTES:
                        return count * _ITEMSIZE[dtype]
        path = f"manifest.values[{i}]"
        self.dict_(v, path)
        dtype = self.key(v, "dtype", path)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self.fail(f"{path}.dtype", f"{_short(dtype)} is not one of {', '.join(DTYPES)}{self.newer()}")
        shape = self.list_(self.key(v, "shape", path), f"{path}.shape")
        if len(shape) > MAX_RANK:
            raise self.fail(f"{path}.shape", f"has {len(shape)} dimensions, more than {MAX_RANK}")
        count = 1
        for j, d in enumerate(shape):
            self.int_(d, f"{path}.shape[{j}]", 0, MAX_DIM - 1)
            count *= d  # bounded: at most 32 factors below 2**31
        nbytes = count * _ITEMSIZE[dtype]
        if nbytes > MAX_VALUE_NBYTES:
            raise self.fail(f"{path}.shape", f"{dtype}{shape} is {nbytes} bytes, more than 2**40")
        return nbytes

    def segments(self, segs: list) -> list[int]:
        h = self.h
        lengths: list[int] = []
        spans: list[tuple[int, int, str]] = []
        for i, s in enumerate(segs):
            path = f"manifest.segments[{i}]"
            self.dict_(s, path)
            off = self.int_(self.key(s, "offset", path), f"{path}.offset", 0, _U64_MAX)
            length = self.int_(self.key(s, "length", path), f"{path}.length", 0, _U64_MAX)
            digest = self.str_(self.key(s, "sha256", path), f"{path}.sha256")
            if len(digest) != 64 or digest.strip("0123456789abcdef"):
                raise self.fail(f"{path}.sha256", "expected 64 lowercase hex digits")
            if "crc32" in s:  # format 1.1
                self.int_(s["crc32"], f"{path}.crc32", 0, 2**32 - 1)
            if "xxh3" in s:  # format 1.4
                xxh3 = self.str_(s["xxh3"], f"{path}.xxh3")
                if len(xxh3) != 16 or xxh3.strip("0123456789abcdef"):
                    raise self.fail(f"{path}.xxh3", "expected 16 lowercase hex digits")
            at = off if off <= h.file_size else self.moff
            if off < HEADER_SIZE:
                raise self.fail(f"{path}.offset", f"{off} is inside the {HEADER_SIZE}-byte header", at)
            if off % h.alignment:
                raise self.fail(f"{path}.offset", f"{off} is not a multiple of the alignment {h.alignment}", at)
            if off > h.file_size or length > h.file_size - off:
                raise self.fail(
                    f"{path}.length", f"segment [{off}, {off + length}) runs past the end of the file ({h.file_size} bytes)", at
                )
            lengths.append(length)
            if length:
                spans.append((off, off + length, f"segments[{i}]"))
        if h.manifest_length:
            spans.append((self.moff, self.moff + h.manifest_length, "manifest"))
        spans.sort()
        prev: tuple[int, int, str] | None = None  # the span reaching furthest so far
        for span in spans:
            if prev is not None and span[0] < prev[1]:
                seg = span if span[2] != "manifest" else prev  # name a segment, at its offset
                other = prev if seg is span else span
                other_name = "the manifest" if other[2] == "manifest" else other[2]
                raise self.fail(
                    f"manifest.{seg[2]}.offset",
                    f"{seg[2]} [{seg[0]}, {seg[1]}) overlaps {other_name} [{other[0]}, {other[1]})",
                    seg[0],
                )
            if prev is None or span[1] > prev[1]:
                prev = span
        return lengths

    def args(self, items: list, depth: int, reads: list[int]) -> None:
        for j, item in enumerate(items):
            try:
                self.arg(item, depth, reads)
            except _ArgError as e:
                e.where.append(f"[{j}]")
                raise

    def arg(self, a: Any, depth: int, reads: list[int]) -> None:
        """One encoded argument at nesting ``depth``; raises _ArgError (its path is filled in
        by the callers as the error unwinds, so valid arguments cost no string formatting)."""
        if depth > MAX_ARG_DEPTH:
            raise _ArgError(f"arguments nest deeper than {MAX_ARG_DEPTH} levels")
        t = type(a)
        if a is None or t is bool or t is float:
            return
        if t is int:
            if not _INT64_MIN <= a <= _INT64_MAX:
                raise _ArgError(f"{_short(a)} is out of range [{_INT64_MIN}, {_INT64_MAX}] (int64)")
        elif t is str:
            if not a.isascii():
                _check_utf8(a)
        elif t is list:
            self.args(a, depth + 1, reads)
        elif t is dict:
            if len(a) != 1:
                raise _ArgError(f"an encoded argument has exactly one key ({', '.join(_ARG_TAGS)}), got {len(a)}")
            ((tag, x),) = a.items()
            if tag == "value":
                if type(x) is not int or not 0 <= x < self.nvalues:
                    what = f"expected an integer value index, got {_tname(x)}" if type(x) is not int else (
                        f"value {_short(x)} does not exist (there are {self.nvalues})"
                    )
                    raise _ArgError(what, ".value")
                reads.append(x)
            elif tag == "float":
                if x not in _SPECIAL_FLOATS:
                    raise _ArgError(f"{_short(x)} is not one of {', '.join(_SPECIAL_FLOATS)}", ".float")
            elif tag == "dtype":
                if not isinstance(x, str) or x not in DTYPES:
                    raise _ArgError(f"{_short(x)} is not one of {', '.join(DTYPES)}{self.newer()}", ".dtype")
            elif tag in ("device", "layout", "memory_format"):
                if not isinstance(x, str):
                    raise _ArgError(f"expected a string, got {_tname(x)}", f".{tag}")
                if not x:
                    raise _ArgError("must not be empty", f".{tag}")
                _check_utf8(x, f".{tag}")
            else:
                raise _ArgError(f"unknown argument encoding {_short(tag)} (known: {', '.join(_ARG_TAGS)}){self.newer()}")
        else:  # not produced by json.loads; only reachable from a hand-built manifest
            raise _ArgError(f"{_tname(a)} is not a JSON value")


class _ArgError(Exception):
    def __init__(self, problem: str, where: str = ""):
        self.problem = problem
        self.where = [where] if where else []


def _check_utf8(s: str, where: str = "") -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _ArgError("string holds an unpaired UTF-16 surrogate", where) from None


def _find_read(ins: dict, v: int) -> str | None:
    """The field path (below the instruction) where ``ins`` reads value ``v``; for messages."""
    if ins.get("op") == "delegate":
        return f".inputs[{ins['inputs'].index(v)}]"

    def find(a: Any, path: str) -> str | None:
        if isinstance(a, list):
            for j, item in enumerate(a):
                found = find(item, f"{path}[{j}]")
                if found:
                    return found
        elif isinstance(a, dict) and a.get("value") == v and type(a.get("value")) is int:
            return f"{path}.value"
        return None

    found = find(ins["args"], ".args")
    for k, a in ins["kwargs"].items():
        found = found or find(a, f".kwargs[{_short(k)}]")
    return found


#: The record of a verified file (:mod:`handoff.verified`) notes which reader checked its manifest
#: under this name; a later open of the unchanged file by the same reader decodes the manifest
#: without checking it again. A new release may check more, so the note names the release.
VALIDATED_NOTE = "manifest-validated-by"


@functools.cache
def _validated_by() -> str:
    from . import __version__

    return f"handoff-{__version__}-format-{FORMAT_MAJOR}.{FORMAT_MINOR}"  # a note value holds no space


def _refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise TypeError("a program's manifest is read-only (every load of the unchanged file shares it); "
                    "copy.deepcopy() it for a copy you can change")


class ManifestDict(dict):  # type: ignore[type-arg]
    """A JSON object of a manifest: a ``dict`` whose changes raise :class:`TypeError`
    (:attr:`ProgramFile.manifest` is shared by every load of the unchanged file in a process).
    ``copy.copy``, ``copy.deepcopy`` and pickling give plain, changeable dicts."""

    __slots__ = ()
    __setitem__ = __delitem__ = setdefault = pop = popitem = clear = update = __ior__ = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (dict(self),)


class ManifestList(list):  # type: ignore[type-arg]
    """A JSON array of a manifest: a ``list`` whose changes raise :class:`TypeError` (see
    :class:`ManifestDict`)."""

    __slots__ = ()
    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = \
        __iadd__ = __imul__ = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return list, (list(self),)


def _read_only(obj: Any) -> Any:
    """``obj`` (decoded JSON) with every dict and list made read-only (:class:`ManifestDict`,
    :class:`ManifestList`); other values are immutable already."""
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as in _decode_manifest: nothing cyclic is made, and a big manifest has millions of containers
    try:
        return _read_only_walk(obj)
    finally:
        if gc_was_enabled:
            gc.enable()


def _read_only_walk(obj: Any) -> Any:
    kind = type(obj)
    if kind is dict:
        return ManifestDict({k: _read_only_walk(v) for k, v in obj.items()})
    if kind is list:
        return ManifestList([_read_only_walk(v) for v in obj])
    return obj


def _read_manifest(data: bytes, header: _Header, name: str) -> dict:
    """Decode and validate the manifest (whose bytes match the header's digest)."""
    manifest = _decode_manifest(data, name, header.manifest_offset)
    try:
        _Validator(name, header).run(manifest)
    except RecursionError:  # defensive: argument depth is bounded, so this is not expected
        raise ProgramFormatError(name, "manifest", header.manifest_offset, "nests too deeply") from None
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading


class _Opened(NamedTuple):
    """What opening a recorded file derived from its bytes, kept for its next open in this process."""

    head: bytes  # the header's bytes
    header: _Header
    digest: bytes  # the manifest's SHA-256 (as in the header and the record)
    manifest: ManifestDict  # decoded from bytes that matched the digest and passed this reader's checks
    segments: tuple[tuple[Any, ...], ...]
    notes: dict[str, str]  # the file's notes ...
    written: dict[str, str]  # ... and those its record holds
    data: bytes | None  # the whole file, when it was read (not mapped) and is among those kept (_KEEP_BYTES)


def _keep_newest(memo: dict, key: Any, value: Any, cap: int) -> None:
    """``memo[key] = value``, first dropping the oldest entry when a new key would pass ``cap``
    (a process-wide memo: another thread may have dropped that entry already)."""
    if key not in memo and len(memo) >= cap:
        memo.pop(next(iter(memo), None), None)
    memo[key] = value


#: Recorded files opened in this process, by (record directory, record key): a later open of the
#: unchanged file (same ``stat``, same header) neither hashes nor reads anything but the header.
_OPENED: dict[tuple[str, str], _Opened] = {}
_MAX_OPENED = 64
#: The most bytes of read files :data:`_OPENED` keeps (the newest first): a later open of such an
#: unchanged file reads its header only and hands out the same immutable ``bytes`` again (no read,
#: no allocation; a runtime may keep what it derived from them, docs/plugins.md).
_KEEP_BYTES = 16 << 20

#: Files up to this size are read into memory instead of mapped: a delegate runtime that copies
#: its blob (ExecuTorch takes ``bytes``) then copies from memory that is already there, and
#: closing frees memory instead of unmapping (page faults on the mapping, and an unmap that must
#: reach every thread of the process, cost more than reading a small file whole).
READ_BELOW_BYTES = 1 << 20


#: Blobs of recorded files that :meth:`ProgramFile._blob` handed out, by ``id``, each with
#: a weak reference to the view and its :func:`blob_key`; an entry goes with its view.
_NAMED: dict[int, tuple[weakref.ref, tuple[Any, ...]]] = {}


def blob_key(blob: memoryview) -> tuple[Any, ...] | None:
    """A key for the bytes of ``blob``, a segment the core handed to ``Runtime.load``, that is the
    same on every load in this process of the unchanged recorded program file it lies in, and
    names no other bytes; ``None`` where the core cannot vouch for that (not recorded yet, changed
    since, given as bytes, or a view the core did not hand out: a copy, a slice of it).

    "Unchanged" is what lets the core skip checking the file again (:mod:`handoff.verified`:
    device, inode, size, modification and change times, and the manifest's digest), so what a
    runtime derived from a blob with this key it may use again for a blob with the same key
    instead of deriving it from the file's bytes once more. The key is made when the view is
    handed out, so asking costs a lookup."""
    entry = _NAMED.get(id(blob))
    return entry[1] if entry is not None and entry[0]() is blob else None


def _name(view: memoryview, key: tuple[Any, ...]) -> None:
    """Let :func:`blob_key` name ``view`` ``key`` while it lives."""
    at = id(view)

    def gone(ref: weakref.ref, named: dict[int, Any] = _NAMED) -> None:
        # Runs while the view is being freed, so no other object has its id yet; the table is
        # bound here, not looked up: a view freed at interpreter exit outlives module globals.
        if named.get(at, (None,))[0] is ref:
            named.pop(at, None)

    _NAMED[at] = (weakref.ref(view, gone), key)


def _opened_key(st: os.stat_result) -> tuple[str, str]:
    """A file's key in :data:`_OPENED`: the record directory and the file's record key."""
    return verified.directory_name(), verified.record_key(st)


def _read_all(fd: int, size: int, name: str) -> bytes:
    """The file's first ``size`` bytes, or fewer if it shrank (then rejected as truncated)."""
    parts, got = [], 0
    try:
        while got < size and (part := os.read(fd, size - got)):
            parts.append(part)
            got += len(part)
    except OSError as e:
        raise HandoffError(f"{name}: cannot read program file: {e.strerror or e}") from e
    return parts[0] if len(parts) == 1 else b"".join(parts)


class ProgramFile:
    """A validated program file, mapped read-only (or read, when small: :data:`READ_BELOW_BYTES`).

    Use :meth:`open` or :meth:`from_bytes`. The header and manifest are fully checked on open;
    each segment is checked (XXH3-64; CRC-32 or SHA-256 in older files) the first time
    :meth:`segment` returns it, unless the file is recorded as checked and unchanged
    (:mod:`handoff.verified`; :meth:`remember_verified` writes the record). A recorded file that
    this process opened before and that has not changed since (the same ``stat`` and header) is
    not hashed or validated again: its read-only manifest is kept from that open (:data:`_OPENED`),
    and a small file's whole bytes (:data:`_KEEP_BYTES`): then only its header is read again.

    :ivar name: the path (or a name given to :meth:`from_bytes`), used in error messages.
    :ivar major, minor: the format version in the file (major is always 1 here; minor may be
        newer than :data:`FORMAT_MINOR`, in which case unknown manifest keys are ignored).
    :ivar flags, alignment, file_size, manifest_offset, manifest_length: header fields.
    :ivar manifest: the decoded, validated manifest (a dict; unknown keys kept as they are), read-only
        (:class:`ManifestDict`, :class:`ManifestList`: every change raises :class:`TypeError`): a
        recorded file opened again unchanged in this process gets the very same object.
    """

    name: str
    manifest: dict

    def __init__(self, buffer: Any, name: str, _mmap: mmap.mmap | None = None,
                 _stat: tuple[os.stat_result, int] | None = None, _key: tuple[str, str] | None = None,
                 _known: _Opened | None = None):
        """Internal; use :meth:`open` or :meth:`from_bytes`. ``buffer`` is a read-only memoryview;
        ``_stat`` the file's ``fstat`` and the ``time.time_ns()`` before it was opened, ``_key``
        its key in :data:`_OPENED` (:func:`_opened_key`); ``_known``: that key's entry, whose
        header :meth:`open` found equal to the file's."""
        self.name = name
        self._mmap = _mmap
        self._view: memoryview | None = buffer
        self._verified: set[int] = set()
        self._stat = _stat
        self._opened: tuple[tuple[str, str], _Opened] | None = None
        #: whether the file was recorded as checked and unchanged, so segments are not checked again
        self.recorded = False
        #: notes kept with the file's record (:mod:`handoff.verified`): read from it, or added by
        #: :meth:`note` for :meth:`remember_verified` to write
        self.notes: dict[str, str] = {}
        self._notes_written: dict[str, str] = {}
        try:
            key = _key if _key is not None or _stat is None else _opened_key(_stat[0])
            known = _known
            if known is None:
                head = bytes(buffer[:HEADER_SIZE])
                known = _OPENED.get(key) if key is not None else None
                if known is not None and known.head != head:
                    known = None
            if known is not None:
                # This process opened this very file (same stat, same header) and found or wrote its
                # record: its manifest bytes matched the digest and passed this reader's checks then.
                header, digest = known.header, known.digest
                self.manifest = known.manifest  # what this process accepted then: read-only, shared
                self._segments = known.segments
                self.recorded = True
                self.notes, self._notes_written = dict(known.notes), dict(known.written)
                self._opened = (key, known)
            else:
                header, digest = _parse_header(head, len(buffer), name)
                moff, mlen = header.manifest_offset, header.manifest_length
                data = bytes(buffer[moff : moff + mlen])
                if hashlib.sha256(data).digest() != digest:
                    raise _fail_header(name, "manifest_sha256", "does not match the manifest bytes (file corrupted)")
                notes = verified.lookup(_stat[0], digest) if _stat is not None else None
                validated_by = _validated_by()
                if notes is not None and notes.get(VALIDATED_NOTE) == validated_by:
                    # The unchanged file whose manifest, these very bytes, this reader checked when it
                    # was recorded: strict decoding gives the same dict as plain decoding of text it
                    # accepted (no duplicate keys, no special or overflowing numbers), and the checks
                    # would pass again.
                    self.manifest = _read_only(json.loads(data))
                else:
                    self.manifest = _read_only(_read_manifest(data, header, name))
                self._segments = tuple((s["offset"], s["length"], s["sha256"], s.get("crc32"), s.get("xxh3"))
                                       for s in self.manifest["segments"])
                if notes is not None:
                    self.recorded = True
                    self.notes, self._notes_written = notes, dict(notes)
                if key is not None:  # kept with the record remember_verified writes, and for the next open
                    self.notes[VALIDATED_NOTE] = validated_by
                    whole = buffer.obj if _mmap is None and type(buffer.obj) is bytes else None
                    self._opened = (key, _Opened(head, header, digest, self.manifest, self._segments,
                                                 {}, {}, whole))
                    if self.recorded:
                        self._remember_opened()
            self.major, self.minor, self.flags = header.major, header.minor, header.flags
            self.file_size, self.alignment = header.file_size, header.alignment
            self.manifest_offset, self.manifest_length = header.manifest_offset, header.manifest_length
            self._manifest_sha256 = digest
            if self.recorded:
                self._verified.update(range(len(self._segments)))
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "ProgramFile":
        """Map ``path`` read-only (read it whole, up to :data:`READ_BELOW_BYTES`) and validate it.

        :raises ProgramFormatError: the file is not a valid program.
        :raises HandoffError: the file cannot be opened or read.
        """
        name = os.fspath(path)
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        started = time.time_ns()
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise HandoffError(f"{name}: cannot read program file: {e.strerror or e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise HandoffError(f"{name}: cannot read program file: it is {_file_kind(st.st_mode)}, not a regular "
                                   f"file; give the path of a .hof file (copy a stream to a file first)")
            if st.st_size == 0:
                return cls(memoryview(b""), name)  # an empty file cannot be mapped; rejected as truncated
            if st.st_size <= READ_BELOW_BYTES:
                key = _opened_key(st)
                kept = _OPENED.get(key)
                if kept is not None and kept.data is not None and _read_all(fd, HEADER_SIZE, name) == kept.head:
                    # this unchanged file's bytes, as an earlier open read them
                    return cls(memoryview(kept.data), name, None, (st, started), key, kept)
                os.lseek(fd, 0, os.SEEK_SET)  # past a header read above
                return cls(memoryview(_read_all(fd, st.st_size, name)), name, None, (st, started), key)
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise HandoffError(f"{name}: cannot read program file: {e.strerror or e}") from e
        finally:
            os.close(fd)
        return cls(memoryview(mm), name, mm, (st, started))

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview], name: str = "<bytes>") -> "ProgramFile":
        """Validate a program held in memory. Immutable buffers are used without copying."""
        view = memoryview(data)
        if not view.readonly or not view.c_contiguous:
            view = memoryview(view.tobytes())  # a private copy, so verified bytes cannot change
        elif view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        return cls(view, name)

    # -- segments
    def __len__(self) -> int:
        """The number of segments."""
        return len(self._segments)

    def segment(self, i: int) -> memoryview:
        """Segment ``i`` as a read-only, zero-copy memoryview, checked on first access against its
        ``crc32`` (or, in files without one, its ``sha256``).

        :raises ProgramFormatError: the segment's bytes do not match its checksum.
        :raises IndexError: there is no segment ``i``.
        :raises ValueError: the program file is closed.
        """
        view = self._segment_view(i)
        if i not in self._verified:
            self._verify(i, view, strong=False)
        return view

    def _blob(self, i: int) -> memoryview:
        """:meth:`segment` ``i`` as the core hands it to ``Runtime.load``: for the unchanged recorded
        file, named for :func:`blob_key` (only blobs: constants' views are never asked about)."""
        view = self.segment(i)
        if self.recorded and self._opened is not None:
            _name(view, (*self._opened[0], self._manifest_sha256, i))
        return view

    def verify_all(self) -> None:
        """Check every segment's ``sha256`` (and ``crc32``) now: the strong check, which
        :meth:`segment` leaves to CRC-32 where the file has one."""
        for i in range(len(self._segments)):
            view = self._segment_view(i)
            try:
                self._verify(i, view, strong=True)
            finally:
                view.release()

    def remember_verified(self) -> bool:
        """Check the segments not checked yet, then record the file as checked
        (:mod:`handoff.verified`), so that later opens of the unchanged file skip the checks.
        Returns whether a record exists now (never for a file given as bytes, nor a racy one).
        A recorded file's record is written again when :meth:`note` added notes to it.

        :raises ProgramFormatError: a segment does not match its checksum.
        """
        if self.recorded and self.notes == self._notes_written:
            return True
        if self._stat is None:
            return False
        for i in range(len(self._segments)):
            if i not in self._verified:
                self.segment(i).release()
        written = verified.record(self._stat[0], self._manifest_sha256, self._stat[1], self.notes)
        if written:
            self._notes_written = dict(self.notes)
        self.recorded = self.recorded or written
        if self.recorded:
            self._remember_opened()
        return self.recorded

    def _remember_opened(self) -> None:
        """Keep what this open of a recorded file derived, with its notes now, for the next (:data:`_OPENED`)."""
        if self._opened is None:
            return
        key, opened = self._opened
        if opened.notes == self.notes and opened.written == self._notes_written and _OPENED.get(key) is opened:
            return
        opened = opened._replace(notes=dict(self.notes), written=dict(self._notes_written))
        _keep_newest(_OPENED, key, opened, _MAX_OPENED)
        self._opened = (key, opened)
        kept = 0
        for k, entry in list(reversed(_OPENED.items())):  # beyond _KEEP_BYTES, the oldest files' bytes go
            if entry.data is not None:
                kept += len(entry.data)
                if kept > _KEEP_BYTES:
                    _OPENED[k] = entry._replace(data=None)

    def note(self, name: str, value: str) -> None:
        """Keep ``value``, computed from this file's bytes, with the file's record (written by the
        next :meth:`remember_verified`), so a later open of the unchanged file finds it in
        :attr:`notes` instead of computing it again (:mod:`handoff.probe`'s blob keys)."""
        self.notes[name] = value

    def _segment_view(self, i: int) -> memoryview:
        if self._view is None:
            raise ValueError(f"{self.name}: program file is closed")
        i = operator.index(i)
        if not 0 <= i < len(self._segments):
            raise IndexError(f"{self.name}: segment {i} does not exist (there are {len(self._segments)})")
        offset, length = self._segments[i][:2]
        return self._view[offset : offset + length]

    def _verify(self, i: int, view: memoryview, strong: bool) -> None:
        """Check segment ``i``'s bytes: its xxh3 when it has one, else its crc32 when it has one,
        and its sha256 when ``strong`` or when it has neither. Releases ``view`` before raising."""
        offset, _, digest, crc, xxh3 = self._segments[i]
        failed = None
        if xxh3 is not None:
            import xxhash  # only here: programs without xxh3 fields do not need it

            if xxhash.xxh3_64_hexdigest(view) != xxh3:
                failed = "xxh3"
        elif crc is not None and zlib.crc32(view) != crc:
            failed = "crc32"
        if failed is None and (strong or (crc is None and xxh3 is None)) and hashlib.sha256(view).hexdigest() != digest:
            failed = "sha256"
        if failed:
            view.release()
            raise ProgramFormatError(self.name, f"segments[{i}].{failed}", offset,
                                     "does not match the segment's bytes (file corrupted)")
        self._verified.add(i)

    # -- lifetime
    @property
    def closed(self) -> bool:
        return self._view is None

    def close(self) -> None:
        """Release the mapping. Safe to call twice.

        Views returned by :meth:`segment` (and arrays made from them) stay valid: while any is
        still alive the map cannot be unmapped, so it is left to the garbage collector, which
        unmaps it when the last one goes.
        """
        view, mm = self._view, self._mmap
        self._view = self._mmap = None
        if view is not None:
            try:
                view.release()
            except BufferError:  # someone holds memoryview(view) itself; let GC release it
                pass
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # segment views still exported; unmapped when the last is freed
                pass

    def __enter__(self) -> "ProgramFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._segments)} segments, {self.file_size} bytes"
        return f"<ProgramFile {self.name!r} v{getattr(self, 'major', '?')}.{getattr(self, 'minor', '?')} {state}>"


def _file_kind(mode: int) -> str:
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def io_specs(manifest: dict) -> tuple[list[tuple[str, tuple[int, ...], str]], ...]:
    """``(inputs, outputs)`` of a program's manifest, each ``[(name, shape, dtype)]``, as
    :class:`handoff.Program` reports once loaded (a remote client reads them without loading)."""
    vals = manifest["values"]
    return tuple([(x["name"], tuple(vals[x["value"]]["shape"]), vals[x["value"]]["dtype"]) for x in manifest[side]]
                 for side in ("inputs", "outputs"))


def value_nbytes(value_entry: dict) -> int:
    """Bytes of a manifest ``values`` entry's raw data: element count times itemsize."""
    return math.prod(value_entry["shape"]) * _ITEMSIZE[value_entry["dtype"]]


def constant_array(program_file: ProgramFile, i: int) -> np.ndarray:
    """Constant ``i`` as a read-only numpy array viewing the program's memory (no copy).

    :raises ProgramFormatError: the segment is corrupt, or a bool constant holds bytes other
        than 0 and 1.
    """
    entry = program_file.manifest["constants"][i]
    value = program_file.manifest["values"][entry["value"]]
    view = program_file.segment(entry["segment"])
    if value["dtype"] == "bool" and view.nbytes and np.frombuffer(view, dtype=np.uint8).max() > 1:
        offset = program_file.manifest["segments"][entry["segment"]]["offset"]
        raise ProgramFormatError(
            program_file.name, f"manifest.constants[{i}]", offset, "bool constant holds bytes other than 0 and 1"
        )
    return np.frombuffer(view, dtype=np.dtype(DTYPES[value["dtype"]])).reshape(value["shape"])


# ----------------------------------------------------------------------------------------------
# Writing


def _align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) & ~(alignment - 1)


def _layout(
    manifest: dict, segments: Sequence[Any], alignment: int, name: str, signer: Any = None
) -> tuple[bytes, bytes, list[tuple[int, memoryview]], int]:
    """Plan the file: returns header, manifest bytes, [(offset, bytes view)], file size. With a
    ``signer`` (``handoff.signing.LocalKey``), the manifest gets its signature."""
    if type(alignment) is not int or not (MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT) or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment!r} is not a power of two between {MIN_ALIGNMENT} and {MAX_ALIGNMENT}")
    if not isinstance(manifest, dict):
        raise TypeError(f"manifest must be a dict, not {type(manifest).__name__}")
    import xxhash

    views: list[tuple[int, memoryview]] = []
    table = []
    pos = HEADER_SIZE
    for i, seg in enumerate(segments):
        view = memoryview(seg)
        if not view.c_contiguous:
            raise ValueError(f"segment {i} is not a C-contiguous buffer")
        view = view.cast("B") if (view.format != "B" or view.ndim != 1) else view
        pos = _align_up(pos, alignment)
        views.append((pos, view))
        # crc32 too, for readers of format 1.1-1.3 (which would otherwise fall back to sha256)
        table.append({"offset": pos, "length": view.nbytes, "sha256": hashlib.sha256(view).hexdigest(),
                      "crc32": zlib.crc32(view), "xxh3": xxhash.xxh3_64_hexdigest(view)})
        pos += view.nbytes
    full = dict(manifest)
    full["segments"] = table
    full.pop("signatures", None)
    if signer is not None:
        full["signatures"] = [signer.sign(full)]
    moff = pos
    try:
        text = json.dumps(full, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        data = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as e:
        raise ProgramFormatError(name, "manifest", moff, f"cannot be encoded as JSON: {' '.join(str(e).split())}") from None
    if len(data) > MAX_MANIFEST_LENGTH:
        raise ProgramFormatError(
            name, "header.manifest_length", HEADER_FIELDS["manifest_length"],
            f"manifest is {len(data)} bytes, more than the {MAX_MANIFEST_LENGTH}-byte limit",
        )
    size = moff + len(data)
    digest = hashlib.sha256(data).digest()
    header = _HEADER.pack(
        MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, size, moff, len(data), alignment, 0, digest, bytes(16)
    )
    # The same checks a reader makes, so a writer bug cannot produce an unreadable file.
    hdr, _ = _parse_header(header, size, name)
    _read_manifest(data, hdr, name)
    return header, data, views, size


def _chunks(header: bytes, data: bytes, views: list[tuple[int, memoryview]]) -> Iterator[Any]:
    pos = HEADER_SIZE
    yield header
    for offset, view in views:
        if offset > pos:
            yield bytes(offset - pos)
        yield view
        pos = offset + view.nbytes
    yield data


def program_bytes(manifest: dict, segments: Sequence[Any], alignment: int = DEFAULT_ALIGNMENT,
                  signer: Any = None) -> bytes:
    """The program file for ``manifest`` and ``segments``, in memory (see :func:`write_program`)."""
    header, data, views, size = _layout(manifest, segments, alignment, "<bytes>", signer)
    out = bytearray()
    for chunk in _chunks(header, data, views):
        out += chunk
    assert len(out) == size
    return bytes(out)


def write_program(
    path_or_file: Any, manifest: dict, segments: Sequence[Any], alignment: int = DEFAULT_ALIGNMENT,
    signer: Any = None, remember: bool = False, notes: Mapping[str, str] | None = None,
) -> int:
    """Write a program file and return its size in bytes.

    Writes ``header | segments (each at a multiple of alignment, zero padding) | manifest``. The
    manifest is written as compact, key-sorted UTF-8 JSON with ``"segments"`` (offset, length,
    sha256 of each segment) added; the caller's dict is not changed. The manifest is validated
    exactly as a reader would before anything is written.

    :param path_or_file: a path (written atomically: a temporary file ``.NAME.<pid>-<random>.tmp``
        in the same directory, then ``os.replace``; a file it replaces keeps its permission bits)
        or a binary file object (written from its current position).
    :param manifest: every key of the manifest schema except ``"segments"``.
    :param segments: the segment payloads, any C-contiguous buffers.
    :param alignment: a power of two between 8 and 65536.
    :param signer: signs the manifest (``handoff.signing.LocalKey``); any ``signatures`` the
        manifest held are replaced (they would not match the new segment table).
    :param remember: (a path only) record the file as checked (:mod:`handoff.verified`) from the
        digests computed while writing, so its first load skips the segment checks; waits until
        the written file's times are not racy (at most 50 ms on file systems with fine times).
    :param notes: with ``remember``, kept in the file's record (:func:`handoff.verified.record`).
    :raises ProgramFormatError: the manifest is invalid or not JSON-serialisable.
    :raises HandoffError: the path cannot be written (nothing is left behind).
    """
    is_path = isinstance(path_or_file, (str, bytes, os.PathLike))
    if is_path:
        name = os.fsdecode(os.fspath(path_or_file))
    else:
        name = str(getattr(path_or_file, "name", "<file>"))
    header, data, views, size = _layout(manifest, segments, alignment, name, signer)
    if not is_path:
        for chunk in _chunks(header, data, views):
            path_or_file.write(chunk)
        return size

    directory, base = os.path.split(os.path.abspath(name))
    try:
        try:  # a replaced file keeps its permission bits; a new one gets 0666 less the umask
            old = os.stat(name)
            mode = stat.S_IMODE(old.st_mode) if stat.S_ISREG(old.st_mode) else None
        except FileNotFoundError:
            mode = None
        # ".NAME.<pid>-<random>.tmp": a killed writer's file is removed by the next write here.
        fd, tmp = create_file(directory, f".{base}.", ".tmp", mode=0o666)
    except OSError as e:
        raise HandoffError(f"{name}: cannot write program file: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            for chunk in _chunks(header, data, views):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if remember:  # the temporary file is ours alone until the rename: its content is known
                started = verified.wait_until_not_racy(os.fstat(f.fileno()))
                written = os.fstat(f.fileno())
        os.replace(tmp, name)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise HandoffError(f"{name}: cannot write program file: {exc.strerror or exc}") from exc
        raise
    if remember:  # its manifest passed the reader's checks in _layout
        verified.record_written(name, written, hashlib.sha256(data).digest(), started,
                                {**(notes or {}), VALIDATED_NOTE: _validated_by()})
    return size
