"""The ``.hof`` program format 1.x (docs/format.md): round trip, validation, hostile files, golden.

The reader must turn *any* bytes into either a valid :class:`ProgramFile` or a one-line
:class:`ProgramFormatError` naming the field and byte offset: never another exception, a hang, or
an allocation sized by the file's claims. Most tests build files by hand with :func:`raw_program`
(which can lie in every header field) rather than with the writer, which refuses to write
invalid programs.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff import program
from handoff.errors import HandoffError, ProgramFormatError
from handoff.program import (
    DTYPES,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER_SIZE,
    MAGIC,
    ProgramFile,
    constant_array,
    program_bytes,
    value_nbytes,
    write_program,
)

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden_v1.hof"
#: Pinned: the golden file must never be regenerated (see tests/data/make_golden.py).
GOLDEN_SHA256 = "9f6af99e0c353f5ace64aa082b39b0035e838c9586c12614eaa7320779c66082"
#: Format 1.3 (fallback copies): written once by tests/data/make_golden_v1_3.py, pinned likewise.
GOLDEN_1_3 = DATA / "golden_v1_3.hof"
GOLDEN_1_3_SHA256 = "d636edfdbdeeb4e322d32bd4b613dfc2d4117120c954142f2d8442caac172995"
HEADER = struct.Struct("<8sHHIQQQII32s16s")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Helpers


def small_manifest() -> dict:
    """x (input) + w (constant) -> delegate -> y -> aten.cumsum -> z (output)."""
    return {
        "handoff_version": "0.1.0",
        "metadata": {"model": "small"},
        "values": [
            {"dtype": "float32", "shape": [2, 3]},
            {"dtype": "float32", "shape": [2, 3]},
            {"dtype": "float32", "shape": [2, 3]},
            {"dtype": "float32", "shape": [2, 3]},
        ],
        "inputs": [{"name": "x", "value": 0}],
        "outputs": [{"name": "z", "value": 3}],
        "constants": [{"value": 1, "segment": 0}],
        "delegates": [
            {
                "backend": "fake",
                "backend_version": "1",
                "segment": 1,
                "partition": "p0",
                "metadata": {},
                "options": {"k": "v"},
            }
        ],
        "instructions": [
            {"op": "delegate", "delegate": 0, "inputs": [0, 1], "outputs": [2]},
            {"op": "aten", "target": "aten.cumsum.default", "args": [{"value": 2}, 1], "kwargs": {}, "outputs": [3]},
        ],
    }


W = np.arange(6, dtype="<f4").reshape(2, 3)
BLOB = b"delegate-blob\x00\xff"


def small_segments() -> list[bytes]:
    return [W.tobytes(), BLOB]


def small_program() -> bytes:
    return program_bytes(small_manifest(), small_segments())


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def raw_program(
    manifest: dict | bytes,
    blobs=(),
    *,
    alignment: int = 64,
    header_alignment: int | None = None,
    major: int = 1,
    minor: int = 0,
    flags: int = 0,
    reserved0: int = 0,
    reserved1: bytes = bytes(16),
    magic: bytes = MAGIC,
    file_size: int | None = None,
    manifest_offset: int | None = None,
    manifest_length: int | None = None,
    sha: bytes | None = None,
    trailing: bytes = b"",
) -> bytes:
    """A program laid out like the writer's, with every header field overridable.

    ``manifest`` may be raw bytes (written as is) or a dict (its ``segments`` table is filled in
    unless given; dumped with ``allow_nan=True`` so hostile values survive).
    """
    body = bytearray(bytes(HEADER_SIZE))
    table = []
    for blob in blobs:
        body += bytes(align(len(body), alignment) - len(body))
        table.append({"offset": len(body), "length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        body += blob
    if isinstance(manifest, dict):
        manifest = dict(manifest)
        manifest.setdefault("segments", table)
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    else:
        data = manifest
    moff = len(body)
    body += data + trailing
    header = HEADER.pack(
        magic,
        major,
        minor,
        flags,
        len(body) if file_size is None else file_size,
        moff if manifest_offset is None else manifest_offset,
        len(data) if manifest_length is None else manifest_length,
        alignment if header_alignment is None else header_alignment,
        reserved0,
        hashlib.sha256(data).digest() if sha is None else sha,
        reserved1,
    )
    body[:HEADER_SIZE] = header
    return bytes(body)


def moff_of(data: bytes) -> int:
    return HEADER.unpack_from(data)[5]


def expect_error(data: bytes, field: str, offset: int | None = None, *words: str) -> ProgramFormatError:
    """Open ``data``; it must fail naming ``field`` (and ``offset``, and each of ``words``)."""
    with pytest.raises(ProgramFormatError) as info:
        with ProgramFile.from_bytes(data, name="t.hof") as pf:
            pf.verify_all()
    e = info.value
    msg = str(e)
    assert e.field == field, msg
    assert f"{field} at offset " in msg, msg
    assert msg.startswith("t.hof: invalid program file: "), msg
    if offset is not None:
        assert e.offset == offset, msg
        assert f"{field} at offset {offset}:" in msg, msg
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg
    return e


def hostile(mutate, blobs=None) -> bytes:
    """The small program with its manifest changed by ``mutate(manifest)`` (header kept valid)."""
    m = small_manifest()
    segs = small_segments() if blobs is None else blobs
    mutate(m)
    return raw_program(m, segs)


def open_fully(data: bytes) -> None:
    """Open and touch everything; only ProgramFormatError may escape."""
    try:
        pf = ProgramFile.from_bytes(data)
    except ProgramFormatError:
        return
    with pf:
        for i in range(len(pf.manifest["segments"])):
            try:
                pf.segment(i)
            except ProgramFormatError:
                pass
        for i in range(len(pf.manifest["constants"])):
            try:
                constant_array(pf, i)
            except ProgramFormatError:
                pass


# ----------------------------------------------------------------------------------------------
# Round trip and writer


def test_round_trip_bytes():
    m = small_manifest()
    before = copy.deepcopy(m)
    data = program_bytes(m, small_segments())
    assert m == before, "the caller's manifest must not be mutated"
    assert data[:8] == MAGIC
    with ProgramFile.from_bytes(data) as pf:
        assert (pf.major, pf.minor, pf.flags, pf.alignment) == (FORMAT_MAJOR, FORMAT_MINOR, 0, 64)
        assert pf.file_size == len(data)
        assert {k: v for k, v in pf.manifest.items() if k != "segments"} == m
        assert [s["length"] for s in pf.manifest["segments"]] == [24, len(BLOB)]
        assert len(pf) == 2
        seg = pf.segment(1)
        assert isinstance(seg, memoryview) and seg.readonly and bytes(seg) == BLOB
        assert seg.obj is data, "segments of an immutable buffer are zero-copy views"
        a = constant_array(pf, 0)
        assert a.dtype == np.float32 and a.shape == (2, 3) and not a.flags.writeable
        np.testing.assert_array_equal(a, W)
        pf.verify_all()


def test_round_trip_path_and_file_object(tmp_path):
    path = tmp_path / "m.hof"
    n = write_program(path, small_manifest(), small_segments())
    assert n == path.stat().st_size
    assert path.read_bytes() == small_program()
    assert os.listdir(tmp_path) == ["m.hof"], "no temporary files left behind"
    buf = io.BytesIO()
    assert write_program(buf, small_manifest(), small_segments()) == n
    assert buf.getvalue() == small_program()
    with ProgramFile.open(path) as pf:
        assert pf.name == str(path)
        assert bytes(pf.segment(1)) == BLOB
        np.testing.assert_array_equal(constant_array(pf, 0), W)
        assert pf.manifest["outputs"] == [{"name": "z", "value": 3}]
    with ProgramFile.open(str(path)) as pf:
        pf.verify_all()


@pytest.mark.parametrize("alignment", [8, 64, 4096, 65536])
def test_alignment(alignment):
    segs = [b"a", b"", b"bcdefghijk" * 5, np.ones(3, dtype="<f4")]
    m = small_manifest()
    m["constants"] = []
    m["inputs"].append({"name": "w", "value": 1})
    m["delegates"][0]["segment"] = 2
    data = program_bytes(m, segs, alignment=alignment)
    with ProgramFile.from_bytes(data) as pf:
        assert pf.alignment == alignment
        for i, s in enumerate(pf.manifest["segments"]):
            assert s["offset"] % alignment == 0 and s["offset"] >= HEADER_SIZE
            assert bytes(pf.segment(i)) == bytes(memoryview(segs[i]).cast("B"))
        assert data[HEADER_SIZE : pf.manifest["segments"][0]["offset"]] == bytes(
            pf.manifest["segments"][0]["offset"] - HEADER_SIZE
        ), "padding is zero"


def test_no_segments():
    m = small_manifest()
    m.update(constants=[], delegates=[], instructions=[], outputs=[{"name": "x", "value": 0}])
    data = program_bytes(m, [])
    with ProgramFile.from_bytes(data) as pf:
        assert pf.manifest["segments"] == [] and len(pf) == 0
        assert pf.manifest_offset == HEADER_SIZE


def test_writer_is_deterministic_and_compact():
    m = small_manifest()
    reordered = dict(reversed(list(m.items())))
    a, b = program_bytes(m, small_segments()), program_bytes(reordered, small_segments())
    assert a == b
    text = a[moff_of(a) :].decode()
    assert json.loads(text)["handoff_version"] == "0.1.0"
    assert ": " not in text and ", " not in text


def test_writer_validates(tmp_path):
    path = tmp_path / "bad.hof"
    bad = small_manifest()
    bad["outputs"][0]["value"] = 99
    with pytest.raises(ProgramFormatError, match=r"manifest.outputs\[0\].value"):
        write_program(path, bad, small_segments())
    assert not path.exists()
    write_program(path, small_manifest(), small_segments())
    good = path.read_bytes()
    with pytest.raises(ProgramFormatError):
        write_program(path, bad, small_segments())
    assert path.read_bytes() == good, "a failed write leaves the old file alone"
    assert os.listdir(tmp_path) == ["bad.hof"]


def test_writer_rejects_unencodable_manifests():
    m = small_manifest()
    m["instructions"][1]["args"].append(float("nan"))
    with pytest.raises(ProgramFormatError, match="cannot be encoded as JSON"):
        program_bytes(m, small_segments())
    m = small_manifest()
    m["metadata"]["obj"] = object()
    with pytest.raises(ProgramFormatError, match="cannot be encoded as JSON"):
        program_bytes(m, small_segments())
    m = small_manifest()
    m["metadata"]["s"] = "\ud800"
    with pytest.raises(ProgramFormatError):
        program_bytes(m, small_segments())
    m = small_manifest()
    m["values"][0]["shape"] = [2, 3.0]
    with pytest.raises(ProgramFormatError, match=r"manifest.values\[0\].shape\[1\]"):
        program_bytes(m, small_segments())
    with pytest.raises(ValueError):
        program_bytes(small_manifest(), small_segments(), alignment=48)
    with pytest.raises(ValueError):
        program_bytes(small_manifest(), [np.ones((3, 4), dtype="<f4")[:, ::2], BLOB])


def test_writer_accepts_buffers_and_tuples():
    m = small_manifest()
    m["values"][0]["shape"] = (2, 3)
    segs = [np.arange(6, dtype="<f4").reshape(2, 3), memoryview(bytearray(BLOB))]
    with ProgramFile.from_bytes(program_bytes(m, segs)) as pf:
        np.testing.assert_array_equal(constant_array(pf, 0), W)
        assert bytes(pf.segment(1)) == BLOB


def test_value_nbytes():
    assert value_nbytes({"dtype": "float16", "shape": [3, 5]}) == 30
    assert value_nbytes({"dtype": "bool", "shape": []}) == 1
    assert value_nbytes({"dtype": "int64", "shape": [4, 0]}) == 0
    assert {d: value_nbytes({"dtype": d, "shape": [1]}) for d in DTYPES} == {
        "float32": 4, "float16": 2, "float64": 8, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "bool": 1,
        "uint16": 2, "uint32": 4, "uint64": 8,
    }


# ----------------------------------------------------------------------------------------------
# Format 1.5: unsigned 16/32/64-bit dtypes

#: One constant of each dtype format 1.5 added, extremes included.
UNSIGNED = {"uint16": np.array([0, 1, 32768, 65535], "<u2"), "uint32": np.array([[0, 2**32 - 1]], "<u4"),
            "uint64": np.array([0, 2**63, 2**64 - 1], "<u8")}


def sixteen_bit_manifest() -> dict:
    """x -> quantize to uint16 (scale 1/512, zero point 32768) -> y (output, uint16) -> dequantize
    -> z (output), on the host, plus one constant of each unsigned dtype as outputs."""
    q = [{"value": 0}, 1 / 512, 32768, 0, 65535, {"dtype": "uint16"}]
    return {
        "handoff_version": "0.1.0", "metadata": {},
        "values": [{"dtype": "float32", "shape": [2, 3]}, {"dtype": "uint16", "shape": [2, 3]},
                   {"dtype": "float32", "shape": [2, 3]},
                   *({"dtype": name, "shape": list(a.shape)} for name, a in UNSIGNED.items())],
        "inputs": [{"name": "x", "value": 0}],
        "outputs": [{"name": "y", "value": 1}, {"name": "z", "value": 2},
                    *({"name": name, "value": 3 + i} for i, name in enumerate(UNSIGNED))],
        "constants": [{"value": 3 + i, "segment": i} for i in range(len(UNSIGNED))],
        "delegates": [],
        "instructions": [
            {"op": "aten", "target": "quantized_decomposed.quantize_per_tensor.default", "args": q, "kwargs": {},
             "outputs": [1]},
            {"op": "aten", "target": "quantized_decomposed.dequantize_per_tensor.default",
             "args": [{"value": 1}, *q[1:]], "kwargs": {}, "outputs": [2]},
        ],
    }


def test_unsigned_dtypes_round_trip_and_run_on_the_host():
    """uint16/uint32/uint64 as values, constants (bytes exact, little-endian) and a dtype argument;
    the runtime runs a uint16 quantize/dequantize pair on the host (numpy and torch both have
    uint16) and hands uint16 arrays in and out."""
    import handoff
    torch = pytest.importorskip("torch")
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    data = program_bytes(sixteen_bit_manifest(), [a.tobytes() for a in UNSIGNED.values()])
    with ProgramFile.from_bytes(data) as pf:
        assert (pf.major, pf.minor) == (1, 5)
        for i, (name, want) in enumerate(UNSIGNED.items()):
            got = constant_array(pf, i)
            assert got.dtype == np.dtype(name) and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
        assert pf.manifest["instructions"][0]["args"][-1] == {"dtype": "uint16"}
    x = np.random.default_rng(0).standard_normal((2, 3)).astype("float32") * 20
    x[0, :2] = 100, -100  # beyond the range: clamped to 65535 and 0
    y, z, *constants = handoff.load(data).run([x])
    q = torch.ops.quantized_decomposed
    want = q.quantize_per_tensor(torch.from_numpy(x), 1 / 512, 32768, 0, 65535, torch.uint16)
    assert y.dtype == np.uint16 and (y[0, 0], y[0, 1]) == (65535, 0)
    np.testing.assert_array_equal(y, want.numpy())
    np.testing.assert_array_equal(z, q.dequantize_per_tensor(want, 1 / 512, 32768, 0, 65535, torch.uint16).numpy())
    for got, want in zip(constants, UNSIGNED.values()):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("where", ["value", "argument"])
def test_an_older_reader_refuses_an_unsigned_dtype_by_field_and_offset(monkeypatch, where):
    """A 1.4 reader (its dtype table and minor, docs/format.md §6) reads a 1.5 file that does not
    use the new dtypes, and refuses one that does, naming the field and saying to upgrade."""
    import handoff.program as program

    old = {k: v for k, v in DTYPES.items() if k not in UNSIGNED}
    monkeypatch.setattr(program, "DTYPES", old)
    monkeypatch.setattr(program, "_ITEMSIZE", {k: v for k, v in program._ITEMSIZE.items() if k in old})
    monkeypatch.setattr(program, "FORMAT_MINOR", 4)
    data = raw_program(small_manifest(), small_segments(), minor=5)
    with ProgramFile.from_bytes(data) as pf:  # no new dtype used: read as before
        pf.verify_all()
    m = small_manifest()
    if where == "value":
        m["values"][2]["dtype"], field = "uint16", "manifest.values[2].dtype"
    else:
        m["instructions"][1]["kwargs"]["dtype"], field = {"dtype": "uint16"}, "manifest.instructions[1].kwargs['dtype'].dtype"
    data = raw_program(m, small_segments(), minor=5)
    expect_error(data, field, moff_of(data), "'uint16' is not one of float32", "uint8, bool;",
                 "the file is format 1.5, newer than this reader's 1.4: upgrade handoff")
    # a file of the reader's own minor holding an unknown dtype is damaged, not newer: no upgrade hint
    e = expect_error(raw_program(m, small_segments(), minor=4), field)
    assert "upgrade" not in str(e)


def test_from_bytes_copies_mutable_buffers():
    data = bytearray(small_program())
    with ProgramFile.from_bytes(data) as pf:
        seg = pf.segment(1)
        data[:] = bytes(len(data))
        assert bytes(seg) == BLOB


# ----------------------------------------------------------------------------------------------
# Lifetime


def test_close_with_live_views(tmp_path):
    path = tmp_path / "m.hof"
    write_program(path, small_manifest(), small_segments())
    pf = ProgramFile.open(path)
    seg = pf.segment(1)
    arr = constant_array(pf, 0)
    pf.close()  # views are exported: the map must stay valid for them, and close must not raise
    pf.close()
    assert pf.closed
    assert bytes(seg) == BLOB
    np.testing.assert_array_equal(arr, W)
    with pytest.raises(ValueError, match="closed"):
        pf.segment(0)
    del seg, arr


def test_close_without_views_unmaps(tmp_path, monkeypatch):
    monkeypatch.setattr(program, "READ_BELOW_BYTES", 0)  # every file mapped
    path = tmp_path / "m.hof"
    write_program(path, small_manifest(), small_segments())
    with ProgramFile.open(path) as pf:
        mm = pf._mmap
        pf.segment(0).release()
    assert mm.closed


def test_a_small_file_is_read_and_a_large_one_mapped(tmp_path, monkeypatch):
    path = tmp_path / "m.hof"
    write_program(path, small_manifest(), small_segments())
    with ProgramFile.open(path) as small:
        assert small._mmap is None and bytes(small.segment(1)) == BLOB
        seg = small.segment(1)
    assert bytes(seg) == BLOB  # a view outlives close, as with a mapping
    monkeypatch.setattr(program, "READ_BELOW_BYTES", path.stat().st_size - 1)
    with ProgramFile.open(path) as large:
        assert large._mmap is not None and bytes(large.segment(1)) == BLOB
        assert large.manifest == small.manifest


def test_segment_index_errors():
    with ProgramFile.from_bytes(small_program()) as pf:
        with pytest.raises(IndexError):
            pf.segment(2)
        with pytest.raises(IndexError):
            pf.segment(-1)
        with pytest.raises(TypeError):
            pf.segment("0")


def test_open_errors(tmp_path):
    with pytest.raises(HandoffError, match="cannot read program file") as info:
        ProgramFile.open(tmp_path / "missing.hof")
    assert not isinstance(info.value, ProgramFormatError)
    with pytest.raises(HandoffError, match="cannot read program file"):
        ProgramFile.open(tmp_path)
    for content, field in [(b"", "header"), (b"\x89HO", "header"), (b"PK\x03\x04", "header.magic")]:
        path = tmp_path / "x.hof"
        path.write_bytes(content)
        with pytest.raises(ProgramFormatError) as info:
            ProgramFile.open(path)
        assert info.value.field == field and str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------
# Header


def corrupt(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    "offset,fmt,value,field,words",
    [
        (0, "<8s", b"\x89HOF\r\n\x1a\x00", "header.magic", ["not a handoff program (magic is"]),
        (0, "<8s", b"PK\x03\x04\x00\x00\x00\x00", "header.magic", ["not a handoff program"]),
        (8, "<H", 2, "header.major", [f"format version 2.{FORMAT_MINOR} is not supported by this reader (supports 1.x)",
                                      "upgrade handoff"]),
        (8, "<H", 0, "header.major", [f"format version 0.{FORMAT_MINOR} is not supported"]),
        (12, "<I", 1, "header.flags", ["unknown flag bits 0x00000001"]),
        (12, "<I", 0x80000000, "header.flags", ["0x80000000"]),
        (16, "<Q", 10**6, "header.file_size", ["truncated"]),
        (16, "<Q", 100, "header.file_size", ["trailing data"]),
        (16, "<Q", 2**64 - 1, "header.file_size", []),
        (24, "<Q", 0, "header.manifest_offset", ["outside the file"]),
        (24, "<Q", 95, "header.manifest_offset", []),
        (24, "<Q", 2**63, "header.manifest_offset", []),
        (32, "<Q", 2**63, "header.manifest_length", ["exceeds"]),
        (32, "<Q", 2**64 - 1, "header.manifest_length", []),
        (32, "<Q", 10**6, "header.manifest_length", ["past the end"]),
        (40, "<I", 0, "header.alignment", ["power of two"]),
        (40, "<I", 4, "header.alignment", []),
        (40, "<I", 48, "header.alignment", []),
        (40, "<I", 131072, "header.alignment", []),
        (44, "<I", 7, "header.reserved0", ["must be 0"]),
        (48, "<B", 0, "header.manifest_sha256", ["does not match"]),
        (80, "<B", 1, "header.reserved1", ["must be zero"]),
        (95, "<B", 1, "header.reserved1", []),
    ],
)
def test_header_field_errors(offset, fmt, value, field, words):
    data = small_program()
    if field == "header.manifest_sha256":
        value = data[48] ^ 0xFF
    expect_error(corrupt(data, offset, fmt, value), field, {"header.reserved1": 80}.get(field, offset), *words)


def test_major_2_message():
    e = expect_error(raw_program(small_manifest(), small_segments(), major=2, minor=3), "header.major", 8)
    assert str(e) == (
        "t.hof: invalid program file: header.major at offset 8: format version 2.3 is not supported by this "
        "reader (supports 1.x); re-partition with this handoff version or upgrade handoff"
    )


def test_newer_minor_with_unknown_keys_is_accepted():
    m = small_manifest()
    m["future_top_level"] = {"anything": [1, 2]}
    m["values"][0]["future"] = True
    m["inputs"][0]["future"] = "x"
    m["delegates"][0]["future"] = 1
    m["instructions"][0]["future"] = None
    m["constants"][0]["future"] = []
    data = raw_program(m, small_segments(), minor=FORMAT_MINOR + 1)
    with ProgramFile.from_bytes(data) as pf:
        assert (pf.major, pf.minor) == (1, FORMAT_MINOR + 1)
        assert pf.manifest["future_top_level"] == {"anything": [1, 2]}
        pf.verify_all()
        np.testing.assert_array_equal(constant_array(pf, 0), W)
    with ProgramFile.from_bytes(raw_program(small_manifest(), small_segments(), minor=65535)) as pf:
        assert pf.minor == 65535


def test_garbage_is_not_a_program():
    expect_error(b"\x7fELF" + bytes(200), "header.magic", 0, "magic is b'\\x7fELF")
    expect_error(b"hello", "header.magic", 0)
    expect_error(MAGIC, "header", 0, "shorter than the 96-byte header")
    expect_error(b"", "header", 0, "file is 0 bytes")


def test_truncation_at_every_offset():
    data = small_program()
    assert len(data) < 1200
    for n in range(len(data)):
        with pytest.raises(ProgramFormatError):
            ProgramFile.from_bytes(data[:n])
    expect_error(data + b"\x00", "header.file_size", 16, "trailing data")


def test_truncation_with_consistent_file_size():
    """Truncated files whose header was patched to match still fail, on the manifest's bounds."""
    data = small_program()
    for n in range(HEADER_SIZE, len(data)):
        with pytest.raises(ProgramFormatError) as info:
            ProgramFile.from_bytes(corrupt(data[:n], 16, "<Q", n))
        assert info.value.field.startswith("header.manifest_"), str(info.value)


# ----------------------------------------------------------------------------------------------
# Hostile manifests


def test_error_messages_name_field_and_manifest_offset():
    def bad_dim(m):
        m["values"][3]["shape"] = [2, -3]

    data = hostile(bad_dim)
    e = expect_error(data, "manifest.values[3].shape[1]", moff_of(data), "-3 is out of range")
    assert e.path == "t.hof"


def _set(path, value):
    """A mutation setting ``manifest[path...] = value``."""

    def mutate(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _del(path):
    def mutate(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


HOSTILE = [
    # values
    (_set(["values", 0, "shape"], [2**31, 1]), "manifest.values[0].shape[0]", "out of range"),
    (_set(["values", 0, "shape"], [2**31 - 1] * 3), "manifest.values[0].shape", "more than 2**40"),
    (_set(["values", 0, "shape"], [2**20, 2**19]), "manifest.values[0].shape", "more than 2**40"),
    (_set(["values", 0, "shape"], [1] * 33), "manifest.values[0].shape", "more than 32"),
    (_set(["values", 0, "shape"], [True, 3]), "manifest.values[0].shape[0]", "expected an integer, got a boolean"),
    (_set(["values", 0, "shape"], [2.0, 3]), "manifest.values[0].shape[0]", "expected an integer"),
    (_set(["values", 0, "shape"], "2x3"), "manifest.values[0].shape", "expected a list"),
    (_set(["values", 0, "dtype"], "bfloat16"), "manifest.values[0].dtype", "not one of"),
    (_del(["values", 0, "dtype"]), "manifest.values[0].dtype", "is missing"),
    (_set(["values", 1], [1]), "manifest.values[1]", "expected an object"),
    # top level
    (_del(["instructions"]), "manifest.instructions", "is missing"),
    (_set(["handoff_version"], 1), "manifest.handoff_version", "expected a string"),
    (_set(["metadata"], []), "manifest.metadata", "expected an object"),
    (_set(["values"], {}), "manifest.values", "expected a list"),
    # inputs / outputs
    (_set(["inputs", 0, "value"], 4), "manifest.inputs[0].value", "value 4 does not exist"),
    (_set(["inputs", 0, "value"], -1), "manifest.inputs[0].value", "does not exist"),
    (_set(["inputs", 0, "name"], None), "manifest.inputs[0].name", "expected a string"),
    (_set(["inputs", 0, "name"], "\ud800"), "manifest.inputs[0].name", "surrogate"),
    (_set(["outputs", 0, "value"], 2**70), "manifest.outputs[0].value", "does not exist"),
    (_set(["outputs"], [{"name": "z", "value": 3}, {"name": "z", "value": 2}]), "manifest.outputs[1].name", "duplicate"),
    (_set(["outputs", 0, "value"], 1.0), "manifest.outputs[0].value", "expected an integer"),
    # constants
    (_set(["constants", 0, "segment"], 2), "manifest.constants[0].segment", "segment 2 does not exist"),
    (_set(["constants", 0, "segment"], 1), "manifest.constants[0].segment", "needs 24"),
    (_set(["constants", 0, "value"], 0), "manifest.constants[0].value", "written twice"),
    # delegates
    (_set(["delegates", 0, "segment"], 5), "manifest.delegates[0].segment", "does not exist"),
    (_set(["delegates", 0, "options"], {"k": 1}), "manifest.delegates[0].options['k']", "expected a string"),
    (_set(["delegates", 0, "metadata"], None), "manifest.delegates[0].metadata", "expected an object"),
    (_set(["delegates", 0, "backend"], ""), "manifest.delegates[0].backend", "must not be empty"),
    (_del(["delegates", 0, "partition"]), "manifest.delegates[0].partition", "is missing"),
    # fallback copies (1.3) and signatures (1.2)
    (_set(["delegates", 0, "fallbacks"], {}), "manifest.delegates[0].fallbacks", "expected a list"),
    (_set(["delegates", 0, "fallbacks"], [{"backend": "tvm", "backend_version": "1", "segment": 7, "metadata": {},
                                           "options": {}}]), "manifest.delegates[0].fallbacks[0].segment", "does not exist"),
    (_set(["delegates", 0, "fallbacks"], [{"backend": "tvm", "segment": 1, "metadata": {}, "options": {}}]),
     "manifest.delegates[0].fallbacks[0].backend_version", "is missing"),
    (_set(["delegates", 0, "fallbacks"], [{"backend": "", "backend_version": "1", "segment": 1, "metadata": {},
                                           "options": {}}]), "manifest.delegates[0].fallbacks[0].backend", "must not be empty"),
    (_set(["signatures"], {}), "manifest.signatures", "expected a list"),
    (_set(["signatures"], [{"key": "ab", "signature": "00" * 64}]), "manifest.signatures[0].key", "64 lowercase hex"),
    (_set(["signatures"], [{"key": "ab" * 32}]), "manifest.signatures[0].signature", "is missing"),
    # instructions: references
    (_set(["instructions", 0, "delegate"], 1), "manifest.instructions[0].delegate", "delegate 1 does not exist"),
    (_set(["instructions", 0, "inputs"], [0, 9]), "manifest.instructions[0].inputs[1]", "value 9 does not exist"),
    (_set(["instructions", 1, "args", 0], {"value": 4}), "manifest.instructions[1].args[0].value", "does not exist"),
    (_set(["instructions", 1, "kwargs"], {"x": [[{"value": -2}]]}), "manifest.instructions[1].kwargs['x'][0][0].value", "does not exist"),
    # instructions: dataflow
    (_set(["instructions", 0, "inputs"], [0, 3]), "manifest.instructions[0].inputs[1]", "value 3 is read before it is written"),
    (_set(["instructions", 1, "args", 0], {"value": 3}), "manifest.instructions[1].args[0].value", "read before it is written"),
    (_set(["instructions", 1, "outputs"], [2]), "manifest.instructions[1].outputs[0]", "value 2 is written twice"),
    (_set(["instructions", 1, "outputs"], [0]), "manifest.instructions[1].outputs[0]", "already defined by manifest.inputs[0]"),
    (_set(["instructions", 0, "outputs"], [1]), "manifest.instructions[0].outputs[0]", "already defined by manifest.constants[0]"),
    (_set(["instructions", 1, "outputs"], [None]), "manifest.outputs[0].value", "value 3 is never written"),
    (_set(["instructions", 0, "outputs"], [2, 2]), "manifest.instructions[0].outputs[1]", "written twice"),
    (_set(["instructions", 0, "outputs"], [None]), "manifest.instructions[0].outputs[0]", "expected an integer"),
    # instructions: shape
    (_set(["instructions", 0, "op"], "call_module"), "manifest.instructions[0].op", "unknown op"),
    (_set(["instructions", 0, "op"], 1), "manifest.instructions[0].op", "expected a string"),
    (_del(["instructions", 1, "kwargs"]), "manifest.instructions[1].kwargs", "is missing"),
    (_set(["instructions", 1, "target"], ""), "manifest.instructions[1].target", "must not be empty"),
    (_set(["instructions", 1], "aten.add"), "manifest.instructions[1]", "expected an object"),
    # encoded arguments
    (_set(["instructions", 1, "args", 1], {"float": "NaN"}), "manifest.instructions[1].args[1].float", "not one of inf"),
    (_set(["instructions", 1, "args", 1], {"dtype": "complex64"}), "manifest.instructions[1].args[1].dtype", "not one of"),
    (_set(["instructions", 1, "args", 1], {"device": 0}), "manifest.instructions[1].args[1].device", "expected a string"),
    (_set(["instructions", 1, "args", 1], {"tensor": 0}), "manifest.instructions[1].args[1]", "unknown argument encoding"),
    (_set(["instructions", 1, "args", 1], {"value": 2, "float": "inf"}), "manifest.instructions[1].args[1]", "exactly one key"),
    (_set(["instructions", 1, "args", 1], {}), "manifest.instructions[1].args[1]", "exactly one key"),
    (_set(["instructions", 1, "args", 1], 2**63), "manifest.instructions[1].args[1]", "(int64)"),
    (_set(["instructions", 1, "args", 1], 1 - 2**63 - 2), "manifest.instructions[1].args[1]", "out of range"),
    # the segment table
    (_set(["segments", 0, "offset"], -64), "manifest.segments[0].offset", "out of range"),
    (_set(["segments", 0, "offset"], 0), "manifest.segments[0].offset", "inside the 96-byte header"),
    (_set(["segments", 0, "offset"], 130), "manifest.segments[0].offset", "not a multiple of the alignment 64"),
    (_set(["segments", 0, "offset"], 192), "manifest.segments[0].offset", "overlaps segments[1]"),
    (_set(["segments", 0, "length"], 1000), "manifest.segments[0].length", "runs past the end"),
    (_set(["segments", 0, "length"], 2**64 - 1), "manifest.segments[0].length", "runs past the end"),
    (_set(["segments", 0, "length"], 2**64), "manifest.segments[0].length", "out of range"),
    (_set(["segments", 0, "offset"], 2**70), "manifest.segments[0].offset", "out of range"),
    (_set(["segments", 0, "sha256"], "AB" * 32), "manifest.segments[0].sha256", "hex"),
    (_set(["segments", 0, "sha256"], None), "manifest.segments[0].sha256", "expected a string"),
    (_set(["segments", 0, "crc32"], -1), "manifest.segments[0].crc32", "out of range"),
    (_set(["segments", 0, "crc32"], 2**32), "manifest.segments[0].crc32", "out of range"),
    (_set(["segments", 0, "crc32"], "1234"), "manifest.segments[0].crc32", "expected an integer"),
    (_set(["segments", 0, "crc32"], 1.0), "manifest.segments[0].crc32", "expected an integer"),
    (_set(["segments", 0, "xxh3"], 12), "manifest.segments[0].xxh3", "expected a string"),
    (_set(["segments", 0, "xxh3"], "0123456789ABCDEF"), "manifest.segments[0].xxh3", "16 lowercase hex digits"),
    (_set(["segments", 0, "xxh3"], "0123"), "manifest.segments[0].xxh3", "16 lowercase hex digits"),
    (_set(["segments"], {}), "manifest.segments", "expected a list"),
]


@pytest.mark.parametrize("mutate,field,words", HOSTILE, ids=[f"{i}:{h[1]}" for i, h in enumerate(HOSTILE)])
def test_hostile_manifest(mutate, field, words):
    def full(m):
        m["segments"] = [
            {"offset": 128, "length": 24, "sha256": hashlib.sha256(W.tobytes()).hexdigest()},
            {"offset": 192, "length": len(BLOB), "sha256": hashlib.sha256(BLOB).hexdigest()},
        ]
        mutate(m)

    data = hostile(full)
    offset = None if field.startswith("manifest.segments[") else moff_of(data)
    expect_error(data, field, offset, words)


def test_segment_layout_errors_report_the_segment_offset():
    def overlap(m):
        m["segments"] = [
            {"offset": 128, "length": 100, "sha256": "0" * 64},
            {"offset": 192, "length": len(BLOB), "sha256": hashlib.sha256(BLOB).hexdigest()},
        ]
        m["constants"] = []

    expect_error(hostile(overlap), "manifest.segments[1].offset", 192, "segments[1] [192, 207) overlaps segments[0] [128, 228)")

    def into_manifest(m):
        m["segments"][1]["length"] = 200

    def fix(m):
        m["segments"] = [
            {"offset": 128, "length": 24, "sha256": "0" * 64},
            {"offset": 192, "length": len(BLOB), "sha256": hashlib.sha256(BLOB).hexdigest()},
        ]
        into_manifest(m)

    data = hostile(fix)
    if moff_of(data) < 192 + 200:
        expect_error(data, "manifest.segments[1].offset", 192, "overlaps the manifest")

    def unaligned(m):
        m["segments"] = [{"offset": 136, "length": 24, "sha256": "0" * 64}, {"offset": 192, "length": 16, "sha256": "0" * 64}]

    expect_error(hostile(unaligned), "manifest.segments[0].offset", 136, "alignment")

    def inside_header(m):
        m["segments"] = [{"offset": 64, "length": 24, "sha256": "0" * 64}, {"offset": 192, "length": 16, "sha256": "0" * 64}]

    data = hostile(inside_header)
    expect_error(data, "manifest.segments[0].offset", 64, "header")

    def negative(m):
        m["segments"] = [{"offset": -64, "length": 24, "sha256": "0" * 64}, {"offset": 192, "length": 16, "sha256": "0" * 64}]

    data = hostile(negative)
    expect_error(data, "manifest.segments[0].offset", moff_of(data))


def test_manifest_inside_a_segment():
    """A header pointing the manifest into segment bytes that happen to hold valid JSON."""
    m = small_manifest()
    m["constants"] = []
    m["delegates"][0]["segment"] = 0
    inner = raw_program(m, [b"x" * 64])  # to learn the table
    table = json.loads(inner[moff_of(inner) :])["segments"]
    m["segments"] = [{"offset": 128, "length": 2000, "sha256": "0" * 64}] + table[1:]
    text = json.dumps(m).encode()
    blob = text + b" " * (2000 - len(text)) if len(text) <= 2000 else None
    assert blob is not None
    data = bytearray(raw_program(m, [blob]))
    struct.pack_into("<QQ", data, 24, 128, len(text))
    struct.pack_into("<32s", data, 48, hashlib.sha256(text).digest())
    expect_error(bytes(data), "manifest.segments[0].offset", 128, "overlaps the manifest")


def test_writer_writes_xxh3_and_crc32_and_xxh3_is_checked_on_access():
    data = small_program()
    with ProgramFile.from_bytes(data) as pf:
        assert pf.minor == FORMAT_MINOR == 5
        table = pf.manifest["segments"]
        assert [t["crc32"] for t in table] == [zlib.crc32(W.tobytes()), zlib.crc32(BLOB)]
        assert [t["xxh3"] for t in table] == [xxhash.xxh3_64_hexdigest(W.tobytes()), xxhash.xxh3_64_hexdigest(BLOB)]
    assert_segment_1_damage_caught(data, "xxh3")


def test_crc32_checked_on_access_in_1_1_files():
    m = small_manifest()
    m["segments"] = [{"offset": 128, "length": 24, "sha256": hashlib.sha256(W.tobytes()).hexdigest(),
                      "crc32": zlib.crc32(W.tobytes())},
                     {"offset": 192, "length": len(BLOB), "sha256": hashlib.sha256(BLOB).hexdigest(),
                      "crc32": zlib.crc32(BLOB)}]
    assert_segment_1_damage_caught(raw_program(m, small_segments(), minor=1), "crc32")


def assert_segment_1_damage_caught(data: bytes, field: str) -> None:
    """Flip the first byte of segment 1 (the delegate blob): using it fails, naming ``field``,
    every time (a failed check is not cached as a pass); segment 0 still reads."""
    bad = bytearray(data)
    bad[192] ^= 0xFF
    with ProgramFile.from_bytes(bytes(bad), name="t.hof") as pf:
        np.testing.assert_array_equal(constant_array(pf, 0), W)
        for _ in range(2):
            with pytest.raises(ProgramFormatError) as info:
                pf.segment(1)
            assert f"segments[1].{field} at offset 192: does not match the segment's bytes (file corrupted)" in str(info.value)
        with pytest.raises(ProgramFormatError):
            pf.verify_all()


def test_verify_all_checks_sha256_where_first_use_checks_crc32():
    """Bytes changed together with their crc32 (not an accident: CRC-32 is no defence against
    a deliberate change) pass the first-use check, and verify_all's SHA-256 still catches them."""
    m = small_manifest()
    blob = b"Y" + BLOB[1:]
    m["segments"] = [
        {"offset": 128, "length": 24, "sha256": hashlib.sha256(W.tobytes()).hexdigest(), "crc32": zlib.crc32(W.tobytes())},
        {"offset": 192, "length": len(BLOB), "sha256": hashlib.sha256(BLOB).hexdigest(), "crc32": zlib.crc32(blob)},
    ]
    with ProgramFile.from_bytes(raw_program(m, [W.tobytes(), blob], minor=1), name="t.hof") as pf:
        assert bytes(pf.segment(1)) == blob
        with pytest.raises(ProgramFormatError, match=r"segments\[1\]\.sha256 at offset 192"):
            pf.verify_all()


def test_segment_sha256_checked_on_access_without_crc32():
    """A 1.0 file (no crc32 in its segments table): SHA-256 on first use."""
    assert_segment_1_damage_caught(raw_program(small_manifest(), small_segments()), "sha256")


def test_bool_constant_holding_other_bytes():
    m = small_manifest()
    m["values"][1] = {"dtype": "bool", "shape": [3]}
    m["instructions"][0]["inputs"] = [0]
    with ProgramFile.from_bytes(raw_program(m, [b"\x01\x00\x02", BLOB]), name="t.hof") as pf:
        with pytest.raises(ProgramFormatError, match=r"manifest.constants\[0\] at offset 128: bool"):
            constant_array(pf, 0)
    with ProgramFile.from_bytes(raw_program(m, [b"\x01\x00\x01", BLOB])) as pf:
        assert constant_array(pf, 0).tolist() == [True, False, True]


def _manifest_bytes(m: dict) -> bytes:
    m = dict(m)
    m.setdefault("segments", json.loads(small_program()[moff_of(small_program()) :])["segments"])
    return json.dumps(m, sort_keys=True).encode()


@pytest.mark.parametrize(
    "text,words",
    [
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": [Infinity]}', "Infinity is not valid JSON"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"a": 1e999}', "overflows"),
        (b'{"a": "\xff\xfe"}', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b"[" * 100000 + b"]" * 100000, "more than 64 levels deep"),
        (b'{"a":' * 70 + b"1" + b"}" * 70, "nests 70 levels deep, more than 64"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"{}}", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b"null", "expected a JSON object"),
    ],
)
def test_hostile_json(text, words):
    data = raw_program(text, small_segments())
    expect_error(data, "manifest", moff_of(data), words)


def test_nan_in_a_real_manifest():
    text = _manifest_bytes(small_manifest()).replace(b'"metadata":{', b'"metadata":{"x":NaN,', 1)
    text = text.replace(b'"metadata": {', b'"metadata": {"x": NaN, ', 1)
    assert b"NaN" in text
    expect_error(raw_program(text, small_segments()), "manifest", None, "NaN")


def test_deep_argument_nesting():
    arg = 1
    for _ in range(32):
        arg = [arg]
    m = small_manifest()
    m["instructions"][1]["args"].append(arg)  # depth 33 (an element of args is depth 1)
    data = raw_program(m, small_segments())
    expect_error(data, "manifest.instructions[1].args[2]" + "[0]" * 32, moff_of(data), "deeper than 32")
    m["instructions"][1]["args"][2] = arg[0]  # depth 32: fine
    with ProgramFile.from_bytes(raw_program(m, small_segments())):
        pass


def test_manifest_claiming_huge_length():
    for length in (2**63, 2**64 - 1, 64 * 2**20 + 1):
        data = raw_program(small_manifest(), small_segments(), manifest_length=length)
        expect_error(data, "header.manifest_length", 32)


def _lines_to_open(n: int) -> int:
    """Python lines executed to open a valid program of ``n`` host instructions (a count, not a time:
    the same on a loaded machine)."""
    import sys

    m = small_manifest()
    m["values"] += [{"dtype": "float32", "shape": [2, 3]}] * n
    m["instructions"] += [
        {"op": "aten", "target": "aten.neg.default", "args": [{"value": 3 + i}], "kwargs": {}, "outputs": [4 + i]}
        for i in range(n)
    ]
    m["outputs"] = [{"name": "z", "value": 3 + n}]
    data = program_bytes(m, small_segments())
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return trace

    sys.settrace(trace)
    try:
        with ProgramFile.from_bytes(data):
            pass
    finally:
        sys.settrace(None)
    return lines


def test_a_large_valid_manifest_opens_in_linear_work():
    """Validation is one pass per instruction: twice the instructions, at most about twice the
    Python work (a quadratic check would show ~4x), and a 2 MB manifest (20k instructions) opens."""
    small, large = _lines_to_open(1000), _lines_to_open(2000)
    assert large <= 2.2 * small, (small, large)
    _lines_to_open(20000)


# ----------------------------------------------------------------------------------------------
# Fuzzing: any bytes -> a ProgramFile or a ProgramFormatError


VALID = small_program()


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_byte_mutations(edits):
    data = bytearray(VALID)
    for kind, pos, byte in edits:
        pos %= len(data) + 1
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << (byte % 8)
        elif kind == "set" and pos < len(data):
            data[pos] = byte
        elif kind == "insert":
            data[pos:pos] = bytes([byte])
        elif kind == "delete" and pos < len(data):
            del data[pos]
    open_fully(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=16))
def test_fuzz_header_words(pos, chunk):
    """Overwrite bytes in the header or anywhere, keeping the length (so file_size passes)."""
    data = bytearray(VALID)
    pos = pos % HEADER_SIZE if chunk[0] & 1 else pos
    data[pos : pos + len(chunk)] = chunk[: len(data) - pos]
    open_fully(bytes(data))


@FUZZ
@given(st.data())
def test_fuzz_manifest_text(data):
    """Mutate the manifest JSON text and re-seal the header, so the schema checks are reached."""
    text = bytearray(VALID[moff_of(VALID) :])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        kind = data.draw(st.sampled_from(["set", "insert", "delete", "digit"]))
        if kind == "digit":
            digits = [i for i, c in enumerate(text) if chr(c).isdigit()]
            i = data.draw(st.sampled_from(digits))
            text[i : i + 1] = data.draw(st.sampled_from([b"0", b"7", b"-1", b"999999999999", b"1.5", b"null", b"true", b'"1"']))
        elif kind == "insert":
            text[pos:pos] = data.draw(st.sampled_from([b"[", b"{", b",", b'"', b"\\", b"0", b"NaN", b"\xff", b"\xc3"]))
        elif kind == "delete" and pos < len(text):
            del text[pos]
        elif pos < len(text):
            text[pos] = data.draw(st.integers(0, 255))
    open_fully(raw_program(bytes(text), small_segments()))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(st.data())
def test_fuzz_manifest_structure(data):
    """Replace or delete one node of a valid manifest (segments table included) with random JSON."""
    m = json.loads(VALID[moff_of(VALID) :])
    paths = [p for p in _paths(m) if p]
    path = data.draw(st.sampled_from(paths))
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        parent[path[-1]] = data.draw(JSON)
    else:
        del parent[path[-1]]
    try:
        text = json.dumps(m).encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(m, ensure_ascii=True).encode()
    open_fully(raw_program(text, small_segments()))


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_garbage(garbage, with_magic):
    open_fully((MAGIC + garbage) if with_magic else garbage)


U64 = st.integers(0, 400) | st.integers(0, 2**64 - 1)


@FUZZ
@given(U64, st.integers(HEADER_SIZE, HEADER_SIZE + 200) | U64, st.integers(0, 200) | U64, st.sampled_from([8, 64, 4096, 0, 3, 2**31]), st.binary(max_size=200), st.booleans())
def test_fuzz_header_values(file_size, moff, mlen, alignment, body, seal):
    """Random header numbers over a random body; also with file_size (and sha256) consistent."""
    for fs in (file_size, HEADER_SIZE + len(body)):
        sha = bytes(32)
        if seal and HEADER_SIZE <= moff <= fs and mlen <= fs - moff:
            sha = hashlib.sha256(body[moff - HEADER_SIZE : moff - HEADER_SIZE + mlen]).digest()
        open_fully(HEADER.pack(MAGIC, 1, 0, 0, fs, moff, mlen, alignment, 0, sha, bytes(16)) + body)


# ----------------------------------------------------------------------------------------------
# The golden file (format 1.0, written once by tests/data/make_golden.py; never regenerated)


def test_golden_file_is_unchanged():
    assert hashlib.sha256(GOLDEN.read_bytes()).hexdigest() == GOLDEN_SHA256, (
        "tests/data/golden_v1.hof changed: it must never be regenerated; restore it from git"
    )


def test_a_read_manifest_is_read_only_and_can_be_written_again():
    """``ProgramFile.manifest`` refuses changes at every level (every load of the unchanged file
    shares it); written again as it is (what ``handoff sign`` does), host-op arguments included,
    it gives the same manifest; ``copy.deepcopy`` gives plain dicts and lists to edit."""
    with ProgramFile.open(GOLDEN) as pf:
        m = pf.manifest
        args = next(ins["args"] for ins in m["instructions"] if ins["op"] == "aten" and ins["args"])
        for change in (lambda: m.update(x=1), lambda: m["values"].append({}), lambda: args.insert(0, 1),
                       lambda: m["values"][0].__setitem__("shape", []), lambda: m["metadata"].pop("note")):
            with pytest.raises(TypeError, match="read-only"):
                change()
        again = program_bytes({k: v for k, v in m.items() if k != "segments"}, [bytes(pf.segment(i)) for i in range(len(pf))])
        edited = copy.deepcopy(m)
    with ProgramFile.from_bytes(again) as other:  # the writer adds xxh3 and crc32 to the segments of this 1.0 file
        assert {k: v for k, v in other.manifest.items() if k != "segments"} == {k: v for k, v in m.items() if k != "segments"}
    edited["metadata"]["note"] = "changed"
    assert type(edited["values"]) is list and m["metadata"]["note"] != "changed"


def test_golden_file_reads():
    with ProgramFile.open(GOLDEN) as pf:
        assert (pf.major, pf.minor, pf.flags, pf.alignment) == (1, 0, 0, 64)
        assert (pf.file_size, pf.manifest_offset, pf.manifest_length) == (3461, 659, 2802)
        m = pf.manifest
        assert m["handoff_version"] == "0.1.0"
        assert m["metadata"]["note"] == "ĥandoff ✓ — UTF-8"
        assert [(s["offset"], s["length"]) for s in m["segments"]] == [
            (128, 24), (192, 40), (256, 3), (320, 4), (384, 0), (384, 275),
        ]
        assert [v["dtype"] for v in m["values"]][:6] == ["float32", "float32", "int64", "bool", "float16", "uint8"]
        assert sorted({v["dtype"] for v in m["values"]}) == sorted(set(DTYPES) - set(UNSIGNED))  # all of 1.0's
        assert m["inputs"] == [{"name": "x", "value": 0}, {"name": "n", "value": 13}]
        assert [o["name"] for o in m["outputs"]] == ["max_values", "cat", "everything", "w"]
        assert m["delegates"] == [
            {
                "backend": "golden",
                "backend_version": "1.0.0",
                "segment": 5,
                "partition": "partition_0",
                "metadata": {"compiler": "none", "nested": {"list": [1, 2.5, "x", None, True]}},
                "options": {"opt_level": "3"},
            }
        ]
        ins = m["instructions"]
        assert [i["op"] for i in ins] == ["delegate"] + ["aten"] * 6
        assert ins[0] == {"op": "delegate", "delegate": 0, "inputs": [0, 1], "outputs": [6]}
        assert ins[2]["args"] == [{"value": 7}, {"float": "-inf"}, 3.5]
        assert ins[3]["outputs"] == [9, None]
        assert ins[4]["kwargs"]["memory_format"] == {"memory_format": "preserve_format"}
        assert ins[5]["args"] == [[{"value": 7}, {"value": 10}], 0]
        assert ins[6]["args"][6] == [[1, [2, {"float": "nan"}]], {"float": "inf"}]
        assert ins[6]["kwargs"] == {"alpha": -1e-300, "n": {"value": 13}}

        pf.verify_all()
        assert bytes(pf.segment(5)) == b"GOLDEN-DELEGATE-v1\x00" + bytes(range(256))
        assert bytes(pf.segment(4)) == b""
        expected = [
            np.array([[-1.0, -0.5, 0.0], [0.5, 1.0, 1.5]], dtype=np.float32),
            np.array([0, -1, 2**40, -(2**63), 2**63 - 1], dtype=np.int64),
            np.array([True, False, True]),
            np.array([1.5, -0.25], dtype=np.float16),
            np.zeros((0,), dtype=np.uint8),
        ]
        for i, want in enumerate(expected):
            got = constant_array(pf, i)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_golden_file_from_bytes_and_every_truncation():
    data = GOLDEN.read_bytes()
    with ProgramFile.from_bytes(data) as pf:
        pf.verify_all()
    for n in range(0, len(data), 7):
        with pytest.raises(ProgramFormatError):
            ProgramFile.from_bytes(data[:n])


def test_writer_reproduces_golden_file_but_for_the_1_1_additions():
    """Today's writer, given the golden file's contents, writes the golden file with the minor
    version and the segments' crc32 (format 1.1) and xxh3 (1.4) as the only differences (the golden file has no
    identical segments, so 1.2's sharing changes nothing)."""
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    manifest, segments, alignment = mod.build()
    data = program_bytes(manifest, segments, alignment=alignment)
    golden = GOLDEN.read_bytes()
    with ProgramFile.from_bytes(data) as new, ProgramFile.from_bytes(golden) as old:
        assert (new.major, new.minor, old.major, old.minor) == (1, FORMAT_MINOR, 1, 0)
        assert [{k: v for k, v in s.items() if k not in ("crc32", "xxh3")} for s in new.manifest["segments"]] == \
            old.manifest["segments"]
        assert [s["crc32"] for s in new.manifest["segments"]] == [zlib.crc32(bytes(old.segment(i))) for i in range(len(old))]
        assert [s["xxh3"] for s in new.manifest["segments"]] == \
            [xxhash.xxh3_64_hexdigest(bytes(old.segment(i))) for i in range(len(old))]
        assert {k: v for k, v in new.manifest.items() if k != "segments"} == \
            {k: v for k, v in old.manifest.items() if k != "segments"}
        assert data[HEADER_SIZE:new.manifest_offset] == golden[HEADER_SIZE:old.manifest_offset]


# ----------------------------------------------------------------------------------------------
# The format-1.3 golden file (fallback copies; written once by tests/data/make_golden_v1_3.py)


def _golden_1_3_module():
    spec = importlib.util.spec_from_file_location("make_golden_v1_3", DATA / "make_golden_v1_3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_golden_writers_never_overwrite_and_print_the_digest(tmp_path, capsys):
    """Both golden-file scripts share make_golden.write_golden: an existing file is refused, a new
    one is written (today's format) with its size and sha256 printed."""
    mod = _golden_1_3_module()
    assert mod.main([str(GOLDEN_1_3)]) == 1
    assert "must never be regenerated" in capsys.readouterr().err
    out = tmp_path / "again.hof"
    assert mod.main([str(out)]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote {out}: {out.stat().st_size} bytes, "
                                               f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    with ProgramFile.open(out) as pf:
        pf.verify_all()
        assert len(pf.manifest["delegates"]) == 2


def test_golden_1_3_file_is_unchanged_and_reads():
    assert hashlib.sha256(GOLDEN_1_3.read_bytes()).hexdigest() == GOLDEN_1_3_SHA256, (
        "tests/data/golden_v1_3.hof changed: it must never be regenerated; restore it from git"
    )
    with ProgramFile.open(GOLDEN_1_3) as pf:
        pf.verify_all()
        assert (pf.major, pf.minor, pf.flags, pf.alignment, pf.file_size) == (1, 3, 0, 64, 2506)
        d0, d1 = pf.manifest["delegates"]
        assert (d0["backend"], d0["segment"], d1["backend"], d1["segment"]) == ("golden_npu", 0, "sinkb", 3)
        assert [(c["backend"], c["backend_version"], c["segment"]) for c in d0["fallbacks"]] == \
            [("golden_dsp", "2.0.0", 1), ("sink", "9.9", 2)]
        assert d0["fallbacks"][0]["metadata"] == {"arch": "v73"}
        assert d1["fallbacks"] == [{"backend": "sink", "backend_version": "9.9", "segment": 3,
                                    "metadata": {"compiler": "sink", "ops": 2},
                                    "options": {"ops": "aten.mul.Tensor,aten.tanh.default"}}]
        assert bytes(pf.segment(0)) == b"GOLDEN-NPU-v1\x00" + bytes(range(64))
        assert bytes(pf.segment(3))[:4] == b"SINK"
    # today's writer, given its contents, writes the same bytes while it writes format 1.3
    if FORMAT_MINOR == 3:
        assert program_bytes(*_golden_1_3_module().build()[:2], alignment=64) == GOLDEN_1_3.read_bytes()


def test_golden_1_3_file_loads_and_runs_its_fallback_copies(sink_plugins, monkeypatch):
    """Delegate 0's own backend and first copy are never installed: its second copy (sink) runs;
    delegate 1 runs on sinkb, or on its sink copy where sinkb cannot run. Outputs equal eager."""
    import warnings

    import torch

    import handoff
    from handoff.testing import assert_matches_eager

    w = torch.tensor(_golden_1_3_module().W)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(7))
    want = torch.tanh(torch.relu(x * w + 1) * x)
    for off, runtimes in (("", ["sink", "sinkb"]), ("sinkb", ["sink", "sink"])):
        monkeypatch.setenv("HANDOFF_SINK_UNAVAILABLE", off)
        with pytest.warns(handoff.FallbackWarning) as warned:
            program = handoff.load(GOLDEN_1_3)
        with program:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = program.run([x.numpy()])
                again = program.run([(x * 2).numpy()])
            stats = program.stats()["delegates"]
        assert len(warned) == 1
        assert [(d["copy"], d["runtime"]) for d in stats] == [(1, runtimes[0]), (None if not off else 0, runtimes[1])]
        assert stats[0]["fallback_reason"].startswith("backend 'golden_npu' not installed;")
        assert_matches_eager(got[0], want)
        assert_matches_eager(again[0], torch.tanh(torch.relu(2 * x * w + 1) * 2 * x))
    assert str(warned[0].message).startswith(
        f"{GOLDEN_1_3}: delegate 0 (golden_npu_0, backend 'golden_npu') runs its fallback copy 1 (backend 'sink') "
        f"because backend 'golden_npu' not installed;")
    assert "delegate 1 (sinkb_0, backend 'sinkb') runs its fallback copy 0 (backend 'sink') because backend 'sinkb' " \
           "cannot run here: switched off by $HANDOFF_SINK_UNAVAILABLE" in str(warned[0].message)
    with pytest.raises(HandoffError, match=r"golden_v1_3.hof: delegate 0 needs backend 'golden_npu' not installed;.*"
                                           r"strict: its fallback copies \(backend 'golden_dsp', 'sink'\) not used"):
        handoff.load(GOLDEN_1_3, strict=True)


def test_a_small_file_read_in_pieces_or_shrinking_while_read(tmp_path, monkeypatch):
    """Short reads are continued; a file that shrinks between fstat and read is refused as
    truncated (one line), never read past."""
    path = tmp_path / "m.hof"
    write_program(path, small_manifest(), small_segments())
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 7)))
    with ProgramFile.open(path) as pf:
        assert bytes(pf.segment(1)) == BLOB
    size = path.stat().st_size
    served = [0]

    def shrinking(fd: int, n: int) -> bytes:  # the file loses its last 10 bytes after fstat
        part = real_read(fd, min(n, size - 10 - served[0]))
        served[0] += len(part)
        return part

    monkeypatch.setattr(os, "read", shrinking)
    with pytest.raises(ProgramFormatError, match="truncated|file_size"):
        ProgramFile.open(path)
