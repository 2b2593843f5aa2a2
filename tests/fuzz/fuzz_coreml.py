"""Fuzz the coreml runtime's blob loader in this process, as far as it runs off Apple platforms:
the envelope and header (``handoff_coreml._format.unpack``), the package archive's hostile-archive
checks and its extraction into a private directory (``members``, ``extract``), coremltools reading
the package (``libmodelpackage`` parsing ``Manifest.json``, the specification's protobuf) and the
comparison of its features with the header (``_package.check_spec``), up to the point where
``load`` asks Core ML for the model and is refused because Core ML is not here (``RuntimeError``,
like every clean rejection; on a Mac the model would then be loaded and run once on zeros).

Most mutations of the archive would stop at a member's CRC-32, which only ``extract`` checks, so
the harness first makes every stored member's CRC (local header and central directory) agree
with its bytes, as an attacker can; one input in seven is read exactly as it is, to keep the CRC
checks covered. Every input's temporary directory must be gone afterwards. Seeds:
``corpus/coreml/`` (the seed models of ``make_seeds.py`` lowered by coremltools).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import zipfile
import zlib

import numpy as np

import _harness

EXPECTED: tuple[type[BaseException], ...] = ()
_runtime = None
_LOCAL, _CENTRAL = b"PK\x03\x04", b"PK\x01\x02"


def setup() -> None:
    global EXPECTED, _runtime
    from handoff import HandoffError
    from handoff_coreml._quiet import quiet
    from handoff_coreml.runtime import CoreMLRuntime

    EXPECTED = (HandoffError, ValueError, RuntimeError)
    _runtime = CoreMLRuntime()
    with quiet():
        import coremltools  # noqa: F401  once, outside the first input's time limit (it imports torch)
    # The runtime's scratch directories (tempfile.mkdtemp) go to a directory of the harness's own
    # (in its $HANDOFF_HOME, see _harness.quiet), so that one_input can tell each input's is removed.
    scratch = os.path.join(os.environ["HANDOFF_HOME"], "coreml-scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch, mode=0o700)
    tempfile.tempdir = scratch


def consistent(data: bytes) -> bytes:
    """``data`` with the CRC-32 of each stored member of its package archive set to match the
    member's bytes, in the member's local header and central directory entry."""
    from handoff import blob
    from handoff_coreml import _format

    if len(data) % 7 == 0:
        return data
    try:
        _, header, sections = blob.unpack(data, _format.MAGIC, _format.FORMAT_VERSION, "blob")
        archive = sections[_format.ARCHIVE]
    except (ValueError, KeyError):
        return data
    start = -(-(16 + struct.unpack_from("<I", data, 12)[0]) // int(header["align"])) * int(header["align"])
    start += next(int(s["offset"]) for s in header["sections"] if s["name"] == _format.ARCHIVE)
    out = bytearray(data)
    zip_bytes = out[start:start + len(archive)]
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(zip_bytes))) as zf:
            infos, central = zf.infolist(), zf.start_dir
        crcs = []
        for info in infos:
            at = info.header_offset
            if zip_bytes[at:at + 4] != _LOCAL:
                return data
            name_len, extra_len = struct.unpack_from("<HH", zip_bytes, at + 26)
            begin = at + 30 + name_len + extra_len
            crc = zlib.crc32(zip_bytes[begin:begin + info.compress_size])
            struct.pack_into("<I", zip_bytes, at + 14, crc)
            crcs.append(crc)
        for crc in crcs:
            if zip_bytes[central:central + 4] != _CENTRAL:
                break
            struct.pack_into("<I", zip_bytes, central + 16, crc)
            central += 46 + sum(struct.unpack_from("<HHH", zip_bytes, central + 28))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, struct.error,
            NotImplementedError):
        return data
    out[start:start + len(archive)] = zip_bytes
    return bytes(out)


def one_input(data: bytes) -> None:
    from _blobs import load_and_run

    try:
        load_and_run(_runtime, consistent(data),
                     lambda handle: [(np.dtype(f["dtype"]), tuple(f["shape"])) for f in handle.inputs])
    finally:
        left = os.listdir(tempfile.tempdir)
        for name in left:
            shutil.rmtree(os.path.join(tempfile.tempdir, name), ignore_errors=True)
        if left:
            raise _harness.Finding(f"load left {left} behind in its temporary directory")


if __name__ == "__main__":
    _harness.main("fuzz_coreml")
