"""handoff-vulkan: TVM-generated WGSL kernels run through wgpu on a Vulkan adapter.

CI runs them on lavapipe (Mesa's CPU Vulkan driver, ``apt-get install mesa-vulkan-drivers
libvulkan1``); every model is compared with eager torch on fresh random inputs. Tolerance for
float32 outputs: 1e-4 relative, plus an absolute floor of 1e-4 x the output's largest magnitude
for entries near zero (as in the core's end-to-end tests).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1]

np = pytest.importorskip("numpy")
pytest.importorskip("handoff.backend")

import handoff  # noqa: E402
from handoff.testing import assert_matches_eager, check_against_eager  # noqa: E402
from handoff_vulkan import _format, wgsl  # noqa: E402
from handoff_vulkan._format import OPTIONS, RUNTIME_OPTIONS  # noqa: E402


def runtime_options(**raw: str) -> dict:
    """Runtime options as the core hands them to ``load``: parsed, defaults filled in."""
    return {name: option.parse(name, raw.get(name)) for name, option in RUNTIME_OPTIONS.items()}


PLUGIN = "handoff_vulkan.plugin"


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _vulkan(isolated_plugins, use_plugins):
    """Every test starts with the core's built-ins and this plugin registered (tests/conftest.py
    isolates them from the installed plugins)."""
    return use_plugins(PLUGIN)


def _needs_gpu() -> None:
    from handoff_vulkan.runtime import VulkanRuntime

    ok, why = VulkanRuntime().is_available()
    if not ok:
        pytest.skip(why)


def _needs_compiler():
    pytest.importorskip("torch")
    pytest.importorskip("tvm")


_PARTITIONED: dict[tuple[str, tuple[str, ...]], bytes] = {}


def _zoo_program(name: str, backends: tuple[str, ...], home: Path) -> tuple[bytes, object]:
    """Partition a zoo model once per session (its own HANDOFF_HOME); the program bytes and report."""
    key = (name, backends)
    if key not in _PARTITIONED:
        old = os.environ.get("HANDOFF_HOME")
        os.environ["HANDOFF_HOME"] = str(home)
        try:
            result = handoff.partition(f"zoo:{name}", backends=list(backends))
        finally:
            if old is None:
                del os.environ["HANDOFF_HOME"]
            else:
                os.environ["HANDOFF_HOME"] = old
        _PARTITIONED[key] = (result.to_bytes(), result.report)
    return _PARTITIONED[key]


def _weights_only_dispatches(header: dict) -> list[str]:
    """Kernels of the launch plan dispatched on weights alone: they would compute the same
    values every run (TVM's FoldConstant computes them when lowering)."""
    kinds = [b["kind"] for b in header["buffers"]]
    found = []
    for d in header["dispatches"]:
        kernel = header["kernels"][int(d["kernel"])]
        read = [kinds[b] for (b, _, _), access in zip(d["buffers"], kernel["bindings"]) if access != "read_write"]
        if read and all(kind == "weight" for kind in read):
            found.append(kernel["name"])
    return found


def _check_against_eager(program_bytes: bytes, name: str, seeds=(11, 12)) -> None:
    zoo = handoff.get_plugins().zoo()[name]
    check_against_eager(program_bytes, zoo.build(), zoo.inputs, seeds)


# -- the plugin module and the blob format (no GPU, no compiler) -----------------------------------
def test_plugin_declares_the_backend():
    """(That the plugin and runtime modules import neither torch, TVM nor wgpu is the conformance
    suite's contract[imports] check: test_conformance.py.)"""
    plugin = importlib.import_module(PLUGIN)
    (spec,) = plugin.handoff_backends()
    assert (spec.id, spec.device) == ("vulkan", "gpu"), spec
    assert spec.compiler == "handoff_vulkan.compiler:VulkanCompiler"
    assert spec.runtime == "handoff_vulkan.runtime:VulkanRuntime"
    assert set(spec.options) == {"fuse", "max_storage_buffers", "max_storage_buffer_binding_size"}
    assert set(spec.runtime_options) == {"adapter", "timestamps", "first_submit", "load_threads"}
    assert spec.options["max_storage_buffers"].default == 8
    assert spec.options["max_storage_buffer_binding_size"].default == 128 << 20  # WebGPU's guaranteed limit


def test_blob_round_trip_and_refusals():
    header = {"kernels": [], "dispatches": [], "buffers": [], "inputs": [], "outputs": [], "limits": {}}
    data = b"\x01\x02\x03\x04" * 100
    blob = _format.pack(header, data)
    got, view = _format.unpack(memoryview(blob))
    assert bytes(view) == data and got["align"] == _format.DATA_ALIGN
    assert (len(blob) - len(data)) % _format.DATA_ALIGN == 0  # the data section starts aligned
    with pytest.raises(ValueError, match=r"^not a vulkan delegate blob \(magic "):
        _format.unpack(b"PK\x03\x04" + blob[4:])
    newer = bytearray(blob)
    newer[8:12] = (_format.FORMAT_VERSION + 1).to_bytes(4, "little")
    with pytest.raises(ValueError, match="re-partition with the installed one"):
        _format.unpack(bytes(newer))
    with pytest.raises(ValueError, match="truncated"):
        _format.unpack(blob[:-10])


@pytest.mark.parametrize("x, want", [(1, (1, 1, 1)), (65535, (65535, 1, 1)), (65536, (32768, 1, 2)),
                                      (70001, (35001, 1, 2)), (200001, (50001, 1, 4))])
def test_wide_grids_fold_into_z_like_tvm_web_runtime(x, want):
    folded = _format.fold_grid(x, 3)
    assert (folded[0], folded[2]) == (want[0], want[2]) and folded[1] == 3
    assert folded[0] * folded[2] >= x and folded[0] <= 65535
    with pytest.raises(ValueError, match="grid y"):
        _format.fold_grid(1, 70000)


def test_uniform_layout():
    raw = _format.uniform_bytes([["i32", -2], ["f32", 0.5]], 7)
    assert len(raw) == 16
    assert np.frombuffer(raw[:4], "<i4")[0] == -2 and np.frombuffer(raw[4:8], "<f4")[0] == 0.5
    assert np.frombuffer(raw[8:12], "<u4")[0] == 7


KERNEL = """\
@group(0) @binding(0) var<storage, read_write> out_ptr : array<f32>;
@group(0) @binding(1) var<storage, read> x_ptr : array<f32>;

struct PODArgs {
  n: i32,
  packGridDimX: u32
}
@group(0) @binding(2) var<uniform> podArgs : PODArgs;

@compute @workgroup_size(64, 1, 1)
fn k_kernel(
  @builtin(workgroup_id) blockIdx : vec3<u32>,
  @builtin(num_workgroups) gridDim : vec3<u32>,
  @builtin(local_invocation_id) threadIdx : vec3<u32>
) {
  if (blockIdx.z * gridDim.x + blockIdx.x > podArgs.packGridDimX) { return; }
  out_ptr[0] = max(x_ptr[0], -inff) + select(0.0f, nanf, x_ptr[1] > inff);
}
"""


def test_wgsl_fixes_and_interface():
    fixed = wgsl.fix(KERNEL)
    assert "inff" not in fixed and "nanf" not in fixed
    assert "-bitcast<f32>(handoff_inf_bits)" in fixed and "bitcast<f32>(handoff_nan_bits)" in fixed
    assert "var<private> handoff_inf_bits : u32 = 0x7f800000u;" in fixed
    # the block numbered exactly the logical grid size exists once a grid is folded: it must return
    assert "blockIdx.x >= podArgs.packGridDimX) { return; }" in fixed
    iface = wgsl.interface(fixed)
    assert iface.entry == "k_kernel" and iface.workgroup_size == (64, 1, 1)
    assert iface.storage == [("read_write", "f32"), ("read", "f32")] and iface.pods == ["i32"]
    for bad in ("array<i64>", "array<bool>", "array<i8>"):
        with pytest.raises(wgsl.WgslError, match="cannot"):
            wgsl.interface(KERNEL.replace("array<f32>;\n@group(0) @binding(1)", f"{bad};\n@group(0) @binding(1)"))


# -- runtime availability -----------------------------------------------------------------------
def test_missing_wgpu_is_reported(monkeypatch):
    from handoff_vulkan.runtime import VulkanRuntime

    monkeypatch.setitem(sys.modules, "wgpu", None)  # import wgpu raises ImportError
    ok, why = VulkanRuntime().is_available()
    assert not ok and "wgpu cannot be imported" in why and "pip install wgpu==0.32.0" in why


def test_missing_vulkan_adapter_is_reported(monkeypatch):
    pytest.importorskip("wgpu")
    from handoff_vulkan import runtime

    monkeypatch.setattr(runtime, "vulkan_adapters", lambda wgpu: [])
    ok, why = runtime.VulkanRuntime().is_available()
    assert not ok and "no Vulkan adapter" in why and "mesa-vulkan-drivers libvulkan1" in why


def test_runtime_sets_its_environment_only_when_unset(monkeypatch, tmp_path):
    from handoff_vulkan import runtime

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("WGPU_BACKEND_TYPE", "Vulkan")
    runtime.prepare_environment()
    xdg = Path(os.environ["XDG_RUNTIME_DIR"])
    assert xdg.is_dir() and (xdg.stat().st_mode & 0o777) == 0o700
    # one directory under $HANDOFF_HOME for every process (was a new /tmp/handoff-xdg-* per process)
    assert xdg == Path(os.environ["HANDOFF_HOME"]) / "xdg-runtime"
    assert Path(os.environ["XDG_CACHE_HOME"]).is_relative_to(Path(os.environ["HANDOFF_HOME"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    runtime.prepare_environment()
    assert os.environ["XDG_CACHE_HOME"] == str(tmp_path)


# -- capability and lowering (TVM) ----------------------------------------------------------------
def _export(model, *args):
    import torch

    with torch.no_grad():
        return torch.export.export(model.eval(), args).run_decompositions()


def test_cache_key_covers_handoffs_tvm_importer(monkeypatch, tmp_path):
    """vulkan imports partitions with handoff.tvm's importer (handoff's own converters, such as
    select.int with a negative index): a change there changes vulkan's cache key, so neither the
    lowering cache nor the capability cache answers with what the old importer made (the core
    keys a backend by its own plugin's code only)."""
    _needs_compiler()
    import handoff.tvm
    from handoff_vulkan.compiler import VulkanCompiler

    before = VulkanCompiler({}).cache_key()
    assert json.loads(before)["importer"] == handoff.tvm.importer_digest()
    edited = Path(handoff.tvm.__file__).with_name("importer.py").read_bytes() + b"\n# a converter fixed\n"
    (tmp_path / "importer.py").write_bytes(edited)
    monkeypatch.setattr(handoff.tvm, "__file__", str(tmp_path / "__init__.py"))
    handoff.tvm.importer_digest.cache_clear()
    try:
        assert VulkanCompiler({}).cache_key() != before
    finally:
        monkeypatch.undo()
        handoff.tvm.importer_digest.cache_clear()
    assert VulkanCompiler({}).cache_key() == before


@pytest.mark.slow
def test_capability_reasons_per_node():
    _needs_compiler()
    import torch

    from handoff_vulkan.compiler import VulkanCompiler

    class Mixed(torch.nn.Module):
        def forward(self, x):
            y = torch.relu(x * 2.0)
            return y, torch.argmax(y, dim=1), (y > 0.5).double().sum(dim=1)

    ep = _export(Mixed(), torch.randn(4, 8))
    support = VulkanCompiler({}).support(ep)
    by_op = {n.target.__name__: support[n.name] for n in ep.graph.nodes if n.op == "call_function"}
    assert by_op["relu.default"] is None and by_op["mul.Tensor"] is None
    assert by_op["argmax.default"] == "int64 tensor: WGSL has no 64-bit integers"
    assert by_op["gt.Scalar"] == "bool tensor: a WGSL storage buffer cannot hold bool"
    assert by_op["sum.dim_IntList"] == "float64 tensor: WGSL has no 64-bit floats"
    with pytest.raises(ValueError, match=r"option fuse='2' is not valid; valid values: 1, 0 \(or true/false"):
        OPTIONS["fuse"].parse("fuse", "2")


def test_int8_is_declined_with_a_reason():
    """A PT2E-quantized graph: WGSL has no 8-bit integers, so every quantize/dequantize op (it
    reads or makes int8) is declined with that reason; the float op between them is claimed."""
    _needs_compiler()
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    from handoff_vulkan.compiler import VulkanCompiler

    class QDQ(torch.nn.Module):
        def forward(self, x):
            qd = torch.ops.quantized_decomposed
            x = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, 0.05, 0, -128, 127, torch.int8),
                                         0.05, 0, -128, 127, torch.int8)
            return qd.quantize_per_tensor(torch.relu(x), 0.05, 0, -128, 127, torch.int8)

    ep = _export(QDQ(), torch.randn(4, 8))
    support = VulkanCompiler({}).support(ep)
    by_op = {n.name: support[n.name] for n in ep.graph.nodes if n.op == "call_function"}
    assert {k: v for k, v in by_op.items() if "quantize" in k} == {
        k: "int8 tensor: WGSL has no 8-bit integers" for k in by_op if "quantize" in k}
    assert by_op["relu"] is None



def test_int8_op_table_rows_carry_the_decline_reason(tmp_path, monkeypatch):
    """handoff.testing's int8 one-op samples (dq -> conv/linear/add/relu -> q, 16-bit, per-channel
    activations): vulkan declines each
    with its reason, which reaches the check's rows, and each decline agrees (the blob does not build)."""
    _needs_compiler()
    from handoff.testing import check_op_table, int8_samples

    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path / "home"))
    out = tmp_path / "rows.json"
    assert check_op_table("vulkan", int8_samples(), ["--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(r["verdict"] == "agree" and not r["claimed"] for r in rows), rows
    for r in rows:  # 16-bit activations: "uint16 tensor: WGSL has no 16-bit integers" (or its int8 weight's)
        assert r["reason"] in ("int8 tensor: WGSL has no 8-bit integers", "uint16 tensor: WGSL has no 16-bit integers")
    assert {r["reason"] for r in rows if r["sample"] == "16-bit add"} == {"uint16 tensor: WGSL has no 16-bit integers"}

class _LeavesItUnbound:
    """A schedule rule that 'applies' but binds nothing, as dlight's Transpose sometimes does."""

    def apply(self, func, target, tunable):
        from tvm import s_tir

        return s_tir.Schedule(func)


@pytest.mark.slow
def test_schedule_leaving_blocks_unbound_is_rejected(monkeypatch):
    _needs_compiler()
    from tvm import te
    from tvm.s_tir import dlight as dl

    from handoff_vulkan import _tvm

    a = te.placeholder((64, 32), name="a")
    b = te.compute((32, 64), lambda i, j: a[j, i] * 2.0, name="b")
    func = te.create_prim_func([a, b]).with_attr("target", _tvm.target())
    assert _tvm.unbound_stores(func) == ["b"]  # unscheduled: every store would run on the host
    monkeypatch.setattr(_tvm, "_rules", lambda: [_LeavesItUnbound(), dl.gpu.Fallback()])
    scheduled, why = _tvm.schedule(func, _tvm.target())
    assert scheduled is not None and _tvm.unbound_stores(scheduled) == []
    monkeypatch.setattr(_tvm, "_rules", lambda: [_LeavesItUnbound()])
    scheduled, why = _tvm.schedule(func, _tvm.target())
    assert scheduled is None and "_LeavesItUnbound left block(s) b unbound to GPU threads" in why


@pytest.mark.slow
def test_partitioning_keeps_tvms_native_warnings_off_the_terminal(capfd, handoff_home):
    """TOPI prints a warning on fd 2 for every take it legalizes (``x[:, -1]`` imports as one);
    the support check and lowering legalize under ``handoff.quiet_native``."""
    _needs_compiler()
    import torch

    class Ends(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x[:, -1]) + x[:, 0] * 2

    capfd.readouterr()
    handoff.partition(Ends(), (torch.randn(2, 5, 3),), backends=["vulkan"], use_cache=False)
    err = capfd.readouterr().err
    assert "Fast mode" not in err and "transform.h" not in err, err[-500:]


@pytest.mark.slow
def test_unit_reductions_run_on_vulkan_and_match_eager(monkeypatch):
    """K = 1 reductions (found by the conformance suite's drawn shapes: Linear(1, 1) on [1, 1]):
    dlight drops the unit reduction iterator and inlines the bias add into the init too, adding
    the bias twice. Such functions get _UnitReduction's schedule (init kept, epilogue its own
    kernel) and run on vulkan, matching eager; without that rule dlight's schedule is refused
    (broken_reductions) and the addmm declined with the reason."""
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan import _tvm

    class UnitSum(torch.nn.Module):
        def forward(self, x):
            return x.sum(dim=1) * 2.0 + 1.0

    cases = [(torch.nn.Linear(1, 1), (1, 1)), (torch.nn.Linear(1, 8), (4, 1)),
             (torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU()), (4, 1)),  # two intermediates fused
             (torch.nn.Conv2d(1, 4, 1), (2, 1, 5, 5)), (UnitSum(), (3, 1, 6))]
    for model, shape in cases:
        torch.manual_seed(0)
        model = model.eval()
        result = handoff.partition(model, (torch.randn(shape),), backends=["vulkan"], fallback=False, use_cache=False)
        report = result.report.to_json()
        assert report["declined"] == [], (model, report["declined"])
        check_against_eager(result.to_bytes(), model, [(shape, "float32")])

    from handoff_vulkan.compiler import VulkanCompiler

    rules = _tvm._rules
    monkeypatch.setattr(VulkanCompiler, "_kernel_cache", {})  # kernels checked above under all rules
    monkeypatch.setattr(_tvm, "_rules", lambda: [r for r in rules() if not isinstance(r, _tvm._UnitReduction)])
    model = torch.nn.Linear(1, 1).eval()
    result = handoff.partition(model, (torch.randn(1, 1),), backends=["vulkan"], fallback=False, use_cache=False)
    declined = {d["op"]: d["reasons"]["vulkan"] for d in result.report.to_json()["declined"]}
    assert "inlined an epilogue into the init of unit reduction(s) matmul" in declined["aten.addmm.default"]


@pytest.mark.slow
def test_fp16_convolution_and_linear_run_on_vulkan_and_match_eager(monkeypatch):
    """float16 on vulkan (WGSL f16, the shader-f16 feature; lavapipe has it): handoff's importer
    converters (handoff.tvm.converters) accumulate the convolution and the addmm in float32 and
    round once. With TVM's own converters an fp16 convolution with a bias failed to import and was
    declined. Odd element counts (75 inputs, 5 outputs) check the 4-byte padding of f16 writes.
    An adapter without shader-f16 refuses the delegate, naming the fix."""
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan import runtime

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                                torch.nn.Flatten(), torch.nn.Linear(36, 5)).half().eval()
    shape = (1, 3, 5, 5)
    result = handoff.partition(model, (torch.randn(shape, dtype=torch.float16),), backends=["vulkan"],
                               fallback=False, use_cache=False)
    report = result.report.to_json()
    assert report["declined"] == [], report["declined"]
    ops = result.report.stats["vulkan"].ops
    assert ops["aten.convolution.default"] == 2 and ops["aten.addmm.default"] == 1, ops
    outputs = check_against_eager(result.to_bytes(), model, [(shape, "float16")], dtype="float16")
    assert outputs[0].dtype == np.float16

    monkeypatch.setattr(runtime, "_F16", "shader-f16 (absent here)")  # as on an adapter without it
    with pytest.raises(handoff.HandoffError, match=r"computes in float16 .* has no shader-f16 \(absent here\) "
                                                    r"feature; choose another adapter"):
        handoff.load(result.to_bytes())


@pytest.mark.slow
def test_ops_without_a_gpu_schedule_are_declined_and_fall_back(monkeypatch):
    """Only Matmul can schedule here: support() must decline every other op, naming the reason,
    and the partition must put them on tvm."""
    _needs_compiler()
    _needs_gpu()
    import torch
    from tvm.s_tir import dlight as dl

    from handoff_vulkan import _tvm
    from handoff_vulkan.compiler import VulkanCompiler

    monkeypatch.setattr(VulkanCompiler, "_kernel_cache", {})
    monkeypatch.setattr(_tvm, "_rules", lambda: [dl.gpu.Matmul()])

    class MatmulTanh(torch.nn.Module):
        def forward(self, x, w):
            return torch.tanh(x @ w) @ w

    model = MatmulTanh()
    x, w = torch.randn(32, 64), torch.randn(64, 64) / 8
    # min size 1: each one-node mm partition would otherwise join TVM's as an island
    result = handoff.partition(model, (x, w), backends=["vulkan"], default_limits=handoff.Limits(1))
    declined = {d["op"]: d["reasons"]["vulkan"] for d in result.report.declined}
    assert "no TVM 0.27 dlight GPU schedule binds every block" in declined["aten.tanh.default"]
    assert result.report.stats["vulkan"].ops == {"aten.mm.default": 2}
    assert result.report.stats["tvm"].ops == {"aten.tanh.default": 1}
    with handoff.load(result.to_bytes()) as program:
        (got,) = program.run([x.numpy(), w.numpy()])
    assert_matches_eager(got, model(x, w))


@pytest.mark.slow
def test_unschedulable_fused_kernel_is_lowered_unfused(monkeypatch):
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan import _tvm
    from handoff_vulkan.compiler import VulkanCompiler

    real = _tvm.schedule_module

    def no_fused(mod, tgt):  # pretend no rule can schedule a fused kernel
        mod, failed = real(mod, tgt)
        failed.update({gv.name_hint: "test" for gv in mod.get_global_vars() if gv.name_hint.startswith("fused_")})
        return mod, failed

    monkeypatch.setattr(_tvm, "schedule_module", no_fused)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    lowered = VulkanCompiler({}).preprocess(_export(model, x), "p0")
    assert lowered.metadata["fused"] is False
    from handoff_vulkan.runtime import VulkanRuntime

    rt = VulkanRuntime()
    handle = rt.load(memoryview(lowered.blob), lowered.metadata, runtime_options())
    try:
        (got,) = rt.to_host(rt.execute(handle, [x.numpy()]))
    finally:
        rt.release(handle)
    with torch.no_grad():
        assert_matches_eager(got, model(x))


@pytest.mark.slow
def test_a_concatenation_over_the_buffer_budget_is_split_into_kernels_within_it():
    """A cat of 12 inputs binds 13 storage buffers, over the default budget of 8 (WebGPU's
    guaranteed per-stage limit): vulkan still claims it and lowers it as a tree of concatenations
    whose every kernel binds at most 8 (torchvision's densenet121 concatenates up to 33 tensors),
    and the program matches eager on fresh inputs. Under a budget of 2, where no concatenation
    fits, the cat is declined with the count and the option and runs on tvm."""
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan.compiler import VulkanCompiler

    class Gather(torch.nn.Module):
        def forward(self, *xs):
            return torch.tanh(torch.cat([x * (i + 1) for i, x in enumerate(xs)], dim=1))

    model = Gather()
    xs = [torch.randn(4, 3) for _ in range(12)]
    result = handoff.partition(model, tuple(xs), backends=["vulkan"])
    assert not result.report.declined and result.report.stats["vulkan"].ops["aten.cat.default"] == 1
    with handoff.load(result.to_bytes()) as program:
        plan, _ = _format.unpack(program.file.segment(program.manifest["delegates"][0]["segment"]))
        assert max(len(k["bindings"]) for k in plan["kernels"]) <= 8
        assert sum(k["name"].startswith("concat") for k in plan["kernels"]) >= 2, [k["name"] for k in plan["kernels"]]
        (got,) = program.run([x.numpy() for x in xs])
        fresh = [torch.randn(4, 3) for _ in xs]
        (again,) = program.run([x.numpy() for x in fresh])
    assert_matches_eager(got, model(*xs))
    assert_matches_eager(again, model(*fresh))
    assert not np.allclose(got, again)

    ep = _export(model, *xs)
    (cat,) = [n for n in ep.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert VulkanCompiler({"max_storage_buffers": 8})._budget_reason(cat) is None
    reason = VulkanCompiler({"max_storage_buffers": 2})._budget_reason(cat)
    assert reason.startswith("its kernel would bind 13 storage buffers (tensor inputs + outputs), over the budget of 2 "
                             "(option vulkan.max_storage_buffers;"), reason
    narrow = handoff.partition(model, tuple(xs), backends=["vulkan"], options={"vulkan": {"max_storage_buffers": "2"}},
                               default_limits=handoff.Limits(1))
    declined = {d["op"]: d["reasons"]["vulkan"] for d in narrow.report.declined}
    assert declined["aten.cat.default"] == reason and narrow.report.stats["tvm"].ops == {"aten.cat.default": 1}
    with handoff.load(narrow.to_bytes()) as program:
        (got,) = program.run([x.numpy() for x in xs])
    assert_matches_eager(got, model(*xs))


@pytest.mark.slow
def test_selects_are_claimed_and_match_eager():
    """``aten.select.int`` (``x[:, -1]``, ``x.select(2, -2)``) imports as a ``take`` of a constant
    index, which handoff's importer makes int32: with an int64 one TVM built no WGSL kernel (no
    64-bit integers) and vulkan declined every select (36 nodes of torchvision's swin_t)."""
    _needs_compiler()
    _needs_gpu()
    import torch

    class Select(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x[:, -1] * 2) + x[:, 1] + x.select(2, -2)[:, None, :1]

    model, x = Select(), torch.randn(2, 3, 4, 5)
    result = handoff.partition(model, (x,), backends=["vulkan"], default_limits=handoff.Limits(1))
    assert not result.report.declined and result.report.stats["vulkan"].ops["aten.select.int"] == 3
    with handoff.load(result.to_bytes()) as program:
        (got,) = program.run([x.numpy()])
        fresh = torch.randn(2, 3, 4, 5)
        (again,) = program.run([fresh.numpy()])
    assert_matches_eager(got, model(x))
    assert_matches_eager(again, model(fresh))
    assert not np.allclose(got, again)


@pytest.mark.slow
def test_a_tensor_over_the_binding_size_budget_is_declined_and_runs_elsewhere(monkeypatch):
    """A node reading or writing a tensor larger than ``max_storage_buffer_binding_size`` (default
    WebGPU's guaranteed 128 MiB; torchvision's AlexNet has a 144 MiB weight, which lavapipe cannot
    bind) is declined with the tensor, its size and the option, runs on tvm, and the program matches
    eager; within a larger budget vulkan claims it. A plan buffer over the budget that no node's
    tensor is (a kernel's scratch) fails the lowering with the option named."""
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan import compiler

    model = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Tanh()).eval()
    x = torch.randn(4, 32)
    small = {"vulkan": {"max_storage_buffer_binding_size": "4096"}}  # the 8 KiB weight is over it
    result = handoff.partition(model, (x,), backends=["vulkan"], options=small, default_limits=handoff.Limits(1))
    declined = {d["op"]: d["reasons"]["vulkan"] for d in result.report.declined}
    # the linear's transposed weight is folded (handoff.fold): the addmm reads it as a constant
    assert set(declined) == {"aten.addmm.default"}, declined
    assert declined["aten.addmm.default"].startswith(
        "its kernel would bind input c_folded_permute, float32[32, 64] (8192 bytes), over the storage-buffer size "
        "budget of 4096 bytes (option vulkan.max_storage_buffer_binding_size;"), declined
    assert result.report.stats["vulkan"].ops == {"aten.tanh.default": 2, "aten.relu.default": 1}
    with handoff.load(result.to_bytes()) as program:
        (got,) = program.run([x.numpy()])
        fresh = torch.randn(4, 32)
        (again,) = program.run([fresh.numpy()])
    with torch.no_grad():
        assert_matches_eager(got, model(x))
        assert_matches_eager(again, model(fresh))
    assert not np.allclose(got, again)

    whole = handoff.partition(model, (x,), backends=["vulkan"])
    assert not whole.report.declined and whole.report.stats["vulkan"].ops["aten.addmm.default"] == 1

    ep = _export(model, x)
    monkeypatch.setattr(compiler, "_bound_tensors", lambda node: [])  # as if no node's own tensor were over it
    with pytest.raises(handoff.LoweringError, match=r"p0: its plan binds a weight buffer of 8192 bytes, over the "
                                                    r"storage-buffer size budget of 4096 bytes \(option "
                                                    r"vulkan.max_storage_buffer_binding_size\)"):
        compiler.VulkanCompiler({"max_storage_buffer_binding_size": 4096}).preprocess(ep, "p0")


def test_an_adapter_below_the_blob_s_limits_names_the_partition_option():
    """The load-time refusal of a blob needing more than the adapter allows says which partition
    option keeps the blob within it."""
    from handoff_vulkan.runtime import _check_limits

    class Device:
        name, limits = "llvmpipe", {"max-storage-buffer-binding-size": 134217728, "max-compute-workgroup-size-x": 256}

    with pytest.raises(ValueError, match=r"^the delegate needs max-storage-buffer-binding-size >= 150994944, adapter "
                                         r"llvmpipe allows 134217728; partition again with --option "
                                         r"vulkan.max_storage_buffer_binding_size=134217728 so that what exceeds it "
                                         r"goes to another backend$"):
        _check_limits({"max_storage_buffer_binding_size": 150994944}, Device())
    with pytest.raises(ValueError, match=r"max-compute-workgroup-size-x >= 512, adapter llvmpipe allows 256$"):
        _check_limits({"max_compute_workgroup_size_x": 512}, Device())


@pytest.mark.slow
def test_fused_group_over_the_buffer_budget_is_split():
    """Each add/mul binds 3 buffers, but FuseOps makes one kernel of the elementwise group reading 8
    inputs (9 buffers): over a budget of 8 that group is split into its ops while the matmul-tanh-add
    group (4 buffers) stays fused; within 16 both stay whole. Under a budget no single op fits,
    preprocess names the node."""
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan.compiler import VulkanCompiler
    from handoff_vulkan.runtime import VulkanRuntime

    class Mix(torch.nn.Module):
        def forward(self, a, b, c, d, e, f, g, h):
            y = (((a + b) * (c + d) + (e - f)) * (g + h)).reshape(8, 8)
            return torch.tanh(y @ y) + a.reshape(8, 8)

    model = Mix()
    args = [torch.randn(64) for _ in range(8)]
    ep = _export(model, *args)
    rt = VulkanRuntime()
    for budget in (8, 16):
        lowered = VulkanCompiler({"max_storage_buffers": budget}).preprocess(ep, "p0")
        plan, _ = _format.unpack(memoryview(lowered.blob))
        names = {k["name"]: len(k["bindings"]) for k in plan["kernels"]}
        assert max(names.values()) <= budget and plan["limits"]["max_storage_buffers_per_shader_stage"] <= budget
        assert any(n.startswith("fused_matmul") for n in names), names  # the small group stays fused
        assert any(n.startswith("fused_add_add_multiply") for n in names) is (budget == 16), names
        handle = rt.load(memoryview(lowered.blob), lowered.metadata, runtime_options())
        try:
            (got,) = rt.to_host(rt.execute(handle, [a.numpy() for a in args]))
        finally:
            rt.release(handle)
        assert_matches_eager(got, model(*args))
    with pytest.raises(handoff.LoweringError, match=r"3 storage buffers.*budget of 2.*vulkan.max_storage_buffers"):
        VulkanCompiler({"max_storage_buffers": 2}).preprocess(ep, "p0")


@pytest.mark.slow
def test_lowering_failure_moves_the_partition_with_on_lower_error_fallback(monkeypatch):
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan import _tvm

    def nothing(mod, tgt):
        return mod, {gv.name_hint: "test: no schedule" for gv in mod.get_global_vars() if gv.name_hint != "main"}

    monkeypatch.setattr(_tvm, "schedule_module", nothing)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    with pytest.raises(handoff.HandoffError, match="backend 'vulkan' failed to lower"):
        handoff.partition(model, (x,), backends=["vulkan"])
    result = handoff.partition(model, (x,), backends=["vulkan"], on_lower_error="fallback")
    assert result.report.coverage("tvm") == 100.0 and "test: no schedule" in result.report.moves[0]["reason"]


# -- end to end on the GPU (lavapipe in CI) ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["small_cnn", "small_transformer"])
def test_zoo_model_on_vulkan_matches_eager(name, tmp_path_factory):
    _needs_compiler()
    _needs_gpu()
    program, report = _zoo_program(name, ("vulkan",), tmp_path_factory.mktemp("home"))
    assert report.coverage("vulkan") == 100.0
    _check_against_eager(program, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small_cnn", "small_transformer"])
def test_zoo_model_on_vulkan_and_xnnpack_matches_eager(name, tmp_path_factory, use_plugins):
    _needs_compiler()
    _needs_gpu()
    try:
        import handoff_xnnpack.plugin  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"handoff_xnnpack not importable: {exc}")
    pm = use_plugins(PLUGIN, "handoff_xnnpack.plugin")
    ok, why = pm.runtime_available("xnnpack")
    if not ok:
        pytest.skip(why)
    program, report = _zoo_program(name, ("vulkan", "xnnpack"), tmp_path_factory.mktemp("home"))
    assert report.coverage("vulkan") + report.coverage("xnnpack") == 100.0
    _check_against_eager(program, name)


def _threaded_runs_match(program, inputs, threads=8, runs=200):
    """``threads`` threads run the program ``runs`` times each, cycling through ``inputs``; every
    result must equal the single-threaded one bit for bit."""
    import threading

    want = [program.run(x) for x in inputs]
    failures: list = []

    def work(k):
        try:
            for i in range(runs):
                j = (k + i) % len(inputs)
                got = program.run(inputs[j])
                if not all(np.array_equal(g, w) for g, w in zip(got, want[j])):
                    failures.append(f"thread {k}, run {i}: differs from the single-threaded result")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(f"thread {k}: {exc!r}")

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures, failures[:3]


def _old_transfers(program) -> int:
    """Values the runtime converted before memory domains: every delegate input and output."""
    return sum(len(i["inputs"]) + len(i["outputs"]) for i in program.manifest["instructions"] if i["op"] == "delegate")


@pytest.mark.slow
def test_transformer_on_vulkan_transfers_only_its_input_and_output_and_runs_from_8_threads(tmp_path_factory):
    _needs_compiler()
    _needs_gpu()
    from handoff.testing import random_inputs

    program_bytes, _ = _zoo_program("small_transformer", ("vulkan",), tmp_path_factory.mktemp("home"))
    zoo = handoff.get_plugins().zoo()["small_transformer"]
    with handoff.load(program_bytes) as program:
        header, _ = _format.unpack(program.file.segment(program.manifest["delegates"][0]["segment"]))
        assert _weights_only_dispatches(header) == []  # folded at compile time (9 transposes of 65 dispatches before)
        check_against_eager(program, zoo.build(), zoo.inputs)
        stats = program.stats()
        assert [d["backend"] for d in stats["delegates"]] == ["vulkan"]  # nothing left for other steps
        assert stats["host_transfers"] == len(program.manifest["inputs"]) + len(program.manifest["outputs"]) == 2
        assert stats["delegates"][0]["memory"].startswith("wgpu:")
        _threaded_runs_match(program, [random_inputs(zoo.inputs, seed=s) for s in range(16)])


@pytest.mark.slow
def test_values_stay_on_the_gpu_between_vulkan_delegates(monkeypatch, tmp_path_factory):
    """The zoo transformer with gelu declined: vulkan, tvm (gelu), vulkan, tvm, vulkan. The
    residual stream goes from each vulkan delegate straight to the next on the GPU; only what
    gelu reads and returns crosses host memory."""
    _needs_compiler()
    _needs_gpu()
    from handoff.testing import random_inputs
    from handoff_vulkan.compiler import VulkanCompiler

    real = VulkanCompiler.support

    def no_gelu(self, ep):
        reasons = dict(real(self, ep))
        reasons.update({n.name: "declined by the test" for n in ep.graph.nodes if "gelu" in str(n.target)})
        return reasons

    monkeypatch.setattr(VulkanCompiler, "support", no_gelu)
    zoo = handoff.get_plugins().zoo()["small_transformer"]
    result = handoff.partition("zoo:small_transformer", backends=["vulkan"])
    with handoff.load(result.to_bytes()) as program:
        check_against_eager(program, zoo.build(), zoo.inputs)
        stats = program.stats()
        assert [d["backend"] for d in stats["delegates"]] == ["vulkan", "tvm", "vulkan", "tvm", "vulkan"]
        assert {d["memory"] for d in stats["delegates"]} == {"tvm:cpu", stats["delegates"][0]["memory"]}
        # The input (1) and output (1); per gelu, its input to the host and into TVM (2), its
        # output to the host and into vulkan (2). Before: every delegate input and output (14).
        assert stats["host_transfers"] == 1 + 1 + 2 * 4 == 10 < _old_transfers(program) == 14
        _threaded_runs_match(program, [random_inputs(zoo.inputs, seed=s) for s in range(16)])


@pytest.mark.slow
def test_planned_submissions_per_delegate_one_readback_per_run_and_no_allocation(monkeypatch, tmp_path_factory):
    _needs_compiler()
    _needs_gpu()
    from handoff.testing import random_inputs

    program_bytes, _ = _zoo_program("small_cnn", ("vulkan",), tmp_path_factory.mktemp("home"))
    zoo = handoff.get_plugins().zoo()["small_cnn"]
    calls = {"submit": 0, "create_buffer": 0, "create_bind_group": 0, "map": 0}

    def counting(cls, name):
        real = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls[name if name != "map_async" else "map"] += 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    with handoff.load(program_bytes) as program:
        delegates = [handle for _, handle in program._handles]
        program.run(random_inputs(zoo.inputs, seed=0))  # the device's readback buffer is made on first use
        dev = delegates[0].dev
        # the wgpu-native classes the runtime's objects are instances of
        for obj, name in ((dev.queue, "submit"), (dev.device, "create_buffer"), (dev.device, "create_bind_group"),
                          (dev.staging, "map_async")):
            counting(type(obj), name)
        for seed in range(3):
            program.run(random_inputs(zoo.inputs, seed=seed))
    # per run: each delegate's parts (first_submit) and one readback
    parts = sum(len(handle.chunks) for handle in delegates)
    assert calls == {"submit": 3 * (parts + 1), "create_buffer": 0, "create_bind_group": 0, "map": 3}, calls


@pytest.mark.slow
def test_runtime_runs_without_torch_or_tvm(tmp_path, tmp_path_factory):
    """The program of a model that runs wholly on vulkan loads and runs in a process where torch
    and TVM cannot even be imported; its first run parses no C type (cffi's first parse of each
    costs ~100 ms on a GPU machine's host: they are parsed on a thread during the load)."""
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff.testing import random_inputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
    x = random_inputs([((3, 16), "float32")], seed=5)[0]
    result = handoff.partition(model, (x,), backends=["vulkan"], fallback=False, aten=False)
    path = tmp_path / "mlp.hof"
    result.write(str(path))
    with torch.no_grad():
        np.save(tmp_path / "want.npy", model(x).numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "tvm", "tvm_ffi"):
            sys.modules[name] = None  # any import of them fails
        import numpy as np
        import handoff
        pm = handoff.Plugins(autoload=False, extra=["{PLUGIN}"])
        with handoff.load({str(path)!r}, plugins=pm) as program:
            from handoff_vulkan import runtime
            from wgpu.backends.wgpu_native._ffi import ffi
            runtime._warmups[False].join()  # the run's C types, parsed while the load went on
            parsed = set(ffi._parsed_types)
            (got,) = program.run([np.load({str(tmp_path / 'x.npy')!r})])
            assert set(ffi._parsed_types) == parsed, set(ffi._parsed_types) - parsed  # none left for the run
        want = np.load({str(tmp_path / 'want.npy')!r})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(PLUGIN_DIR)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.fixture(scope="module")
def mlp_lowered():
    _needs_compiler()
    import torch

    from handoff_vulkan.compiler import VulkanCompiler

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Softmax(dim=-1)).eval()
    x = torch.randn(4, 8)
    return model, x, VulkanCompiler({}).preprocess(_export(model, x), "p0")


@pytest.mark.slow
def test_runtime_options_and_input_checks(mlp_lowered):
    _needs_gpu()
    import torch

    from handoff_vulkan.runtime import VulkanRuntime

    model, x, lowered = mlp_lowered
    assert lowered.metadata["num_inputs"] == 1 and lowered.metadata["kernels"] >= 1
    json.dumps(lowered.metadata)
    with torch.no_grad():
        want = model(x)
    rt = VulkanRuntime()
    handle = rt.load(memoryview(lowered.blob), lowered.metadata, runtime_options(adapter="llvmpipe", timestamps="1"))
    try:
        assert "llvmpipe" in handle.dev.name and rt.memory(handle) == f"wgpu:{handle.dev.name} +timestamps"
        (value,) = rt.execute(handle, [x.numpy()])
        assert (value.shape, value.dtype) == ((4, 16), np.float32)  # still on the GPU
        (got,) = rt.to_host([value])
        assert_matches_eager(got, want)
        assert handle.last_gpu_seconds is not None and handle.last_gpu_seconds > 0  # read back with the outputs
        assert set(handle.last_host_seconds) == {"write_and_encode", "submit", "wait_and_map", "read"}
        with pytest.raises(ValueError, match=r"expects float32\[4, 8\], got float64\[4, 8\]"):
            rt.execute(handle, [x.numpy().astype(np.float64)])
        with pytest.raises(ValueError, match="takes 1 inputs"):
            rt.execute(handle, [])
    finally:
        rt.release(handle)
    with pytest.raises(ValueError, match="adapter='no-such-gpu' matches no Vulkan adapter; adapters here: .*llvmpipe"):
        rt.load(memoryview(lowered.blob), lowered.metadata, runtime_options(adapter="no-such-gpu"))
    with pytest.raises(ValueError, match="timestamps='maybe' is not valid"):
        runtime_options(timestamps="maybe")


@pytest.mark.slow
def test_load_is_timed_in_phases_shares_the_device_and_builds_pipelines_on_threads(mlp_lowered):
    """Every load says where its time went; a second runtime (another plugin manager) in the
    process gets the same wgpu device; pipelines built by 1 or 4 threads run the same, and WGSL
    that wgpu refuses on a worker thread is still one line."""
    _needs_gpu()
    import torch

    from handoff_vulkan.runtime import LOAD_PHASES, VulkanRuntime

    model, x, lowered = mlp_lowered
    with torch.no_grad():
        want = model(x)
    first, second = VulkanRuntime(), VulkanRuntime()
    handles = []
    try:
        for rt, threads in ((first, "1"), (second, "4"), (second, "auto")):
            handle = rt.load(memoryview(lowered.blob), lowered.metadata, runtime_options(load_threads=threads))
            handles.append((rt, handle))
            load = rt.stats(handle)["load_seconds"]
            assert list(load) == list(LOAD_PHASES) and all(v >= 0 for v in load.values())
            (got,) = rt.to_host(rt.execute(handle, [x.numpy()]))
            assert_matches_eager(got, want)
        assert handles[0][1].dev is handles[1][1].dev is handles[2][1].dev  # one device per process
    finally:
        for rt, handle in handles:
            rt.release(handle)

    header, data = _format.unpack(lowered.blob)
    header["kernels"][-1]["wgsl"] = header["kernels"][-1]["wgsl"].replace("fn ", "fn fn ", 1)
    with pytest.raises(ValueError, match="vulkan delegate blob is corrupt: wgpu refused it on .*; re-partition"):
        second.load(memoryview(_format.pack(header, bytes(data))), lowered.metadata, runtime_options(load_threads="4"))


def test_load_options_default_from_their_option_and_refuse_bad_values_in_one_line():
    """``first_submit`` and ``load_threads`` get their defaults from their ``Option`` alone (the
    runtime reads the parsed value); a bad value is the one-line error naming the valid values."""
    auto = min(os.cpu_count() or 1, _format.MAX_LOAD_THREADS)
    assert runtime_options()["first_submit"] == _format.FIRST_SUBMIT == 8
    assert runtime_options()["load_threads"] == runtime_options(load_threads="auto")["load_threads"] == auto
    assert runtime_options(first_submit="0", load_threads="3") | {"adapter": None} == \
        {"adapter": None, "timestamps": False, "first_submit": 0, "load_threads": 3}
    threads = "an integer >= 1 and <= 64, or 'auto'"
    submit = "an integer >= 0 and <= 2147483647"
    for name, bad, valid in (("load_threads", "0", threads), ("load_threads", "65", threads),
                             ("load_threads", "many", threads), ("first_submit", "-1", submit),
                             ("first_submit", "some", submit), ("first_submit", "2147483648", submit)):
        with pytest.raises(ValueError) as caught:
            runtime_options(**{name: bad})
        assert str(caught.value) == f"option {name}={bad!r} is not valid; valid values: {valid}"


def test_a_run_is_submitted_in_growing_parts():
    """first_submit=N: N dispatches, then twice as many each time; the last part takes the rest."""
    from handoff_vulkan.runtime import _submissions

    passes, raw = list(range(117)), [f"r{i}" for i in range(117)]
    parts = _submissions(passes, raw, 8)
    assert [len(p) for p, _ in parts] == [8, 16, 32, 61]
    assert [x for p, _ in parts for x in p] == passes and [x for _, r in parts for x in r] == raw
    assert [len(p) for p, _ in _submissions(passes[:42], None, 8)] == [8, 16, 18]
    assert _submissions(passes, raw, 0) == [(passes, raw)] == _submissions(passes, raw, 117)
    assert _submissions([], None, 8) == [([], None)]  # still one submission, for the input copies


@pytest.mark.slow
def test_parts_submitted_separately_give_the_same_outputs_and_one_gpu_span():
    """A run cut into several submissions (first_submit=1: parts of 1, 2, 4, ... dispatches)
    computes exactly what one submission does, counts its submissions, and its timestamps span the
    first part's start to the last's end (a middle part has no timestamp writes)."""
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan.compiler import VulkanCompiler
    from handoff_vulkan.runtime import VulkanRuntime

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                torch.nn.Tanh(), torch.nn.Softmax(dim=-1)).eval()
    x = torch.randn(4, 8)
    lowered = VulkanCompiler({"fuse": False}).preprocess(_export(model, x), "p0")
    with torch.no_grad():
        want = model(x)
    rt, outputs = VulkanRuntime(), {}
    for first in ("0", "1"):
        handle = rt.load(memoryview(lowered.blob), lowered.metadata, runtime_options(first_submit=first, timestamps="1"))
        try:
            assert len(handle.passes) >= 4 and (len(handle.chunks) == 1 if first == "0" else len(handle.chunks) >= 3)
            (outputs[first],) = rt.to_host(rt.execute(handle, [x.numpy()]))
            assert rt.stats(handle)["submits"] == len(handle.chunks)
            assert handle.last_gpu_seconds is not None and handle.last_gpu_seconds > 0
        finally:
            rt.release(handle)
    assert_matches_eager(outputs["1"], want)
    np.testing.assert_array_equal(outputs["1"], outputs["0"])


def test_a_part_starting_with_the_kernel_that_ended_the_last_part_sets_it_again():
    """The native recording sets a pipeline only when it changes; each submission is a new
    compute pass, which starts with none set. torchvision's swin_v2_t, folded into one delegate,
    ran a kernel twice across a part boundary, and wgpu refused the run ("Compute pipeline must be
    set")."""
    _needs_compiler()
    _needs_gpu()
    import torch

    from handoff_vulkan.compiler import VulkanCompiler
    from handoff_vulkan.runtime import VulkanRuntime

    model = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Tanh(), torch.nn.Tanh()).eval()
    x = torch.randn(4, 8)
    lowered = VulkanCompiler({"fuse": False}).preprocess(_export(model, x), "p0")
    rt = VulkanRuntime()
    handle = rt.load(memoryview(lowered.blob), lowered.metadata, runtime_options(first_submit="1"))
    try:
        assert len(handle.passes) == 3 and handle.passes[0][0] is handle.passes[1][0] is handle.passes[2][0]
        assert len(handle.chunks) == 2
        (got,) = rt.to_host(rt.execute(handle, [x.numpy()]))
    finally:
        rt.release(handle)
    with torch.no_grad():
        assert_matches_eager(got, model(x))


@pytest.mark.slow
def test_layer_norm_and_softmax_are_one_dispatch_each():
    """Chains of short reductions (layer norm's mean and variance, softmax's max and sum over 64)
    get dlight's GeneralReduction, one kernel with a workgroup per row; the serial schedule for
    short reductions gave each block its own single-workgroup kernel (3 dispatches each)."""
    _needs_compiler()
    _needs_gpu()
    import torch

    torch.manual_seed(3)
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():  # random affine parameters, so a wrong scale or shift shows
        norm.weight.normal_()
        norm.bias.normal_()
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), norm, torch.nn.Softmax(dim=-1)).eval()
    x = torch.randn(8, 32)
    result = handoff.partition(model, (x,), backends=["vulkan"], fallback=False, aten=False)
    meta = result.assembled.manifest["delegates"][0]["metadata"]
    assert (meta["kernels"], meta["dispatches"]) == (3, 3)  # linear, layer norm, softmax (7 dispatches before)
    with handoff.load(result.to_bytes()) as program:
        for seed in (1, 2):
            xs = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
            (got,) = program.run([xs.numpy()])
            assert_matches_eager(got, model(xs))


@pytest.mark.slow
def test_grid_wider_than_a_dispatch_dimension():
    """70001 rows, one workgroup each: the runtime folds the grid into z (35001 x 1 x 2)."""
    _needs_compiler()
    _needs_gpu()
    import torch

    class RowSums(torch.nn.Module):
        def forward(self, x):
            return (x * 2.0).sum(-1)

    x = torch.randn(70001, 72)
    result = handoff.partition(RowSums(), (x,), backends=["vulkan"], fallback=False, aten=False)
    header, _ = _format.unpack(result.assembled.segments[result.assembled.manifest["delegates"][0]["segment"]])
    assert max(d["grid"][0] for d in header["dispatches"]) > _format.MAX_GRID_DIM
    with handoff.load(result.to_bytes()) as program:
        (got,) = program.run([x.numpy()])
    assert_matches_eager(got, RowSums()(x))
