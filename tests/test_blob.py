"""handoff.blob: the delegate blob container backends share."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff import blob

MAGIC = b"HOFTEST0"


def _sample() -> bytes:
    return blob.pack(MAGIC, 2, {"compiler": "x 1.0"}, {"code": b"\x01" * 37, "empty": b"", "weights": bytes(range(200))},
                     align=32)


def test_roundtrip_and_alignment():
    data = _sample()
    version, header, sections = blob.unpack(data, MAGIC, 2, "test blob")
    assert version == 2 and header["compiler"] == "x 1.0"
    assert bytes(sections["code"]) == b"\x01" * 37 and bytes(sections["empty"]) == b""
    assert bytes(sections["weights"]) == bytes(range(200))
    starts = [s["offset"] for s in header["sections"]]
    assert all(o % 32 == 0 for o in starts)


def test_foreign_and_newer_blobs_say_what_to_do():
    data = _sample()
    with pytest.raises(ValueError, match=r"^not a test blob \(magic b'HOFTEST0', expected b'HOFOTHER'\)"):
        blob.unpack(data, b"HOFOTHER", 2, "test blob")
    with pytest.raises(ValueError, match=r"^test blob format 2 is newer than this runtime reads \(1\); upgrade"):
        blob.unpack(data, MAGIC, 1, "test blob")


def test_every_truncation_is_a_value_error():
    data = _sample()
    for n in range(len(data)):
        with pytest.raises(ValueError):
            blob.unpack(data[:n], MAGIC, 2, "test blob")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corruption_gives_value_error_or_a_consistent_blob(data):
    raw = bytearray(_sample())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        _, _, sections = blob.unpack(bytes(raw), MAGIC, 2, "test blob")
    except ValueError:
        return
    assert sum(v.nbytes for v in sections.values()) <= len(raw)
