"""handoff-qnn end to end: real QNN context binaries compiled by onnxruntime-qnn 2.7.0 (QNN SDK
2.51) and run on its HTP emulator, compared with eager torch on fresh random inputs.

Tolerances: fp32 outputs within 1e-4 relative of eager, fp16 (``precision=fp16``) within 1e-2
(rtol, plus an absolute floor of tol x the output's largest magnitude for entries near zero).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime_qnn")

import handoff  # noqa: E402
from handoff import testing  # noqa: E402
from handoff_qnn import _format, _ort  # noqa: E402
from handoff_qnn.compiler import QnnCompiler  # noqa: E402
from handoff_qnn.runtime import QnnRuntime  # noqa: E402

pytestmark = pytest.mark.slow
DTYPE = {"fp32": "float32", "fp16": "float16"}  # the tolerance class of each precision
FP16 = {"precision": "fp16", "soc_model": "SM8650"}
PLUGIN_DIR = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def assert_matches_eager(got: np.ndarray, want: torch.Tensor, precision: str = "fp32") -> None:
    testing.assert_matches_eager(got, want, DTYPE[precision])


def _run_against_eager(result: handoff.PartitionResult, model: torch.nn.Module, specs, precision: str) -> None:
    testing.check_against_eager(result.to_bytes(), model, specs, dtype=DTYPE[precision])


def _zoo(name: str):
    z = handoff.get_plugins().zoo()[name]
    return z, z.build()


# -- the plugin module and options ---------------------------------------------------------------
def test_plugin_declares_qnn():
    """(That the plugin and runtime modules import neither torch nor ONNX Runtime is the
    conformance suite's contract[imports] check: test_conformance.py.)"""
    import handoff_qnn.plugin

    (spec,) = handoff_qnn.plugin.handoff_backends()
    assert (spec.id, spec.device) == ("qnn", "npu"), spec


def test_options_are_checked_with_the_valid_values(qnn_plugins):
    """Values are parsed by the core from the typed options (one line naming the backend); the
    compiler checks the combinations."""
    def compiler(**options):
        return qnn_plugins.compiler("qnn", options)

    with pytest.raises(handoff.HandoffError, match=r"precision=fp16 needs soc_model.*valid values: .*SM8650"):
        compiler(precision="fp16")
    with pytest.raises(handoff.HandoffError, match=r"soc_model=SM8350 has HTP v68, which has no fp16"):
        compiler(precision="fp16", soc_model="SM8350")
    with pytest.raises(handoff.HandoffError, match=r"soc_model=SM8650 makes QNN run float32 graphs with fp16"):
        compiler(soc_model="SM8650")
    with pytest.raises(handoff.HandoffError, match=r"^backend 'qnn': option htp_arch='99' is not valid; valid values: "
                                                   r"68, 69, 73, 75, 79, 81$"):
        compiler(htp_arch="99")
    with pytest.raises(handoff.HandoffError, match=r"htp_arch=73 contradicts soc_model=SM8650"):
        compiler(htp_arch="73", **FP16)
    with pytest.raises(handoff.HandoffError, match=r"precision='bf16' is not valid; valid values: fp32, fp16"):
        compiler(precision="bf16")
    target = compiler(soc_model="57", precision="fp16").target
    assert (target.soc_name, target.soc_model, target.htp_arch) == ("SM8650", 57, 75)
    with pytest.raises(handoff.HandoffError, match=r"has no runtime option 'precision' \('precision' is a compile "
                                                   r"option\); valid runtime options: htp_performance_mode"):
        qnn_plugins.parse_options("qnn", {"precision": "fp16"}, runtime=True)
    with pytest.raises(handoff.HandoffError, match=r"htp_performance_mode='warp' is not valid; valid values: default, burst"):
        qnn_plugins.parse_options("qnn", {"htp_performance_mode": "warp"}, runtime=True)
    parsed = qnn_plugins.parse_options("qnn", {"htp_performance_mode": "burst"}, runtime=True)
    assert _format.runtime_options(parsed) == {"htp_performance_mode": "burst"}


def test_container_round_trip_and_damage():
    blob = _format.pack({"qnn_sdk_version": "2.51.0"}, ("m_ctx.onnx", b"model"), [("m_ctx_qnn.bin", b"\1" * 100)])
    c = _format.unpack(memoryview(blob))
    assert c.header["qnn_sdk_version"] == "2.51.0" and c.header["align"] == 64
    assert (c.epcontext_model[0], bytes(c.epcontext_model[1])) == ("m_ctx.onnx", b"model")
    assert [(n, bytes(d)) for n, d in c.context_binaries] == [("m_ctx_qnn.bin", b"\1" * 100)]
    with pytest.raises(ValueError, match="not a qnn delegate blob"):
        _format.unpack(b"XXXXXXXX" + blob[8:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _format.unpack(blob[:-10])
    future = bytearray(blob)
    future[8] = 99
    with pytest.raises(ValueError, match="format 99 is newer than this runtime reads"):
        _format.unpack(bytes(future))
    with pytest.raises(ValueError, match="not a plain file name"):
        _format.pack({}, ("../evil.onnx", b""), [("x.bin", b"")])


# -- zoo models ----------------------------------------------------------------------------------
def test_small_cnn_fp32_all_on_qnn(qnn_plugins):
    z, model = _zoo("small_cnn")
    result = handoff.partition("zoo:small_cnn", backends=["qnn"])
    assert result.report.coverage("qnn") == 100.0
    assert result.report.stats["qnn"].partitions == 1
    _run_against_eager(result, model, z.inputs, "fp32")


@pytest.fixture(scope="module")
def small_transformer_fp32(handoff_home):
    """zoo:small_transformer partitioned with qnn alone (fp32) once, for the two tests that check
    it: the PartitionResult and each in-context search it made (compiler, program, nodes, answer,
    and how many ONNX exports that search made). No cache, so the searches run here."""
    from handoff_qnn import compiler as qc

    calls, exports = [], []
    real_check, real_to_onnx = QnnCompiler.check_partition, qc.to_onnx

    def record(self, ep, nodes):
        before = len(exports)
        answer = real_check(self, ep, nodes)
        calls.append((self, ep, list(nodes), answer, len(exports) - before))
        return answer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HANDOFF_HOME", str(handoff_home))
        mp.setattr(QnnCompiler, "check_partition", record)
        mp.setattr(qc, "to_onnx", lambda *a, **k: exports.append(1) or real_to_onnx(*a, **k))
        pm = testing.register_plugins("handoff_qnn.plugin")
        result = handoff.partition("zoo:small_transformer", backends=["qnn"], use_cache=False, plugins=pm)
    return result, calls


def test_small_transformer_fp32_declines_with_reasons(qnn_plugins, small_transformer_fp32):
    z, model = _zoo("small_transformer")
    result, _ = small_transformer_fp32
    report = result.report
    reasons = {d["op"]: d["reasons"].get("qnn", "") for d in report.declined}
    # HTP has no fp32 GELU and an fp16-accurate LayerNorm: both go to TVM, with the reason.
    assert "no fp32 kernel for aten.gelu.default" in reasons["aten.gelu.default"]
    assert "reduced precision" in reasons["aten.native_layer_norm.default"]
    # softmax(q k^T / 8) @ v fails to finalize in fp32 although each op compiles alone.
    assert "fails to compile aten.bmm.default in this graph" in reasons["aten.bmm.default"]
    assert report.coverage("qnn") > 85.0 and not report.moves
    _run_against_eager(result, model, z.inputs, "fp32")


@pytest.mark.parametrize("name", ["small_cnn", "small_transformer"])
def test_zoo_model_fp16_all_on_qnn(qnn_plugins, name):
    z, model = _zoo(name)
    result = handoff.partition(f"zoo:{name}", backends=["qnn"], options={"qnn": FP16})
    assert result.report.coverage("qnn") == 100.0
    with handoff.load(result.to_bytes()) as program:
        (meta,) = [d["metadata"] for d in program.manifest["delegates"]]
    assert (meta["precision"], meta["soc_model"], meta["htp_arch"]) == ("fp16", "SM8650", 75)
    assert meta["qnn_sdk_version"] == _ort.versions()["qnn_sdk_version"]
    _run_against_eager(result, model, z.inputs, "fp16")


def test_mixed_program_with_xnnpack(use_plugins):
    if importlib.util.find_spec("handoff_xnnpack") is None:
        xnnpack_dir = PLUGIN_DIR.parent / "xnnpack"
        if (xnnpack_dir / "handoff_xnnpack").is_dir():
            sys.path.insert(0, str(xnnpack_dir))
    try:
        import handoff_xnnpack.plugin  # noqa: F401
    except Exception as exc:  # being written concurrently, or executorch missing
        pytest.skip(f"handoff_xnnpack not importable: {exc}")
    use_plugins("handoff_qnn.plugin", "handoff_xnnpack.plugin")
    z, model = _zoo("small_transformer")
    result = handoff.partition("zoo:small_transformer", backends=["qnn", "xnnpack"])
    stats = result.report.stats
    # qnn first; xnnpack takes the GELUs and MatMuls QNN's fp32 path declines (and TVM the LayerNorms).
    assert stats["qnn"].nodes > 0 and stats["xnnpack"].nodes > 0 and stats["aten"].nodes == 0
    _run_against_eager(result, model, z.inputs, "fp32")


# -- declines, failures, refusals --------------------------------------------------------------
class WithErf(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return torch.erf(y) + y


def test_declined_op_reason_in_report(qnn_plugins):
    torch.manual_seed(0)
    model = WithErf().eval()
    # min size 1: a one-node QNN island would otherwise join TVM's partition (which takes it too)
    result = handoff.partition(model, (torch.randn(4, 16),), backends=["qnn"], default_limits=handoff.Limits(1))
    (declined,) = [d for d in result.report.declined if d["op"] == "aten.erf.default"]
    assert declined["reasons"]["qnn"].startswith("QNN HTP has no kernel for aten.erf.default")
    assert declined["ran_on"] == "tvm"
    assert result.report.stats["qnn"].nodes == result.report.total_nodes - 1
    with handoff.load(result.to_bytes()) as program:
        for seed in (1, 2):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
            (got,) = program.run([x])
            with torch.no_grad():
                assert_matches_eager(got, model(x))


def test_int64_is_declined_and_why():
    class Counter(torch.nn.Module):
        def forward(self, x, n):
            return x * 2, n + 3

    ep = torch.export.export(Counter(), (torch.randn(3), torch.tensor([2**33]))).run_decompositions()
    reasons = QnnCompiler({"verify": False}).support(ep)
    add = next(n.name for n in ep.graph.nodes if n.target == torch.ops.aten.add.Tensor)
    assert "int64 tensors are not supported on HTP" in reasons[add]
    assert reasons[next(n.name for n in ep.graph.nodes if n.target == torch.ops.aten.mul.Tensor)] is None


def test_lowering_error_names_the_refused_node():
    class Erf(torch.nn.Module):
        def forward(self, x):
            return torch.erf(torch.relu(x))

    ep = torch.export.export(Erf(), (torch.randn(2, 8),)).run_decompositions()
    with pytest.raises(handoff.LoweringError, match=r"does not take ONNX node .*\(Erf, from FX node erf\).*Erf") as info:
        QnnCompiler({}).lower_unchecked(ep, "p")
    assert info.value.node == "erf"
    with pytest.raises(handoff.LoweringError, match="QNN HTP has no kernel for aten.erf.default") as info:
        QnnCompiler({}).preprocess(ep, "p")
    assert info.value.node == "erf"


def test_onnx_cut_computes_what_the_fx_cut_computes():
    """check_partition's search cuts sub-lists out of the group's one ONNX export (_OnnxCut)
    instead of exporting each: a prefix, a middle run and a group with a hole give ONNX models
    whose inputs and outputs are the FX cut's (weight-only values folded away) and whose outputs,
    run by ONNX Runtime's CPU EP on the eager values flowing in, are the eager values."""
    import onnxruntime

    from handoff_qnn.compiler import _CONSTANT, _EMPTY, _OnnxCut, to_onnx

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return torch.tanh(torch.sigmoid(self.b(h)) * h + x) - h

    torch.manual_seed(0)
    ep = torch.export.export(Net().eval(), (torch.randn(2, 8),)).run_decompositions()
    group = [n.name for n in ep.graph.nodes if n.op == "call_function"]
    whole = to_onnx(handoff.extract_partition(ep, group)[0])
    values = {}  # every FX value of the program on a fresh input, by node name

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    x = torch.randn(2, 8)
    with torch.no_grad():
        Keep(ep.module()).run(x)
    values[whole.graph.input[0].name] = x  # the group's one graph input is the model's input
    cut = _OnnxCut(whole, ep, group)
    hole = [n for n in group if n != "addmm_1"]
    for names in (group[:3], group[2:6], hole):
        model = cut.model(names)
        _, fx_inputs, fx_outputs = handoff.extract_partition(ep, names)
        assert {i.name for i in model.graph.input} - {"x", whole.graph.input[0].name} == \
            {n.name for n in fx_inputs} - {"x"}
        weights_only = {"permute", "permute_1"}  # folded into initializers by the exporter
        assert {o.name for o in model.graph.output} == {n.name for n in fx_outputs} - weights_only
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {i.name: values[i.name].numpy() for i in model.graph.input}
        for out, got in zip(model.graph.output, session.run(None, feeds)):
            assert_matches_eager(got, values[out.name])
    assert cut.model(["permute"]) is _EMPTY  # a weight transpose: folded, nothing left to compile
    assert cut.model([]) is _EMPTY and _CONSTANT is not _EMPTY


def test_in_context_search_exports_the_group_once(qnn_plugins, small_transformer_fp32, monkeypatch):
    """The in-context search on small_transformer (bmm fails to finalize after softmax) declines
    the same nodes whether each candidate is cut out of the group's one export or exported on
    its own (bmm_1 has no ONNX node of its own: its view -> bmm -> view chain is one MatMul recorded
    as view_8, and a cut splitting it is exported instead; cutting it blamed view_8). Exports: the
    group, the rest, and only candidates that split a fused node; never more than one per check
    (this search is short: 7 either way; the bandwidth GRU's 683-node group is where it pays)."""
    from handoff_qnn import compiler as qc

    _, calls = small_transformer_fp32  # the partition's own searches (cut), with the exports each made
    compiler, ep, nodes, cut, cut_exports = calls[0]
    exports = []
    real_to_onnx = qc.to_onnx
    monkeypatch.setattr(qc, "to_onnx", lambda *a, **k: exports.append(1) or real_to_onnx(*a, **k))
    monkeypatch.setattr(qc, "_OnnxCut", lambda *a: None)
    one_by_one = compiler.check_partition(ep, nodes)
    assert cut == one_by_one and any("aten.bmm.default in this graph" in r for r in cut.values())
    assert cut_exports <= len(exports)


def test_claimed_partition_that_fails_falls_back(qnn_plugins):
    """With the in-context check off, the table alone claims bmm(x / 8, v), which QNN's fp32 path
    fails to finalize; --on-lower-error fallback moves it to TVM with QNN's message."""

    class Scaled(torch.nn.Module):
        def forward(self, q, v):
            return torch.bmm(q / 8.0, v)

    q, v = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    with pytest.raises(handoff.HandoffError, match=r"backend 'qnn' failed to lower .*Failed to finalize QNN graph"):
        handoff.partition(Scaled(), (q, v), backends=["qnn"], options={"qnn": {"verify": "off"}})
    result = handoff.partition(Scaled(), (q, v), backends=["qnn"], options={"qnn": {"verify": "off"}},
                               on_lower_error="fallback")
    (move,) = result.report.moves
    assert move["backend"] == "qnn" and "Failed to finalize QNN graph" in move["reason"]
    # The in-context check (default) declines the culprit up front instead (min size 1: the
    # one-node QNN partition left would otherwise join TVM's).
    result = handoff.partition(Scaled(), (q, v), backends=["qnn"], default_limits=handoff.Limits(1))
    assert not result.report.moves and result.report.stats["qnn"].nodes == 1
    with handoff.load(result.to_bytes()) as program:
        (got,) = program.run([q, v])
    assert_matches_eager(got, Scaled()(q, v))


def test_missing_runtime_is_refused_with_the_fix(qnn_plugins, monkeypatch):
    result = handoff.partition("zoo:small_cnn", backends=["qnn"])
    data = result.to_bytes()
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # `import onnxruntime_qnn` now fails
    ok, why = QnnRuntime().is_available()
    assert not ok and "pip install onnxruntime-qnn==2.7.0" in why
    with pytest.raises(handoff.HandoffError, match=r"backend 'qnn' cannot run here: onnxruntime-qnn not installed"):
        handoff.load(data)


def test_missing_htp_library_is_reported(monkeypatch):
    monkeypatch.setattr(_ort, "htp_library", lambda: "/nonexistent/libQnnHtp.so")
    ok, why = QnnRuntime().is_available()
    assert not ok and "libQnnHtp.so is missing" in why


def test_version_mismatch_is_refused(qnn_plugins, monkeypatch):
    result = handoff.partition("zoo:small_cnn", backends=["qnn"])
    data = result.to_bytes()
    real = _ort.versions()
    monkeypatch.setattr(_ort, "versions", lambda: {**real, "qnn_sdk_version": "2.44.0", "onnxruntime_qnn": "2.3.0"})
    with pytest.raises(handoff.HandoffError, match=r"compiled with QNN SDK 2\.51\.0 \(onnxruntime-qnn 2\.7\.0\); "
                                                   r"this runtime has QNN SDK 2\.44\.0 .*install onnxruntime-qnn==2\.7\.0"):
        handoff.load(data)


def test_load_uses_the_context_binary_and_leaves_no_files(qnn_plugins, tmp_path, monkeypatch):
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, 3, 16, 16)
    ep = torch.export.export(net, (x,)).run_decompositions()
    lowered = QnnCompiler({}).preprocess(ep, "net")
    container = _format.unpack(lowered.blob)
    ctx_name, ctx = container.epcontext_model
    assert b"EPContext" in bytes(ctx) and container.context_binaries[0][0].endswith("_qnn.bin")
    assert lowered.metadata["context_binary_bytes"] > 0 and lowered.metadata["inputs"][0]["shape"] == [1, 3, 16, 16]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runtime = QnnRuntime()
    handle = runtime.load(memoryview(lowered.blob), lowered.metadata, {"htp_performance_mode": "burst"})
    assert list(tmp_path.iterdir()) == []  # the context binary's temporary copy is gone after load
    (got,) = runtime.execute(handle, [x.numpy()])
    assert_matches_eager(got, net(x))
    with pytest.raises(ValueError, match=r"input 0 \(x\) must be float32\[1, 3, 16, 16\]"):
        runtime.execute(handle, [np.zeros((1, 3, 8, 8), np.float32)])
    runtime.release(handle)


def test_cli_partition_and_run(tmp_path, handoff_home):
    env = {**os.environ, "HANDOFF_HOME": str(handoff_home), "HANDOFF_PLUGINS": "handoff_qnn.plugin",
           "HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(PLUGIN_DIR), "COLUMNS": "200"}
    out = tmp_path / "q.hof"
    handoff_cli = [str(VENV_BIN / "handoff")] if (VENV_BIN / "handoff").exists() else [sys.executable, "-m", "handoff.cli"]
    part = subprocess.run([*handoff_cli, "partition", "zoo:small_cnn", "--backends", "qnn", "-o", str(out)],
                          env=env, capture_output=True, text=True)
    assert part.returncode == 0, part.stderr
    assert "100.0%" in part.stdout and out.exists()
    run = subprocess.run([*handoff_cli, "run", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "output_0: float32[1, 10]" in run.stdout and "LIBNATIVE" not in run.stdout


def test_qnn_and_a_cffi_user_share_a_process(qnn_plugins, tmp_path):
    """libQnnHtp.so exports its own libffi; cffi users loaded later (wgpu, for the vulkan backend)
    must still be able to make callbacks. Run in a fresh process: cffi binds its libffi once."""
    cffi = pytest.importorskip("cffi")
    del cffi
    path = tmp_path / "cnn.hof"
    handoff.partition("zoo:small_cnn", backends=["qnn"], fallback=False).write(str(path))
    code = textwrap.dedent(f"""
        import numpy as np, handoff
        from handoff import plugins
        pm = plugins.Plugins(autoload=False, extra=["handoff_qnn.plugin"])
        with handoff.load({str(path)!r}, plugins=pm) as program:
            program.run([np.zeros((1, 3, 64, 64), np.float32)])
        import cffi
        assert cffi.FFI().callback("int(int)", lambda x: x + 1)(1) == 2
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_in_context_search_declines_no_node_on_a_cut_failure_alone(qnn_plugins, monkeypatch):
    """zoo:langid's second attention group (35 nodes): its export fails (bmm_3 fails to finalize
    on the HTP emulator), but every prefix cut out of that export passes, the one holding bmm_3
    included, so trusting the cuts blames add_3, the group's last node. One export per candidate
    declines only bmm_3; so must the cut search (the rest the cuts leave fails as an export, so
    it searches again, exporting the passing prefix behind each node before declining it)."""
    results = []
    real_check = QnnCompiler.check_partition

    def record(self, ep, nodes):
        results.append((list(nodes), real_check(self, ep, nodes)))
        return results[-1][1]

    monkeypatch.setattr(QnnCompiler, "check_partition", record)
    # partitioned and lowered in full: no other test lowers langid's qnn partitions, and the ones
    # this search settles on must compile
    handoff.partition("zoo:langid", backends=["qnn"], use_cache=False)
    group = [declined for nodes, declined in results if "bmm_3" in nodes and "add_3" in nodes]
    assert len(group) == 1 and sorted(group[0]) == ["bmm_3"], group
    assert "aten.bmm.default in this graph" in group[0]["bmm_3"]
