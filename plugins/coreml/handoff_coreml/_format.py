"""The delegate blob of handoff-coreml, and the options both halves share.

Imports neither torch nor coremltools: the plugin module, the compiler and the runtime use it.

A blob is the Core ML package (``model.mlpackage``: ``Manifest.json``, the ML Program
``Data/com.apple.CoreML/model.mlmodel`` and its ``weights/weight.bin``) as one zip archive of
*stored* (uncompressed) members, in the core's shared envelope (:mod:`handoff.blob`)::

    offset 0    8 bytes  magic b"HOFCOREM"
    offset 8    u32 LE   blob format version (FORMAT_VERSION = 1)
    offset 12   u32 LE   length N of the JSON header
    offset 16   N bytes  JSON header (utf-8), then zero padding to a multiple of 64
    data        one section, "model.mlpackage.zip", at a 64-byte aligned offset

Header fields (written by the compiler; the runtime relies on ``inputs``, ``outputs``,
``compute_units`` and ``spec_version``)::

    coremltools         "9.0"       the converter;   handoff_coreml  "0.1.0"
    spec_version        7           Core ML specification version of the model
    deployment_target   "iOS16"     minimum deployment target it was converted for
    precision           "fp16"      compute precision;   compute_units  "all"  (the default at load)
    package             "model.mlpackage"   the archive's top-level directory
    inputs, outputs     [{"name", "dtype", "coreml_dtype", "shape"}], in delegate order: the
                        partition's dtype and shape, and the Core ML feature's name and dtype
                        (Core ML has no int64 or bool features: int64 indices travel as int32,
                        bool as float32)

The archive is untrusted input like the rest of a program file: :func:`extract` checks every
member's name, size and kind and the member count before it writes anything, and writes only
below a directory the caller created.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import stat
import zipfile
from typing import Any, Mapping

from handoff import Option
from handoff import blob as envelope

MAGIC = b"HOFCOREM"
FORMAT_VERSION = 1
ARCHIVE = "model.mlpackage.zip"
PACKAGE = "model.mlpackage"
_ALIGN = 64
_WHAT = "coreml delegate blob"

# -- targets and options -------------------------------------------------------------------------
#: Minimum deployment targets -> the Core ML specification version their models have.
DEPLOYMENT_TARGETS: dict[str, int] = {"iOS15": 6, "iOS16": 7, "iOS17": 8, "iOS18": 9,
                                      "macOS13": 7, "macOS14": 8, "macOS15": 9}
#: The macOS release that first runs each specification version (iOS15 = macOS 12, ...).
MACOS_FOR_SPEC: dict[int, int] = {6: 12, 7: 13, 8: 14, 9: 15}
PRECISIONS = ("fp16", "fp32")
#: ``coremltools.ComputeUnit`` members, lower case.
COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")

#: Compile options (``handoff partition --option coreml.NAME=VALUE``).
OPTIONS: dict[str, Option] = {
    "deployment_target": Option("choice", "minimum OS the package must run on (Core ML specification version "
                                          "6-9); newer targets allow newer ops, and float16 inputs/outputs "
                                          "need iOS16/macOS13 or newer",
                                default="iOS15", choices=tuple(DEPLOYMENT_TARGETS), compare=("iOS15", "iOS18")),
    "precision": Option("choice", "compute precision of the ML Program: fp16 (what the Neural Engine computes "
                                  "in; inputs and outputs keep their dtypes) or fp32 (CPU and GPU only)",
                        default="fp16", choices=PRECISIONS, compare=("fp16", "fp32")),
    "compute_units": Option("choice", "where Core ML may run the model (the default at load time; the runtime "
                                      "option overrides it): all, cpu_only, cpu_and_gpu, cpu_and_ne (Neural Engine)",
                            default="all", choices=COMPUTE_UNITS),
    "verify": Option("bool", "convert each planned partition before lowering and decline the nodes coremltools "
                             "fails on in context; off claims by the per-node check alone (faster; pair with "
                             "--on-lower-error fallback)", default=True),
}
#: Runtime options (``handoff run --option coreml.NAME=VALUE``, ``handoff.load(..., options=)``).
RUNTIME_OPTIONS: dict[str, Option] = {
    "compute_units": Option("choice", "where Core ML may run the model (default: what the program was "
                                      "partitioned with)", default=None, choices=COMPUTE_UNITS),
}

#: Partition dtype -> the dtype of its Core ML input/output feature. Core ML features are float16
#: (spec 7+), float32 and int32 multiarrays; int64 values travel as int32 and bool as float32.
BOUNDARY_DTYPES: dict[str, str] = {"float32": "float32", "float16": "float16", "int32": "int32",
                                   "int64": "int32", "bool": "float32"}

# -- the container -------------------------------------------------------------------------------
#: Limits on the archive a blob may hold (a package has 3 files; a program file's size bounds the rest).
MAX_MEMBERS = 64
MAX_DEPTH = 8
_MEMBER = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_IO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


@dataclasses.dataclass
class Container:
    header: dict[str, Any]
    archive: memoryview


def pack(header: Mapping[str, Any], package_dir: str) -> bytes:
    """The blob: ``header`` and the package directory ``package_dir``, zipped (stored, sorted,
    fixed timestamps) under :data:`PACKAGE`. Directories are members too: a package's manifest
    names its (possibly empty) ``weights`` directory."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for root, dirs, names in os.walk(package_dir):
            dirs.sort()
            rel = os.path.relpath(root, package_dir).replace(os.sep, "/")
            prefix = PACKAGE if rel == "." else f"{PACKAGE}/{rel}"
            info = zipfile.ZipInfo(prefix + "/", date_time=_FIXED_TIME)
            info.external_attr = (stat.S_IFDIR | 0o755) << 16
            zf.writestr(info, b"")
            for name in sorted(names):
                info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=_FIXED_TIME)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                with open(os.path.join(root, name), "rb") as f:
                    zf.writestr(info, f.read(), compress_type=zipfile.ZIP_STORED)
    fields = {**header, "package": PACKAGE}
    return envelope.pack(MAGIC, FORMAT_VERSION, fields, {ARCHIVE: out.getbuffer()}, align=_ALIGN)


def unpack(blob: bytes | memoryview) -> Container:
    """Parse and bounds-check a blob's envelope and header; ``ValueError`` with what is wrong."""
    _, header, sections = envelope.unpack(blob, MAGIC, FORMAT_VERSION, _WHAT)
    if ARCHIVE not in sections:
        raise ValueError(f"{_WHAT} is corrupt: it has no {ARCHIVE!r} section")
    if header.get("package") != PACKAGE:
        raise ValueError(f"{_WHAT} header is corrupt: package {header.get('package')!r}, expected {PACKAGE!r}")
    spec = header.get("spec_version")
    if not isinstance(spec, int) or spec not in MACOS_FOR_SPEC:
        raise ValueError(f"{_WHAT} header is corrupt: spec_version {spec!r} is not one of "
                         f"{', '.join(map(str, MACOS_FOR_SPEC))}")
    if header.get("compute_units") not in COMPUTE_UNITS:
        raise ValueError(f"{_WHAT} header is corrupt: compute_units {header.get('compute_units')!r} is not one of "
                         f"{', '.join(COMPUTE_UNITS)}")
    for kind in ("inputs", "outputs"):
        features = header.get(kind)
        if not isinstance(features, list) or not features or len(features) > 4096:
            raise ValueError(f"{_WHAT} header is corrupt: {kind} must be a non-empty list")
        for i, f in enumerate(features):
            _check_feature(f, f"{kind}[{i}]")
    return Container(header, sections[ARCHIVE])


def _check_feature(f: Any, where: str) -> None:
    bad = f"{_WHAT} header is corrupt: {where}"
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not _IO_NAME.match(f["name"]):
        raise ValueError(f"{bad} has no valid name")
    if f.get("dtype") not in BOUNDARY_DTYPES or f.get("coreml_dtype") != BOUNDARY_DTYPES[f["dtype"]]:
        raise ValueError(f"{bad} has dtype {f.get('dtype')!r} / Core ML dtype {f.get('coreml_dtype')!r}; valid: "
                         + ", ".join(f"{k} as {v}" for k, v in BOUNDARY_DTYPES.items()))
    shape = f.get("shape")
    if (not isinstance(shape, list) or len(shape) > 5
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise ValueError(f"{bad} has shape {shape!r}; expected at most 5 non-negative sizes")


def members(archive: bytes | memoryview) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive's members (directories and files), each checked: a plain relative path under
    :data:`PACKAGE` (no ``..``, no absolute path, no backslash, at most :data:`MAX_DEPTH` deep), a
    plain directory or a stored (uncompressed, so its size is what the archive holds) regular file,
    no name twice (ignoring case), at most :data:`MAX_MEMBERS` of them, file sizes adding up to no
    more than the archive itself, and ``Manifest.json`` present, naming only members of the
    archive (:func:`_check_manifest`). ``ValueError`` naming the first problem."""
    data = memoryview(archive).cast("B")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{_WHAT} is corrupt: its package archive is not a valid zip ({exc})") from None
    if len(infos) > MAX_MEMBERS:
        raise ValueError(f"{_WHAT} is refused: its package archive has {len(infos)} members (at most {MAX_MEMBERS})")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        parts = name.removesuffix("/").split("/")
        if (parts[0] != PACKAGE or len(parts) > MAX_DEPTH + 1 or "\\" in name
                or not all(_MEMBER.match(p) and p not in (".", "..") for p in parts)):
            raise ValueError(f"{_WHAT} is refused: archive member {name!r} is not a plain path under {PACKAGE}/")
        if "/".join(parts).lower() in seen:
            raise ValueError(f"{_WHAT} is refused: archive member {name!r} appears twice")
        seen.add("/".join(parts).lower())
        mode = info.external_attr >> 16
        if info.is_dir():
            if (mode and not stat.S_ISDIR(mode)) or info.file_size:
                raise ValueError(f"{_WHAT} is refused: archive member {name!r} is not a plain directory")
            continue
        if mode and not stat.S_ISREG(mode):
            raise ValueError(f"{_WHAT} is refused: archive member {name!r} is not a regular file (mode {mode:o})")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise ValueError(f"{_WHAT} is refused: archive member {name!r} is compressed; handoff-coreml writes "
                             f"stored members only")
        total += info.file_size
        if total > len(data):
            raise ValueError(f"{_WHAT} is refused: its archive members declare {total} bytes, more than the "
                             f"{len(data)}-byte archive holds")
    manifest = next((i for i in infos if i.filename.lower() == f"{PACKAGE}/manifest.json"), None)
    if manifest is None:
        raise ValueError(f"{_WHAT} is corrupt: its archive has no {PACKAGE}/Manifest.json")
    _check_manifest(zf, manifest, {name.lower(): info for name, info in
                                   ((i.filename.removesuffix("/"), i) for i in infos)})
    return zf, infos


#: Largest ``Manifest.json`` accepted (coremltools writes about 600 bytes).
MAX_MANIFEST = 64 * 1024


def _check_manifest(zf: zipfile.ZipFile, manifest: zipfile.ZipInfo, entries: Mapping[str, zipfile.ZipInfo]) -> None:
    """The package manifest names the files that coremltools (``libmodelpackage``) and Core ML
    then open, by paths relative to ``Data/``, which they follow as given: ``../../etc/passwd`` or
    ``/dev/zero`` would be read. Each item's path must be a plain relative path to a member of
    the archive, and the root model item a regular file."""
    bad = f"{_WHAT} is refused: its {PACKAGE}/Manifest.json"
    if manifest.is_dir() or manifest.file_size > MAX_MANIFEST:
        raise ValueError(f"{bad} is not a file of at most {MAX_MANIFEST} bytes")
    try:
        document = json.loads(zf.read(manifest))
    except (zipfile.BadZipFile, EOFError, ValueError, RecursionError) as exc:
        raise ValueError(f"{bad} is not valid JSON ({type(exc).__name__}: {exc})") from None
    items = document.get("itemInfoEntries") if isinstance(document, dict) else None
    if not isinstance(items, dict) or not items or len(items) > MAX_MEMBERS:
        raise ValueError(f"{bad} has no itemInfoEntries (1 to {MAX_MEMBERS} items)")
    root = document.get("rootModelIdentifier")
    if not isinstance(root, str) or root not in items:
        raise ValueError(f"{bad} has no rootModelIdentifier naming one of its items")
    for key, item in items.items():
        path = item.get("path") if isinstance(item, dict) else None
        parts = path.split("/") if isinstance(path, str) else []
        target = entries.get("/".join((PACKAGE, "Data", *parts)).lower())
        if not parts or not all(_MEMBER.match(p) and p not in (".", "..") for p in parts) or target is None:
            raise ValueError(f"{bad} item {str(key)[:64]!r} has path {str(path)[:200]!r}; expected a plain relative "
                             f"path to a file or directory of the package's Data/")
        if key == root and target.is_dir():
            raise ValueError(f"{bad} names a directory, {str(path)[:200]!r}, as its root model")


def extract(container: Container, dest: str) -> str:
    """Write the package into ``dest`` (an empty private directory the caller created, e.g.
    ``handoff.temp_dir``) after :func:`members` checked the archive; returns the package path.
    Files are created exclusively (never through an existing path or link), and each must read
    back with exactly its declared size and CRC."""
    zf, entries = members(container.archive)
    root = os.path.realpath(dest)
    with zf:
        for info in entries:
            try:
                _write(zf, info, root)
            except OSError as exc:
                raise ValueError(f"{_WHAT} is refused: archive member {info.filename!r} cannot be written "
                                 f"({exc.strerror or exc})") from None
    return os.path.join(root, PACKAGE)


def _write(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: str) -> None:
    path = os.path.join(root, *info.filename.removesuffix("/").split("/"))
    folder = path if info.is_dir() else os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.path.realpath(folder) != folder or not folder.startswith(root + os.sep):
        raise ValueError(f"{_WHAT} is refused: archive member {info.filename!r} escapes the package directory")
    if info.is_dir():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > info.file_size:
                    break
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{_WHAT} is corrupt: archive member {info.filename!r} does not read back ({exc})") from None
    if written != info.file_size:
        raise ValueError(f"{_WHAT} is corrupt: archive member {info.filename!r} holds {written} bytes, declares "
                         f"{info.file_size}")


# -- values at the boundary ------------------------------------------------------------------------
def to_coreml(values: Any, features: list[dict[str, Any]]) -> dict[str, Any]:
    """The feeds of a Core ML prediction: each value checked against its partition dtype and
    shape, then given its Core ML dtype (int64 indices as int32, refusing values beyond int32;
    bool as float32). Never writes into ``values`` (they may be read-only views)."""
    import numpy as np

    if len(values) != len(features):
        raise ValueError(f"coreml delegate takes {len(features)} inputs, got {len(values)}")
    feeds = {}
    for i, (value, f) in enumerate(zip(values, features)):
        array = np.asarray(value)
        if array.dtype != np.dtype(f["dtype"]) or list(array.shape) != list(f["shape"]):
            raise ValueError(f"coreml delegate input {i} ({f['name']}) must be {f['dtype']}{list(f['shape'])}, "
                             f"got {array.dtype}{list(array.shape)}")
        if array.dtype == np.int64 and array.size and (array.min() < -2**31 or array.max() >= 2**31):
            raise ValueError(f"coreml delegate input {i} ({f['name']}) holds int64 values beyond int32, which Core "
                             f"ML cannot take (valid indices fit)")
        feeds[f["name"]] = np.ascontiguousarray(array, dtype=np.dtype(f["coreml_dtype"]))
    return feeds


def from_coreml(values: Any, features: list[dict[str, Any]]) -> list[Any]:
    """Core ML's outputs as the partition declares them (dtype and shape): int32 back to int64
    where the partition has int64 indices, float32 back to bool."""
    import numpy as np

    outputs = []
    for i, (value, f) in enumerate(zip(values, features)):
        array = np.asarray(value)
        shape = tuple(f["shape"])
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"Core ML returned {array.size} values for output {i} ({f['name']}), which has shape "
                             f"{list(shape)}")
        array = array.reshape(shape)
        outputs.append(array != 0 if f["dtype"] == "bool" else array.astype(f["dtype"], copy=False))
    return outputs
