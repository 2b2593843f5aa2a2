"""handoff-coreml's halves directly: options, import hygiene, capability reasons, the delegate blob
(and hostile ones), the runtime's checks, and what happens off Apple platforms."""

from __future__ import annotations

import io
import json
import operator
import os
import re
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")

import handoff  # noqa: E402
import handoff.testing  # noqa: E402
from handoff import blob as envelope  # noqa: E402
from handoff_coreml import NOT_APPLE, _format, _package, reference  # noqa: E402
from handoff_coreml.runtime import CoreMLRuntime  # noqa: E402

PLUGIN_DIR = Path(__file__).resolve().parents[1]
APPLE = sys.platform == "darwin"


class Block(torch.nn.Module):
    """linear -> layer norm -> gelu, with a float input and output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return torch.nn.functional.gelu(self.norm(self.fc(x)))


def _exported(model, *inputs):
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.linear.default, None)
    return torch.export.export(model.eval(), inputs, strict=False).run_decompositions(table)


@pytest.fixture(scope="module")
def lowered():
    """A real delegate of Block (fp32): (Lowered, the ExportedProgram)."""
    from handoff_coreml.compiler import CoreMLCompiler

    ep = _exported(Block(), torch.randn(2, 4, 16))
    compiler = CoreMLCompiler({"deployment_target": "iOS15", "precision": "fp32", "compute_units": "all",
                               "verify": True})
    return compiler.preprocess(ep, "block"), ep


# -- the plugin module and options ---------------------------------------------------------------
def test_plugin_and_runtime_import_neither_torch_nor_coremltools():
    code = ("import sys, handoff.runtime, handoff_coreml.plugin, handoff_coreml.runtime, handoff_coreml._format\n"
            "bad = [m for m in ('torch', 'coremltools') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "(spec,) = handoff_coreml.plugin.handoff_backends()\n"
            "assert (spec.id, spec.device, spec.api_version) == ('coreml', 'npu', '2.0'), spec\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(PLUGIN_DIR)})


def test_options_are_typed_with_the_valid_values(coreml_plugins):
    compiler = coreml_plugins.compiler("coreml", {})
    assert compiler.options == {"deployment_target": "iOS15", "precision": "fp16", "compute_units": "all",
                                "verify": True}
    assert coreml_plugins.compiler("coreml", {"deployment_target": "ios17", "compute_units": "CPU_AND_NE"}).options[
        "deployment_target"] == "iOS17"
    with pytest.raises(handoff.HandoffError, match=r"^backend 'coreml': option deployment_target='iOS14' is not valid; "
                                                   r"valid values: iOS15, iOS16, iOS17, iOS18, macOS13, macOS14, "
                                                   r"macOS15$"):
        coreml_plugins.compiler("coreml", {"deployment_target": "iOS14"})
    with pytest.raises(handoff.HandoffError, match=r"option precision='int8' is not valid; valid values: fp16, fp32"):
        coreml_plugins.compiler("coreml", {"precision": "int8"})
    with pytest.raises(handoff.HandoffError, match=r"option compute_units='npu' is not valid; valid values: all, "
                                                   r"cpu_only, cpu_and_gpu, cpu_and_ne"):
        coreml_plugins.parse_options("coreml", {"compute_units": "npu"}, runtime=True)
    spec = coreml_plugins.spec("coreml")
    assert spec.options["deployment_target"].compare == ("iOS15", "iOS18")
    assert spec.options["precision"].compare == ("fp16", "fp32")


def test_catalog_entry_comes_from_the_plugin(coreml_plugins):
    entry = coreml_plugins.registry.backends["coreml"]
    assert coreml_plugins.registry.sources["coreml"].startswith("plugin")
    assert entry["compiler"] == {"name": "coremltools", "version": "9.0"}
    assert entry["platforms"] == ["macos-arm64", "ios-arm64"]


# -- capability ------------------------------------------------------------------------------------
class Mixed(torch.nn.Module):
    """Ops Core ML takes around ones it must not: int64 arithmetic, a diagonal, a rank-6 view."""

    def forward(self, x, i):
        y = torch.relu(x) * 2.0
        j = i + 2**33  # int64 beyond int32
        d = torch.diagonal(y[0], 0, 0, 1)
        z = y.reshape(1, 2, 2, 2, 2, 4)
        return d, j, z.sum(-1)


def test_declined_nodes_carry_coremltools_reasons(coreml_plugins):
    ep = _exported(Mixed(), torch.randn(4, 4, 4), torch.tensor([1, 2]))
    reasons = coreml_plugins.compiler("coreml", {}).support(ep)
    by_op = {}
    for node in ep.graph.nodes:
        if node.op == "call_function":
            by_op.setdefault(str(node.target), []).append(reasons[node.name])
    assert by_op["aten.relu.default"] == [None] and by_op["aten.mul.Tensor"] == [None]
    assert by_op["aten.add.Tensor"] == ["int64 tensors are not supported by Core ML (coremltools narrows them to "
                                        "int32, silently wrapping values beyond 2**31); cast to int32 in the model"]
    assert by_op["aten.diagonal.default"][0].startswith("Core ML computes aten.diagonal wrong (apple/coremltools#2565")
    assert by_op["aten.view.default"] == ["rank-6 tensors are not supported by Core ML (at most 5 dimensions)"]
    assert by_op["aten.sum.dim_IntList"] == ["rank-6 tensors are not supported by Core ML (at most 5 dimensions)"]
    assert set(reasons) == {n.name for n in ep.graph.nodes if n.op == "call_function"}


def test_translation_reasons_are_coremltools_own(coreml_plugins):
    """A failing translation is declined with coremltools' message, and the nodes after it are
    still judged (against a stand-in for its output)."""
    class Scaled(torch.nn.Module):
        def forward(self, x):
            return torch.relu(torch.add(x * 2.0, x, alpha=3)) + 1.0

    ep = _exported(Scaled(), torch.randn(3, 5))
    reasons = coreml_plugins.compiler("coreml", {}).support(ep)
    (scaled,) = [n.name for n in ep.graph.nodes if n.kwargs.get("alpha") == 3]
    assert reasons[scaled] == ("coremltools 9.0 ignores the keyword argument alpha=3 of aten.add.Tensor (its "
                               "conversion reads only other arguments), so it would compute a different result")
    assert [r for n, r in reasons.items() if n != scaled] == [None] * (len(reasons) - 1)


def test_keyword_only_arguments_the_conversion_ignores_are_declined(coreml_plugins):
    """torch.export passes gelu's ``approximate`` as a keyword; coremltools 9.0's conversion reads
    only positional arguments and would convert the exact GELU: the tanh form is declined, the
    exact one claimed, and the exact one converts to what eager computes."""
    class Gelus(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x, approximate="tanh"), torch.nn.functional.gelu(x)

    ep = _exported(Gelus(), torch.randn(2, 64))
    compiler = coreml_plugins.compiler("coreml", {"precision": "fp32"})
    reasons = {str(n.kwargs): r for n, r in zip([n for n in ep.graph.nodes if n.op == "call_function"],
                                                compiler.support(ep).values())}
    assert reasons == {"{'approximate': 'tanh'}": "coremltools 9.0 ignores the keyword argument approximate='tanh' of "
                                                 "aten.gelu.default (its conversion reads only other arguments), so "
                                                 "it would compute a different result", "{}": None}
    exact = _exported(Block(), torch.randn(2, 4, 16))
    assert set(compiler.support(exact).values()) == {None}


def test_float16_needs_ios16(coreml_plugins):
    ep = _exported(Block().half(), torch.randn(2, 4, 16, dtype=torch.float16))
    getitems = {n.name for n in ep.graph.nodes if n.target is operator.getitem}  # judged with their producer
    old = {n: r for n, r in coreml_plugins.compiler("coreml", {}).support(ep).items() if n not in getitems}
    new = {n: r for n, r in coreml_plugins.compiler("coreml", {"deployment_target": "iOS16"}).support(ep).items()
           if n not in getitems}
    assert len(old) == 3 and set(old.values()) == {"float16 tensors need deployment target iOS16/macOS13 or newer (Core ML has float16 "
                                 "inputs and outputs from there): --option coreml.deployment_target=iOS16"}
    by_op = {str(n.target): new[n.name] for n in ep.graph.nodes if n.name in new}
    assert by_op["aten.linear.default"] is None and by_op["aten.gelu.default"] is None
    # coremltools' own layer_norm conversion builds an fp32 epsilon for an fp16 input
    assert by_op["aten.native_layer_norm.default"].startswith("coremltools 9.0 cannot convert "
                                                             "aten.native_layer_norm.default: In op, of type layer_norm")


# -- the blob ----------------------------------------------------------------------------------------
def test_blob_is_the_package_with_its_features(lowered):
    result, ep = lowered
    md = result.metadata
    assert (md["compiler"], md["coremltools_version"], md["spec_version"], md["deployment_target"],
            md["precision"], md["compute_units"]) == ("coremltools", "9.0", 6, "iOS15", "fp32", "all")
    assert md["inputs"] == [{"name": "input_0", "dtype": "float32", "coreml_dtype": "float32", "shape": [2, 4, 16]}]
    assert md["outputs"] == [{"name": "output_0", "dtype": "float32", "coreml_dtype": "float32", "shape": [2, 4, 16]}]
    assert md["mil_ops"] == {"gelu": 1, "layer_norm": 1, "linear": 1}
    container = _format.unpack(result.blob)
    _, entries = _format.members(container.archive)
    assert sorted(i.filename for i in entries) == [
        "model.mlpackage/", "model.mlpackage/Data/", "model.mlpackage/Data/com.apple.CoreML/",
        "model.mlpackage/Data/com.apple.CoreML/model.mlmodel", "model.mlpackage/Data/com.apple.CoreML/weights/",
        "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin", "model.mlpackage/Manifest.json"]
    with tempfile.TemporaryDirectory() as tmp:
        spec = _package.read_spec(_format.extract(container, tmp))
    _package.check_spec(spec, container.header)
    assert spec.specificationVersion == 6 and _package.mil_ops(spec) == md["mil_ops"]


def test_reference_evaluation_matches_eager(lowered):
    result, _ = lowered
    model = Block().eval()
    firsts = []
    for seed in (1, 2):
        x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(seed))
        (got,) = reference.evaluate(result.blob, [x.numpy()])
        handoff.testing.assert_matches_eager(got, model(x), "float32")
        firsts.append(got)
    assert not np.allclose(*firsts)


DEFLATED = -1  # an entry kind: a regular file, compressed


def _zip(entries) -> bytes:
    """A zip of ``(name, data, kind)``: ``kind`` is the member's mode (``stat.S_IFREG | 0o644``,
    ``stat.S_IFLNK | 0o777``, ...), or :data:`DEFLATED` for a compressed regular file."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data, kind in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644 if kind == DEFLATED else kind) << 16
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED if kind == DEFLATED else zipfile.ZIP_STORED)
    return out.getvalue()


def _manifest(path: str = "m", root: str = "A") -> tuple[str, bytes, int]:
    items = {"A": {"author": "com.apple.CoreML", "name": "model.mlmodel", "path": path}}
    return ("model.mlpackage/Manifest.json", json.dumps({"itemInfoEntries": items, "rootModelIdentifier": root}).encode(),
            stat.S_IFREG | 0o644)


MANIFEST = _manifest()
MODEL = ("model.mlpackage/Data/m", b"", stat.S_IFREG | 0o644)  # what MANIFEST names


def _with_archive(lowered, archive: bytes) -> bytes:
    header = _format.unpack(lowered[0].blob).header
    return envelope.pack(_format.MAGIC, _format.FORMAT_VERSION, header, {_format.ARCHIVE: archive}, align=64)


@pytest.mark.parametrize("entries, message", [
    ([MANIFEST, ("model.mlpackage/../../evil", b"x", stat.S_IFREG)], "'model.mlpackage/../../evil' is not a plain path"),
    ([MANIFEST, ("/etc/evil", b"x", stat.S_IFREG)], "'/etc/evil' is not a plain path"),
    ([MANIFEST, ("model.mlpackage\\..\\evil", b"x", stat.S_IFREG)], "is not a plain path"),
    ([MANIFEST, ("elsewhere/x", b"x", stat.S_IFREG)], "'elsewhere/x' is not a plain path under model.mlpackage/"),
    ([MANIFEST, ("model.mlpackage/link", b"/etc/passwd", stat.S_IFLNK | 0o777)], "'model.mlpackage/link' is not a "
                                                                                   "regular file"),
    ([MANIFEST, ("model.mlpackage/big", b"0" * 4096, DEFLATED)], "'model.mlpackage/big' is compressed"),
    ([MANIFEST, MANIFEST], "'model.mlpackage/Manifest.json' appears twice"),
    ([MANIFEST, ("model.mlpackage/manifest.JSON", b"{}", stat.S_IFREG)], "appears twice"),
    ([("model.mlpackage/x", b"x", stat.S_IFREG)], "has no model.mlpackage/Manifest.json"),
    ([MANIFEST] + [(f"model.mlpackage/f{i}", b"", stat.S_IFREG) for i in range(64)], "has 65 members (at most 64)"),
    ([MANIFEST, ("model.mlpackage/" + "/".join("d" * 10), b"x", stat.S_IFREG)], "is not a plain path"),
])
def test_hostile_archives_are_refused_before_anything_is_written(lowered, tmp_path, entries, message):
    blob = _with_archive(lowered, _zip(entries))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("\\..", "")):
        _format.extract(_format.unpack(blob), str(dest))
    assert list(dest.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


@pytest.mark.parametrize("manifest, message", [
    (_manifest("../../../../../../etc/passwd"), "item 'A' has path '../../../../../../etc/passwd'; expected a plain"),
    (_manifest("/dev/zero"), "item 'A' has path '/dev/zero'"),
    (_manifest("com.apple.CoreML/model.mlmodel"), "has path 'com.apple.CoreML/model.mlmodel'"),  # not in the archive
    (_manifest("d"), "names a directory, 'd', as its root model"),
    (_manifest(root="B"), "has no rootModelIdentifier naming one of its items"),
    (("model.mlpackage/Manifest.json", b"[1]", stat.S_IFREG), "has no itemInfoEntries"),
    (("model.mlpackage/Manifest.json", b"{", stat.S_IFREG), "is not valid JSON"),
    (("model.mlpackage/Manifest.json", b" " * 70000, stat.S_IFREG), "is not a file of at most 65536 bytes"),
])
def test_manifests_naming_files_outside_the_package_are_refused(lowered, tmp_path, manifest, message):
    """coremltools (libmodelpackage) and Core ML open the files Manifest.json names, relative to
    Data/, as given: ../../etc/passwd would be read, /dev/zero read until memory runs out."""
    blob = _with_archive(lowered, _zip([manifest, MODEL, ("model.mlpackage/Data/d/", b"", stat.S_IFDIR | 0o755)]))
    with pytest.raises(ValueError, match=re.escape(message)):
        _format.extract(_format.unpack(blob), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_archive_sizes_that_lie_are_refused(lowered, tmp_path):
    archive = bytearray(_zip([MANIFEST, ("model.mlpackage/w", b"12345678", stat.S_IFREG | 0o644)]))
    central = archive.rfind(b"PK\x01\x02")  # the last central-directory entry: its sizes claim 2 GB
    archive[central + 20:central + 28] = (2**31).to_bytes(4, "little") * 2
    with pytest.raises(ValueError, match=r"declare 2147483\d{3} bytes, more than the|is not a valid zip"):
        _format.extract(_format.unpack(_with_archive(lowered, bytes(archive))), str(tmp_path))
    crc = bytearray(_zip([MANIFEST, MODEL, ("model.mlpackage/w", b"12345678", stat.S_IFREG | 0o644)]))
    crc[crc.find(b"12345678")] ^= 1  # the data no longer matches its CRC
    with pytest.raises(ValueError, match="'model.mlpackage/w' does not read back"):
        _format.extract(_format.unpack(_with_archive(lowered, bytes(crc))), str(tmp_path / "x"))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:40], "truncated"),
    (lambda b: b"HOFXNNPK" + b[8:], "not a coreml delegate blob"),
    (lambda b: b[:8] + (9).to_bytes(4, "little") + b[12:], "format 9 is newer than this runtime reads"),
])
def test_foreign_or_broken_blobs_are_refused(lowered, mutate, message):
    with pytest.raises(ValueError, match=message):
        _format.unpack(mutate(lowered[0].blob))


@pytest.mark.parametrize("field, value, message", [
    ("inputs", [{"name": "x", "dtype": "float64", "coreml_dtype": "float32", "shape": [1]}], "has dtype 'float64'"),
    ("inputs", [{"name": "x", "dtype": "float32", "coreml_dtype": "float32", "shape": [1] * 6}], "at most 5"),
    ("outputs", [{"name": "../x", "dtype": "float32", "coreml_dtype": "float32", "shape": [1]}], "has no valid name"),
    ("outputs", [], "outputs must be a non-empty list"),
    ("spec_version", 99, "spec_version 99 is not one of"),
    ("compute_units", "gpu", "compute_units 'gpu' is not one of"),
])
def test_corrupt_headers_are_refused(lowered, field, value, message):
    container = _format.unpack(lowered[0].blob)
    header = {**container.header, field: value}
    blob = envelope.pack(_format.MAGIC, _format.FORMAT_VERSION, header, {_format.ARCHIVE: container.archive}, align=64)
    with pytest.raises(ValueError, match=message):
        _format.unpack(blob)


def test_a_package_that_contradicts_its_header_is_refused(lowered, tmp_path):
    container = _format.unpack(lowered[0].blob)
    header = {**container.header, "outputs": [{**container.header["outputs"][0], "shape": [2, 4, 17]}]}
    spec = _package.read_spec(_format.extract(container, str(tmp_path)))
    with pytest.raises(ValueError, match=r"its model's outputs are output_0 float32\[2, 4, 16\], its header declares "
                                         r"output_0 float32\[2, 4, 17\]"):
        _package.check_spec(spec, header)


# -- the runtime -------------------------------------------------------------------------------------
def _private_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("handoff-coreml-")}


def test_runtime_availability():
    ok, why = CoreMLRuntime().is_available()
    assert (ok, why) == ((True, "") if APPLE else (False, NOT_APPLE))


def test_runtime_load_checks_the_blob_first_and_cleans_up(lowered):
    runtime = CoreMLRuntime()
    before = _private_dirs()
    with pytest.raises(ValueError, match="not a coreml delegate blob"):
        runtime.load(memoryview(b"HOFXNNPK" + lowered[0].blob[8:]), {}, {"compute_units": None})
    evil = _with_archive(lowered, _zip([MANIFEST, ("model.mlpackage/../x", b"x", stat.S_IFREG)]))
    with pytest.raises(ValueError, match="is not a plain path"):
        runtime.load(memoryview(evil), {}, {"compute_units": None})
    if not APPLE:
        with pytest.raises(RuntimeError, match=NOT_APPLE.replace("(", r"\(").replace(")", r"\)")):
            runtime.load(memoryview(lowered[0].blob), lowered[0].metadata, {"compute_units": None})
    assert _private_dirs() == before


def test_runtime_converts_values_at_the_boundary():
    features = [{"name": "i", "dtype": "int64", "coreml_dtype": "int32", "shape": [3]},
                {"name": "b", "dtype": "bool", "coreml_dtype": "float32", "shape": [2]}]
    i = np.array([0, 5, 2**31 - 1])
    i.flags.writeable = False
    feeds = _format.to_coreml([i, np.array([True, False])], features)
    assert feeds["i"].dtype == np.int32 and feeds["b"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"input 0 \(i\) holds int64 values beyond int32"):
        _format.to_coreml([np.array([0, 2**31, 1]), np.array([True, False])], features)
    with pytest.raises(ValueError, match=r"input 1 \(b\) must be bool\[2\], got float32\[2\]"):
        _format.to_coreml([i, np.zeros(2, np.float32)], features)
    out = _format.from_coreml([np.array([[1, 2, 3]], np.int32), np.array([0.0, 1.0], np.float32)], features)
    assert out[0].dtype == np.int64 and out[0].shape == (3,) and out[1].tolist() == [False, True]
    with pytest.raises(ValueError, match=r"Core ML returned 2 values for output 0 \(i\), which has shape \[3\]"):
        _format.from_coreml([np.zeros(2, np.int32), np.zeros(2)], features)


def test_int8_op_table_rows_are_declined_with_the_reason_and_the_declines_agree(tmp_path, monkeypatch):
    """tools/check_op_table.py's int8 samples (handoff.testing.int8_samples: dq -> conv/linear/
    add/relu -> q, as PT2E leaves each op): coreml declines each with its reason, and each decline
    agrees (the conversion of the quantized one-op graph fails or does not match)."""
    import importlib.util

    pytest.importorskip("torchao")
    path = Path(__file__).resolve().parents[1] / "tools" / "check_op_table.py"
    spec = importlib.util.spec_from_file_location("coreml_check_op_table", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path / "home"))
    out = tmp_path / "rows.json"
    assert tool.main(["-k", "int8 ", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["sample"].startswith("int8 ")]
    assert len(rows) == 5 and all(r["verdict"] == "agree" and not r["claimed"] for r in rows), rows  # 1 per-channel
    assert all("int8 is not supported by coremltools" in r["reason"] or "has no conversion for "
               "quantized_decomposed.quantize_per_channel" in r["reason"] for r in rows), rows
