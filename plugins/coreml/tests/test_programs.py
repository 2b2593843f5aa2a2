"""handoff-coreml through the core: partition, program file, the Core ML packages it holds.

Linux cannot execute Core ML, so each program is checked three ways here: its Core ML delegates
reload with ``MLModel(skip_model_load=True)`` with the partition's features, their MIL operations
are the ones the model needs, and where every MIL operation has a numpy implementation in
coremltools the whole program is run against eager torch on fresh random inputs, with its Core
ML delegates evaluated by :mod:`handoff_coreml.reference` (``coreml_reference_plugin``) and every
other delegate by its real runtime. Tolerances: fp32 1e-4, fp16 1e-2 relative of eager.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")
pytest.importorskip("executorch.backends.xnnpack")
pytest.importorskip("tvm")
from torch import nn  # noqa: E402

import handoff  # noqa: E402
from handoff.testing import check_against_eager  # noqa: E402
from handoff_coreml import NOT_APPLE, _format, _package, reference  # noqa: E402

pytestmark = pytest.mark.slow
DTYPE = {"fp32": "float32", "fp16": "float16"}
#: MIL operations each zoo model's package must hold (beyond these: reshapes, and in fp16 the
#: two casts of the float32 input and output).
ZOO_MIL = {
    "small_cnn": {"conv": 4, "relu": 4, "add": 1, "max_pool": 1, "reduce_mean": 1, "linear": 1},
    "small_transformer": {"layer_norm": 5, "gelu": 2, "softmax": 2, "matmul": 4, "linear": 9, "add": 5,
                          "reduce_mean": 1},
    "mobilenet_v2": {"conv": 52, "clip": 35, "add": 10, "reduce_mean": 1, "linear": 1},
}


def _rendered(report) -> str:
    from rich.console import Console

    out = io.StringIO()
    report.render(Console(file=out, width=250))
    return out.getvalue()


def _delegates(result, backend="coreml"):
    manifest = result.assembled.manifest
    return [(d, result.assembled.segments[d["segment"]]) for d in manifest["delegates"] if d["backend"] == backend]


def _check_package(blob: bytes, metadata) -> None:
    """The blob reloads with coremltools (skip_model_load) and holds what its metadata says."""
    container = _format.unpack(blob)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _package.read_spec(_format.extract(container, tmp))
    _package.check_spec(spec, container.header)
    assert container.header["inputs"] == metadata["inputs"] and container.header["outputs"] == metadata["outputs"]
    assert _package.mil_ops(spec) == metadata["mil_ops"]


def _run_with_reference(use_plugins, result, model, specs, dtype) -> None:
    """The whole program against eager, Core ML delegates evaluated by the reference plugin."""
    import coreml_reference_plugin

    before = coreml_reference_plugin.ReferenceRuntime.evaluated
    pm = use_plugins("coreml_reference_plugin", "handoff_xnnpack.plugin")  # until the next use_plugins
    check_against_eager(result.to_bytes(), model, specs, dtype=dtype)
    assert coreml_reference_plugin.ReferenceRuntime.evaluated > before, pm


@pytest.fixture(scope="module")
def zoo_results(use_plugins):
    """One partition per (model, precision), shared by the tests below."""
    cache = {}

    def get(name: str, precision: str):
        if (name, precision) not in cache:
            use_plugins("handoff_coreml.plugin")
            cache[name, precision] = handoff.partition(f"zoo:{name}", backends=["coreml"],
                                                       options={"coreml": {"precision": precision}})
        return cache[name, precision]

    return get


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", list(ZOO_MIL))
def test_zoo_model_converts_whole(name, precision, zoo_results, use_plugins):
    """Every node of the zoo's CNN, transformer and MobileNetV2 goes to Core ML, in one ML
    Program of the requested precision, whose MIL operations are the model's."""
    result = zoo_results(name, precision)
    report = result.report
    assert report.coverage("coreml") == 100.0
    assert report.stats["coreml"].partitions == 1 and report.declined == []
    assert "100.0%" in _rendered(report)
    ((delegate, blob),) = _delegates(result)
    md = delegate["metadata"]
    assert (md["precision"], md["deployment_target"], md["spec_version"], md["coremltools_version"]) == (
        precision, "iOS15", 6, "9.0")
    zoo = handoff.get_plugins().zoo()[name]
    assert [f["shape"] for f in md["inputs"]] == [list(s) for s, _ in zoo.inputs]
    ops = md["mil_ops"]
    assert {op: ops.get(op) for op in ZOO_MIL[name]} == ZOO_MIL[name]
    assert ops.get("cast", 0) == (2 if precision == "fp16" else 0)
    assert set(ops) - set(ZOO_MIL[name]) <= {"cast", "reshape", "transpose", "squeeze", "slice_by_index", "mul"}
    _check_package(blob, md)
    if name == "small_transformer":
        _run_with_reference(use_plugins, result, zoo.build(), zoo.inputs, DTYPE[precision])
    else:  # convolutions have no numpy implementation in coremltools: no numeric check off macOS
        with pytest.raises(reference.NotEvaluable, match="conv"):
            reference.evaluate(blob, [torch.randn(*s).numpy() for s, _ in zoo.inputs])
    if sys.platform != "darwin":
        use_plugins("handoff_coreml.plugin")
        with pytest.raises(handoff.HandoffError, match=f"backend 'coreml' cannot run here: "
                                                       f"{NOT_APPLE.replace('(', '.').replace(')', '.')}"):
            handoff.load(result.to_bytes())


class EncoderBlocks(nn.Module):
    """Two pre-norm nn.TransformerEncoderLayers (GELU, 4 heads) and a head on the first token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)
        with torch.no_grad():  # random affine parameters: a default LayerNorm is the identity map
            for norm in (m for m in self.modules() if isinstance(m, nn.LayerNorm)):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.encoder(x)[:, 0])


class Attention(nn.Module):
    """scaled_dot_product_attention with a causal mask, layer norm and GELU, written out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.norm, self.qkv, self.out = nn.LayerNorm(24), nn.Linear(24, 72), nn.Linear(24, 24)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).reshape(1, 6, 3, 3, 8).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + nn.functional.gelu(self.out(y.transpose(1, 2).reshape(1, 6, 24)))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("model, shape", [(EncoderBlocks, (1, 7, 32)), (Attention, (1, 6, 24))],
                         ids=["TransformerEncoder", "sdpa"])
def test_transformer_blocks_with_xnnpack(model, shape, precision, use_plugins):
    """``--backends coreml,xnnpack`` on transformer blocks: Core ML takes the layer norms, GELUs
    and attention (matmuls, softmax); every node it declines carries its reason and runs on
    xnnpack or tvm; the program computes what eager torch does."""
    use_plugins("handoff_coreml.plugin", "handoff_xnnpack.plugin")
    model = model().eval()
    # on_lower_error: ExecuTorch's XNNPACK lowering asserts on the causal mask's constant-only part
    # (constant_prop_pass), which then moves on to tvm
    result = handoff.partition(model, (torch.randn(shape),), backends=["coreml", "xnnpack"],
                               options={"coreml": {"precision": precision}}, on_lower_error="fallback")
    report = result.report
    taken = report.stats["coreml"].ops
    for op in ("aten.native_layer_norm.default", "aten.gelu.default", "aten._softmax.default"):
        assert taken.get(op), (op, taken)
    assert taken.get("aten.bmm.default") or taken.get("aten.matmul.default"), taken
    assert report.coverage("coreml") > 70.0  # at the default --min-partition-size 3, small islands join tvm
    for d in report.declined:
        assert d["ran_on"] in ("xnnpack", "tvm") and d["reasons"]["coreml"] not in ("", "not reported"), d
    text = _rendered(report)
    for d in report.declined:
        assert d["reasons"]["coreml"][:60] in text
    for delegate, blob in _delegates(result):
        _check_package(blob, delegate["metadata"])
    _run_with_reference(use_plugins, result, model, [(shape, "float32")], DTYPE[precision])


class Block(nn.Module):
    """linear -> layer norm -> gelu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))


def test_check_partition_declines_what_fails_in_context(monkeypatch, use_plugins):
    """A partition coremltools fails to convert as a whole (injected: any graph holding a GELU
    after a layer norm) loses the node that makes it fail, found by bisection, with the
    converter's message; the rest stays on Core ML, the GELU goes to xnnpack. The outcome is
    cached: partitioning again converts nothing while checking."""
    from handoff_coreml.compiler import CoreMLCompiler

    real = CoreMLCompiler.lower_unchecked
    calls = []

    def lower(self, ep, name):
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        calls.append(targets)
        if "aten.gelu.default" in targets and "aten.native_layer_norm.default" in targets:
            raise handoff.LoweringError("MIL pipeline failed: injected")
        return real(self, ep, name)

    monkeypatch.setattr(CoreMLCompiler, "lower_unchecked", lower)
    use_plugins("handoff_coreml.plugin", "handoff_xnnpack.plugin")
    model = Block().eval()
    result = handoff.partition(model, (torch.randn(2, 16),), backends=["coreml", "xnnpack"],
                               options={"coreml": {"precision": "fp32"}}, default_limits=handoff.Limits(1))
    (declined,) = result.report.declined
    assert declined["op"] == "aten.gelu.default" and declined["ran_on"] == "xnnpack"
    assert declined["reasons"]["coreml"] == ("coremltools 9.0 fails to convert aten.gelu.default in this graph (what "
                                             "precedes it converts without it): MIL pipeline failed: injected")
    assert result.report.stats["coreml"].partitions == 2
    _run_with_reference(use_plugins, result, model, [((2, 16), "float32")], "float32")
    calls.clear()
    use_plugins("handoff_coreml.plugin", "handoff_xnnpack.plugin")
    again = handoff.partition(model, (torch.randn(2, 16),), backends=["coreml", "xnnpack"],
                              options={"coreml": {"precision": "fp32"}}, default_limits=handoff.Limits(1))
    assert again.report.declined == result.report.declined and calls == []


def test_preprocess_lowers_the_conversion_check_partition_made(monkeypatch, use_plugins):
    """``check_partition`` converts each planned partition for real; ``preprocess`` then lowers
    that very conversion (the same nodes cut from the same program, ``handoff.partition_source``)
    instead of converting again: once a partition's check is done, nothing more is converted."""
    from handoff_coreml.compiler import CoreMLCompiler

    real_lower, real_check = CoreMLCompiler.lower_unchecked, CoreMLCompiler.check_partition
    conversions: list[list[str]] = []
    after_checks: list[int] = []

    def lower(self, ep, name):
        conversions.append([str(n.target) for n in ep.graph.nodes if n.op == "call_function"])
        return real_lower(self, ep, name)

    def check(self, ep, nodes):
        try:
            return real_check(self, ep, nodes)
        finally:
            after_checks.append(len(conversions))

    monkeypatch.setattr(CoreMLCompiler, "lower_unchecked", lower)
    monkeypatch.setattr(CoreMLCompiler, "check_partition", check)
    use_plugins("handoff_coreml.plugin")
    model = Block().eval()
    result = handoff.partition(model, (torch.randn(2, 16),), backends=["coreml"], use_cache=False,
                               options={"coreml": {"precision": "fp32"}})
    assert result.report.stats["coreml"].partitions == 1
    assert after_checks and conversions and len(conversions) == after_checks[-1], (conversions, after_checks)
    _run_with_reference(use_plugins, result, model, [((2, 16), "float32")], "float32")


def test_check_partition_declines_the_node_coremltools_names(monkeypatch, use_plugins):
    """When coremltools' error names a node of the partition (its MIL ops carry the torch node
    names; injected: ``Op "gelu" ...`` for any graph holding a GELU after a layer norm), that node
    is declined with the error, without bisection: one failing conversion, then the rest converts."""
    import coremltools as ct

    real, calls = ct.convert, []

    def convert(ep, *args, **kwargs):
        names = {str(n.target): n.name for n in ep.graph.nodes if n.op == "call_function"}
        calls.append([str(n.target) for n in ep.graph.nodes if n.op == "call_function"])
        if "aten.gelu.default" in names and "aten.native_layer_norm.default" in names:
            raise ValueError(f'Op "{names["aten.gelu.default"]}" (op_type: gelu): injected')
        return real(ep, *args, **kwargs)

    monkeypatch.setattr(ct, "convert", convert)
    use_plugins("handoff_coreml.plugin", "handoff_xnnpack.plugin")
    model = Block().eval()
    result = handoff.partition(model, (torch.randn(2, 16),), backends=["coreml", "xnnpack"], use_cache=False,
                               options={"coreml": {"precision": "fp32"}}, default_limits=handoff.Limits(1))
    (declined,) = result.report.declined
    assert declined["op"] == "aten.gelu.default" and declined["ran_on"] == "xnnpack"
    assert declined["reasons"]["coreml"] == (
        f"coremltools 9.0 fails to convert aten.gelu.default in this graph: coremltools 9.0 failed to convert group: "
        f"ValueError: Op \"{declined['node']}\" (op_type: gelu): injected")
    # the whole group (fails), the group without the GELU (converts), then the two partitions the
    # plan makes of it; bisection would have converted prefixes holding the GELU again
    assert [sum(t == "aten.gelu.default" for t in c) for c in calls] == [1, 0, 0, 0]
    _run_with_reference(use_plugins, result, model, [((2, 16), "float32")], "float32")


class GatedSteps(nn.Module):
    """Two GRU-like steps reading slices of one input projection: ``gi[:, t, :4]`` and
    ``gi[:, t, 4:]`` are each a ``select`` of the same step in torch, which MIL's common-
    subexpression elimination merges into one op carrying one of their debug handles."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        gi = self.proj(x)
        h = torch.tanh(gi[:, 0, :4])
        for t in range(2):
            h = torch.sigmoid(gi[:, t, :4] + h) * torch.tanh(gi[:, t, 4:])
        return h


def test_ops_merged_by_common_subexpression_elimination_are_accounted_for(use_plugins):
    """A ``select`` identical to an earlier one is computed by the op MIL kept: the whole graph
    converts as one partition in one conversion (it used to be declined select by select, by
    bisection: hours on zoo:bandwidth_gru), and computes what eager computes."""
    from handoff_coreml.compiler import CoreMLCompiler

    real, calls = CoreMLCompiler.lower_unchecked, []

    def lower(self, ep, name):
        calls.append(name)
        return real(self, ep, name)

    use_plugins("handoff_coreml.plugin", "handoff_xnnpack.plugin")
    model = GatedSteps().eval()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CoreMLCompiler, "lower_unchecked", lower)
        result = handoff.partition(model, (torch.randn(1, 2, 8),), backends=["coreml"], use_cache=False,
                                   options={"coreml": {"precision": "fp32"}})
    assert result.report.declined == [] and result.report.coverage("coreml") == 100.0
    assert result.report.stats["coreml"].partitions == 1 and len(calls) == 1
    assert result.report.stats["coreml"].ops["aten.select.int"] == 5
    _run_with_reference(use_plugins, result, model, [((1, 2, 8), "float32")], "float32")


def test_partition_cli_is_quiet(tmp_path, handoff_home):
    """No coremltools log lines, warnings or progress bars on the terminal."""
    env = {**os.environ, "HANDOFF_PLUGINS": "handoff_coreml.plugin", "HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1",
           "HANDOFF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "m.hof"
    proc = subprocess.run([str(Path(sys.executable).parent / "handoff"), "partition", "zoo:small_cnn", "--backends",
                           "coreml", "-o", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    for noise in ("Running MIL", "Converting PyTorch", "Failed to load", "has not been tested", "passes/s",
                  "coremltools", "scikit-learn"):
        assert noise not in proc.stderr, proc.stderr


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HANDOFF_PLUGINS": "handoff_coreml.plugin,handoff_xnnpack.plugin",
           "HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1", "HANDOFF_HOME": str(home),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([str(Path(sys.executable).parent / "handoff"), *args], env=env, capture_output=True,
                          text=True)


def test_cnn_for_coreml_and_xnnpack_on_linux(tmp_path, monkeypatch, use_plugins):
    """The command users quote first, on Linux: ``partition --backends coreml,xnnpack`` writes a
    program whose Core ML delegate cannot run here, and ``run`` says so in one line naming the
    backend and the reason; with ``--fallback-copies`` every Core ML delegate carries a tvm copy of
    its partition, the report shows what the copies cost, and the program runs end to end through
    the copies (one warning naming coreml and the reason) within 1e-4 relative of eager."""
    plain, copied = tmp_path / "plain.hof", tmp_path / "copied.hof"
    made = _cli("partition", "zoo:small_cnn", "--backends", "coreml,xnnpack", "-o", str(plain), home=tmp_path)
    assert made.returncode == 0, made.stderr
    ran = _cli("run", str(plain), home=tmp_path)
    assert ran.returncode != 0
    (line,) = ran.stderr.strip().splitlines()
    assert line.endswith(f"backend 'coreml' cannot run here: {NOT_APPLE}"), ran.stderr
    made = _cli("partition", "zoo:small_cnn", "--backends", "coreml,xnnpack", "--fallback-copies", "-o", str(copied),
                home=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "fallback copies: 1 of 1 vendor delegate(s) carry a tvm copy (coreml +" in made.stdout, made.stdout
    inspected = _cli("inspect", "--json", str(copied), home=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    delegates = [d for d in json.loads(inspected.stdout)["delegates"] if d["backend"] == "coreml"]
    assert delegates and all([c["backend"] for c in d["fallbacks"]] == ["tvm"] for d in delegates), delegates
    ran = _cli("run", str(copied), home=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "backend 'coreml'" in ran.stderr and NOT_APPLE in ran.stderr, ran.stderr
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))  # the key the CLI signed the program with
    use_plugins("handoff_coreml.plugin", "handoff_xnnpack.plugin")
    zoo = handoff.get_plugins().zoo()["small_cnn"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = handoff.load(str(copied))
    with program:
        assert [str(w.message) for w in caught if NOT_APPLE in str(w.message)], [str(w.message) for w in caught]
        check_against_eager(program, zoo.build(), zoo.inputs, dtype="float32")
        stats = [d for d in program.stats()["delegates"] if d["backend"] == "coreml"]
    assert [(d["copy"], d["runtime"], d["fallback_reason"]) for d in stats] == [(0, "tvm", f"backend 'coreml' cannot run here: {NOT_APPLE}")] * len(delegates)
