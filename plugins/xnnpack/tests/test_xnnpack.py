"""handoff-xnnpack: the compiler and runtime halves, exercised directly (no core partitioner).

Every model here is lowered with ExecuTorch 1.5.1's real XNNPACK toolchain and run by
ExecuTorch's runtime with its XNNPACK delegate, then compared with eager torch on fresh inputs.
"""

from __future__ import annotations

import json
import operator
import tomllib
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1]

pytest.importorskip("handoff.backend")
torch = pytest.importorskip("torch")
pytest.importorskip("executorch.backends.xnnpack")
np = pytest.importorskip("numpy")
from torch import nn  # noqa: E402

from handoff import BackendSpec, LoweringError  # noqa: E402
from handoff_xnnpack import EXECUTORCH_VERSION, _format  # noqa: E402
from handoff_xnnpack.compiler import XnnpackCompiler, _sources  # noqa: E402
from handoff_xnnpack.rewrites import rewrite  # noqa: E402
from handoff_xnnpack.runtime import XnnpackRuntime  # noqa: E402

pytestmark = pytest.mark.slow

FP32 = dict(rtol=1e-4, atol=1e-5)
FP16 = dict(rtol=1e-2, atol=1e-2)


# -- models ---------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv/bn/relu, max pool, depthwise conv/bn/relu6, residual add, global average pool, MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)
        for bn in (self.bn1, self.bn2):  # random running statistics, so batch norm does something
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn1(self.conv1(x))))
        y = y + self.pw(nn.functional.relu6(self.bn2(self.dw(y))))
        y = nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(y)))


class EncoderBlock(nn.Module):
    """Pre-softmax-scaled multi-head self-attention and a ReLU MLP, both residual, written with
    the ops ExecuTorch's XNNPACK partitioner takes as they are (3-D bmm, no layer norm)."""

    def __init__(self, d: int = 32, heads: int = 4, ff: int = 64) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.register_buffer("scale", torch.tensor([self.dh ** -0.5]))

    def _split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.dh).permute(0, 2, 1, 3).reshape(b * self.h, t, self.dh)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self._split(self.q(x) * self.scale), self._split(self.k(x)), self._split(self.v(x))
        att = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        y = torch.bmm(att, v).view(b, self.h, t, self.dh).permute(0, 2, 1, 3).reshape(b, t, d)
        x = x + self.o(y)
        return x + self.ff2(torch.relu(self.ff1(x)))


class PreNormEncoder(nn.Module):
    """A pre-norm encoder layer as people write it: nn.LayerNorm, packed qkv split by unbind, 4-D
    matmuls, an unsqueeze/squeeze pair, mean and sum pooling over the sequence. Every one of those has
    no XNNPACK kernel as it is in ExecuTorch 1.5.1; handoff_xnnpack.rewrites makes them XNNPACK ops.
    ``act`` is GELU in fp32 and ReLU in fp16 (XNNPACK's GELU is fp32 only)."""

    def __init__(self, d: int = 32, heads: int = 4, act: type = nn.GELU) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2, self.act = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), act()
        with torch.no_grad():  # random affine parameters: a default LayerNorm is the bare normalisation
            for n in (self.n1, self.n2, self.n3):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.dh ** -0.5, dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.ff2(self.act(self.ff1(self.n2(x)))).unsqueeze(1).squeeze(1)
        return self.n3(x).mean(dim=1) + x.sum(dim=1) * 0.05


class WithCumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.cumsum(torch.relu(self.fc1(x)), dim=1))


class AddAlpha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return torch.add(y, x, alpha=2.0), y * x


# -- helpers --------------------------------------------------------------------------------------
def parsed(**raw: str) -> dict:
    """Options as the core hands them to the compiler and runtime: parsed, defaults filled in."""
    return {name: option.parse(name, raw.get(name)) for name, option in _format.OPTIONS.items()}


@pytest.fixture(scope="module")
def compiler() -> XnnpackCompiler:
    return XnnpackCompiler(parsed())


@pytest.fixture(scope="module")
def runtime() -> XnnpackRuntime:
    rt = XnnpackRuntime()
    ok, why = rt.is_available()
    if not ok:
        pytest.skip(why)
    return rt


def export(compiler: XnnpackCompiler, model: nn.Module, *example):
    """torch.export + decomposition to core ATen, keeping what XNNPACK wants whole (as the core does)."""
    ep = torch.export.export(model.eval(), tuple(example))
    keep = set(compiler.ops_to_not_decompose())
    table = {op: fn for op, fn in torch.export.default_decompositions().items() if op not in keep}
    return ep.run_decompositions(table)


def call_nodes(ep) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in ep.graph.nodes if n.op == "call_function"}


def check_against_eager(compiler, runtime, model, shape, dtype, tol):
    torch.manual_seed(0)
    model = model.eval().to(dtype)
    ep = export(compiler, model, torch.randn(shape, dtype=dtype))
    before = str(ep.graph)
    verdict = compiler.support(ep)
    assert set(verdict) == set(call_nodes(ep)), "support() must judge every call_function node"
    assert {k: v for k, v in verdict.items() if v is not None} == {}
    assert compiler.fused_patterns(ep) == []
    lowered = compiler.preprocess(ep, "p0")
    assert str(ep.graph) == before, "support() and preprocess() must not change the program"
    assert lowered.blob[:8] == _format.MAGIC
    assert lowered.metadata["compiler"] == "executorch"
    assert lowered.metadata["precision"] == {torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    assert lowered.metadata["num_inputs"] == 1 and lowered.metadata["num_outputs"] == 1
    json.dumps(lowered.metadata)

    handle = runtime.load(memoryview(lowered.blob).toreadonly(), lowered.metadata, parsed())
    try:
        # the inputs recorded at partition time, which load uses, are what ExecuTorch's method says
        meta = handle.method.method_meta()
        assert lowered.metadata["input_specs"] == [[meta.input_tensor_meta(i).dtype(), list(meta.input_tensor_meta(i).sizes())]
                                                   for i in range(meta.num_inputs())]
        assert meta.num_outputs() == handle.num_outputs
        asked = runtime.load(memoryview(lowered.blob).toreadonly(),
                             {k: v for k, v in lowered.metadata.items() if k != "input_specs"}, parsed())
        assert asked.inputs == handle.inputs  # a blob from before input_specs: the method is asked
        runtime.release(asked)
        # metadata that lies about the sizes (untrusted, like the blob): ExecuTorch refuses the input
        (code, sizes), = lowered.metadata["input_specs"]
        lying = runtime.load(memoryview(lowered.blob).toreadonly(),
                             {**lowered.metadata, "input_specs": [[code, [d + 1 for d in sizes]]]}, parsed())
        try:
            big = np.zeros([d + 1 for d in sizes], dtype=handle.inputs[0][0])
            with pytest.raises(RuntimeError, match="xnnpack: ExecuTorch failed to run the delegate"):
                runtime.execute(lying, [big])
        finally:
            runtime.release(lying)
        outs = []
        for seed in (1, 2):  # fresh inputs, not the export example
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)
            (got,) = runtime.execute(handle, [x.numpy()])
            with torch.no_grad():
                want = model(x).numpy()
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), **tol)
            outs.append(got)
        assert not np.allclose(outs[0], outs[1]), "outputs must change with the input"
    finally:
        runtime.release(handle)


# -- plugin ---------------------------------------------------------------------------------------
def test_plugin_declares_the_backend():
    from handoff_xnnpack import plugin

    (spec,) = plugin.handoff_backends()
    assert isinstance(spec, BackendSpec)
    assert (spec.id, spec.device, spec.version) == ("xnnpack", "cpu", "0.1.0")
    assert spec.compiler == "handoff_xnnpack.compiler:XnnpackCompiler"
    assert spec.runtime == "handoff_xnnpack.runtime:XnnpackRuntime"
    assert set(spec.options) == {"threads"}


def test_entry_point_is_the_only_registration():
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    assert project["name"] == "handoff-xnnpack" and project["version"] == "0.1.0"
    assert project["entry-points"] == {"handoff.backends": {"xnnpack": "handoff_xnnpack.plugin"}}
    assert "executorch==1.5.1" in project["dependencies"]


def test_options_are_checked():
    assert parsed(threads="2")["threads"] == 2
    assert parsed(threads="auto")["threads"] is None
    for bad in ("many", "-1", "5000"):  # 5000 threads would start 5001 OS threads: capped at 256
        with pytest.raises(ValueError, match=rf"option threads='{bad}' is not valid; valid values: an integer >= 1 "
                                             r"and <= 256, or 'auto'"):
            parsed(threads=bad)


def test_ops_to_not_decompose_come_from_xnnpack(compiler):
    ops = compiler.ops_to_not_decompose()
    assert torch.ops.aten.linear.default in ops
    assert torch.ops.aten.hardswish.default in ops
    assert all(isinstance(op, torch._ops.OpOverload) for op in ops)


# -- numerics -------------------------------------------------------------------------------------
def test_cnn_fp32(compiler, runtime):
    check_against_eager(compiler, runtime, SmallCNN(), (2, 3, 16, 16), torch.float32, FP32)


def test_cnn_fp16(compiler, runtime):
    check_against_eager(compiler, runtime, SmallCNN(), (2, 3, 16, 16), torch.float16, FP16)


def test_transformer_block_fp32(compiler, runtime):
    check_against_eager(compiler, runtime, EncoderBlock(), (2, 8, 32), torch.float32, FP32)


def test_transformer_block_fp16(compiler, runtime):
    check_against_eager(compiler, runtime, EncoderBlock(), (2, 8, 32), torch.float16, FP16)


def test_prenorm_encoder_fp32(compiler, runtime):
    check_against_eager(compiler, runtime, PreNormEncoder(), (2, 8, 32), torch.float32, FP32)


def test_prenorm_encoder_fp16(compiler, runtime):
    check_against_eager(compiler, runtime, PreNormEncoder(act=nn.ReLU), (2, 8, 32), torch.float16, FP16)


# -- rewrites -------------------------------------------------------------------------------------
def test_rewrites_leave_nothing_xnnpack_lacks(compiler):
    """The encoder holds every rewritten op; after rewrite() none of them is left."""
    ep = export(compiler, PreNormEncoder(), torch.randn(2, 8, 32))
    lacking = {torch.ops.aten.native_layer_norm.default, torch.ops.aten.expand.default, torch.ops.aten.mean.dim,
               torch.ops.aten.squeeze.dims, torch.ops.aten.sum.dim_IntList}
    assert lacking <= {node.target for node in call_nodes(ep).values()}
    before = str(ep.graph)
    rewritten = rewrite(ep)
    assert str(ep.graph) == before, "rewrite() must not change its input"
    assert not {node.target for node in call_nodes(rewritten).values()} & lacking
    assert torch.ops.aten.full.default not in {node.target for node in call_nodes(rewritten).values()}


@pytest.mark.parametrize("case", ["mean_all", "mean_keepdim", "mean_4d_hw", "sum_dims", "select", "squeeze_all",
                                  "unsqueeze_mid", "layer_norm_2d_shape", "layer_norm_no_affine"])
def test_rewrites_match_eager(case, compiler):
    """Each rewrite computes what the op computes (run through torch, before XNNPACK)."""
    shapes = {"mean_4d_hw": (2, 3, 4, 5), "layer_norm_2d_shape": (2, 3, 4, 5)}
    weight, bias = torch.rand(4, 5) + 0.5, torch.rand(4, 5)
    fns = {
        "mean_all": lambda x: x.mean(dim=[0, 1, 2]),
        "mean_keepdim": lambda x: x.mean(dim=[0, 2], keepdim=True),
        "mean_4d_hw": lambda x: x.mean(dim=[2, 3]),
        "sum_dims": lambda x: x.sum(dim=[0, 2]) + x.sum(dim=-1, keepdim=True).sum() + x.mean(-1).sum(),
        "select": lambda x: x[:, -1] + x.select(2, 1).sum(),
        "squeeze_all": lambda x: x[:1].squeeze() * 2,
        "unsqueeze_mid": lambda x: x.unsqueeze(1) * 2,
        "layer_norm_2d_shape": lambda x: nn.functional.layer_norm(x, (4, 5), weight, bias),
        "layer_norm_no_affine": lambda x: nn.functional.layer_norm(x, (4,), eps=1e-3),
    }

    class M(nn.Module):
        def forward(self, x):
            return fns[case](x)

    torch.manual_seed(0)
    x = torch.randn(shapes.get(case, (2, 3, 4)))
    ep = export(compiler, M(), x)
    rewritten = rewrite(ep)
    fresh = torch.randn(x.shape)
    torch.testing.assert_close(rewritten.module()(fresh), M()(fresh), rtol=1e-5, atol=1e-6)


def test_rewritten_op_declined_with_the_reason_for_the_op_it_became(compiler):
    """A select on int64 becomes slice + view, which XNNPACK refuses for the dtype: the select
    carries that reason."""

    class M(nn.Module):
        def forward(self, x, i):
            return torch.relu(x), i[:, 0] * 2

    ep = export(compiler, M(), torch.randn(2, 3), torch.arange(6).reshape(2, 3))
    verdict = compiler.support(ep)
    (select,) = [n for n, node in call_nodes(ep).items() if node.target == torch.ops.aten.select.int]
    assert verdict[select].startswith("aten.slice_copy.Tensor: invalid dtype int64")


def test_identity_between_declined_ops_is_declined(compiler):
    """An expand to its own shape is rewritten to nothing; with no XNNPACK neighbour it would be
    a partition of its own, so it is declined, saying why."""

    class M(nn.Module):
        def forward(self, x):
            return torch.cumsum(torch.cumsum(x, 1).expand(2, 8), 1)

    ep = export(compiler, M(), torch.randn(2, 8))
    verdict = compiler.support(ep)
    (expand,) = [n for n, node in call_nodes(ep).items() if node.target == torch.ops.aten.expand.default]
    assert verdict[expand] == ("aten.expand.default: an identity here (XNNPACK drops it), but neither its input "
                               "nor its users run on XNNPACK")


def test_cache_key_names_the_toolchain(compiler):
    key = json.loads(compiler.cache_key())
    assert key["executorch"] == EXECUTORCH_VERSION and key["blob_format"] == _format.FORMAT_VERSION
    assert key["torch"] == torch.__version__ and len(key["code"]) == 64


# -- capability -----------------------------------------------------------------------------------
def test_cumsum_declined_with_xnnpack_reason(compiler):
    ep = export(compiler, WithCumsum(), torch.randn(2, 8))
    verdict = compiler.support(ep)
    nodes = call_nodes(ep)
    (cumsum,) = [n for n, node in nodes.items() if node.target == torch.ops.aten.cumsum.default]
    assert verdict[cumsum] == "XNNPACK has no kernel for aten.cumsum.default"
    assert {n for n, why in verdict.items() if why is not None} == {cumsum}
    assert sum(node.target == torch.ops.aten.linear.default for node in nodes.values()) == 2


def test_add_alpha_declined_with_xnnpack_reason(compiler):
    ep = export(compiler, AddAlpha(), torch.randn(2, 8))
    verdict = compiler.support(ep)
    (add,) = [n for n, node in call_nodes(ep).items() if node.target == torch.ops.aten.add.Tensor]
    assert verdict[add] == "aten.add.Tensor: Add node doesn't support alpha != 1"
    assert {n for n, why in verdict.items() if why is not None} == {add}


def test_integer_ops_declined_for_dtype(compiler):
    class IntOps(nn.Module):
        def forward(self, x, i):
            return torch.relu(x), i + 1

    ep = export(compiler, IntOps(), torch.randn(2, 8), torch.arange(4))
    verdict = compiler.support(ep)
    (add,) = [n for n, node in call_nodes(ep).items() if node.target == torch.ops.aten.add.Tensor]
    assert "invalid dtype int64" in verdict[add]
    (relu,) = [n for n, node in call_nodes(ep).items() if node.target == torch.ops.aten.relu.default]
    assert verdict[relu] is None


def test_fp16_gelu_declined(compiler):
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU()).half()
    ep = export(compiler, model, torch.randn(2, 8, dtype=torch.float16))
    verdict = compiler.support(ep)
    (gelu,) = [n for n, node in call_nodes(ep).items() if node.target == torch.ops.aten.gelu.default]
    assert verdict[gelu] == "aten.gelu.default: GELU does not support fp16"
    assert {n for n, why in verdict.items() if why is not None} == {gelu}


class _QdqRelu(nn.Module):
    """quantize -> dequantize -> relu -> quantize -> dequantize, all of one dtype."""

    def __init__(self, dtype, qmin, qmax, zero):
        super().__init__()
        self.q = (1e-2, zero, qmin, qmax, dtype)

    def forward(self, x):
        ops = torch.ops.quantized_decomposed
        x = ops.dequantize_per_tensor(ops.quantize_per_tensor(x, *self.q), *self.q)
        return ops.dequantize_per_tensor(ops.quantize_per_tensor(torch.relu(x), *self.q), *self.q)


@pytest.mark.parametrize("dtype, qmin, qmax, zero", [(torch.int8, -128, 127, 0), (torch.uint16, 0, 65535, 32768)])
def test_quantize_ops_of_a_dtype_xnnpack_lacks_are_declined(compiler, dtype, qmin, qmax, zero):
    """XNNPACK's partitioner tags uint16 (16-bit activations) quantize/dequantize ops that its
    lowering then refuses ("Unsupported dtype for quantization"): support() declines them with
    the reason; int8 ones are taken."""
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed)

    ep = export(compiler, _QdqRelu(dtype, qmin, qmax, zero), torch.randn(2, 8))
    verdict = compiler.support(ep)
    qdq = [n for n, node in call_nodes(ep).items() if "quantize" in n]
    assert len(qdq) == 4
    for name in qdq:
        if dtype == torch.int8:
            assert verdict[name] is None, verdict
        else:
            assert "with dtype uint16: XNNPACK's quantized operators take int8 and uint8 tensors" in verdict[name]


def test_support_matches_what_executorch_leaves_outside(compiler):
    """What support() declines is exactly what ExecuTorch's own XNNPACK lowering of the whole
    program leaves outside its delegates."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, x):
            return torch.cumsum(self.layer(x), dim=1)

    ep = export(compiler, Mixed(), torch.randn(1, 4, 16))
    verdict = compiler.support(ep)
    declined = {n for n, why in verdict.items() if why is not None}
    assert declined and len(declined) < len(verdict)
    names = {n.name for n in ep.graph.nodes}
    lowered = to_edge_transform_and_lower(rewrite(ep), partitioner=[XnnpackPartitioner()]).exported_program()
    outside = set()
    for node in lowered.graph.nodes:
        if node.op != "call_function" or node.target is torch.ops.higher_order.executorch_call_delegate:
            continue
        if node.target is operator.getitem and node.args[0].target is torch.ops.higher_order.executorch_call_delegate:
            continue
        outside.update(_sources(node, id(ep.graph), names))
    getitems = {n for n in declined if call_nodes(ep)[n].target is operator.getitem}
    assert declined - getitems == outside - getitems
    aten = torch.ops.aten
    targets = {call_nodes(ep)[n].target for n in declined}
    # cumsum, and the NaN guard of attention's decomposition (eq/logical_not/any/where): no kernel
    assert {aten.cumsum.default, aten.where.self, aten.any.dim} <= targets
    # no kernel either, but rewritten into XNNPACK ops: layer norm, attention's scaling (mul.Scalar)
    # and its 4-D matmuls' expands
    assert not targets & {aten.native_layer_norm.default, aten.mul.Scalar, aten.expand.default}
    assert [verdict[n] for n, node in call_nodes(ep).items() if node.target == aten.native_layer_norm.default] == [None] * 2


def test_preprocess_refuses_what_xnnpack_leaves_outside(compiler):
    ep = export(compiler, WithCumsum(), torch.randn(2, 8))
    with pytest.raises(LoweringError, match=r"lowered with aten\.cumsum\.default left outside XNNPACK") as info:
        compiler.preprocess(ep, "p3")
    assert info.value.node == "cumsum"


# -- runtime --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_lowered(compiler):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    return model, compiler.preprocess(export(compiler, model, torch.randn(1, 3, 16, 16)), "p0")


def test_runtime_is_available(runtime, monkeypatch):
    assert runtime.is_available() == (True, "")
    # asked on every load: once ExecuTorch registered XnnpackBackend (it cannot unregister), the
    # binding is not asked again
    monkeypatch.setattr(runtime, "_binding", object())
    assert runtime.is_available() == (True, "")


def test_version_mismatch_refused(runtime, cnn_lowered):
    _, lowered = cnn_lowered
    header, pte = _format.unpack(lowered.blob)
    for other in ("1.4.0", "2.5.1"):
        blob = _format.pack(bytes(pte), dict(header, executorch=other))
        with pytest.raises(ValueError, match=rf"built with ExecuTorch {other} \(program ET12, XNNPACK delegate "
                                             r"XH00/XN01\) but this runtime has ExecuTorch 1\.5"):
            runtime.load(memoryview(blob), lowered.metadata, parsed())
    patch = _format.pack(bytes(pte), dict(header, executorch="1.5.0"))  # patch releases may differ
    runtime.release(runtime.load(memoryview(patch), lowered.metadata, parsed()))


def test_foreign_or_damaged_blob_refused(runtime, cnn_lowered):
    _, lowered = cnn_lowered
    with pytest.raises(ValueError, match=r"^not a xnnpack delegate blob \(magic "):
        runtime.load(memoryview(b"PK\x03\x04" + lowered.blob[4:]), lowered.metadata, parsed())
    newer = bytearray(lowered.blob)
    newer[8:12] = (_format.FORMAT_VERSION + 1).to_bytes(4, "little")
    with pytest.raises(ValueError, match=r"xnnpack delegate blob format 3 is newer than this runtime reads \(2\); upgrade the plugin"):
        runtime.load(memoryview(bytes(newer)), lowered.metadata, parsed())
    with pytest.raises(ValueError, match="truncated"):
        runtime.load(memoryview(lowered.blob[:-10]), lowered.metadata, parsed())


def test_a_blob_in_the_same_bytes_is_unpacked_and_copied_once(runtime, cnn_lowered, monkeypatch):
    """The core hands out the same immutable bytes again for a recorded file opened unchanged: a
    later load of a blob at the same place in them reuses the .pte copy (delegates loaded from it
    at once all run right); a blob in other bytes (a changed file) or in a buffer that can change
    is unpacked and checked as itself."""
    model, lowered = cnn_lowered
    source = bytes(16) + lowered.blob
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x).numpy()
    first = runtime.load(memoryview(source)[16:], lowered.metadata, parsed())
    try:
        second = runtime.load(memoryview(source)[16:], lowered.metadata, parsed())
        try:
            assert second.data is first.data
            for handle in (first, second):
                np.testing.assert_allclose(runtime.execute(handle, [x.numpy()])[0], want, **FP32)
        finally:
            runtime.release(second)
    finally:
        runtime.release(first)
    damaged = bytearray(source)
    damaged[16:20] = b"PK\x03\x04"
    with pytest.raises(ValueError, match=r"^not a xnnpack delegate blob \(magic "):
        runtime.load(memoryview(bytes(damaged))[16:], lowered.metadata, parsed())
    from handoff_xnnpack import runtime as module

    held = len(module._PTES)
    big = bytes(module._KEEP_BYTES) + lowered.blob  # more than the memo may hold: never kept
    runtime.release(runtime.load(memoryview(big)[module._KEEP_BYTES:], lowered.metadata, parsed()))
    assert len(module._PTES) == held and all(kept is not big for kept, _ in module._PTES.values())
    monkeypatch.setattr(module, "_KEEP_BYTES", 2 * len(source))  # room for one blob and its copy
    other = bytes(16) + lowered.blob
    for kept in (source, other):
        runtime.release(runtime.load(memoryview(kept)[16:], lowered.metadata, parsed()))
    assert [viewed is other for viewed, _ in module._PTES.values()] == [True]  # the newest only
    mutable = bytearray(source)
    runtime.release(runtime.load(memoryview(mutable)[16:], lowered.metadata, parsed()))
    mutable[16:20] = b"PK\x03\x04"
    with pytest.raises(ValueError, match=r"^not a xnnpack delegate blob \(magic "):
        runtime.load(memoryview(mutable)[16:], lowered.metadata, parsed())


def test_inputs_checked(runtime, cnn_lowered):
    _, lowered = cnn_lowered
    handle = runtime.load(memoryview(lowered.blob), lowered.metadata, parsed())
    try:
        with pytest.raises(ValueError, match="expects float32"):
            runtime.execute(handle, [np.zeros((1, 3, 16, 16), np.float64)])
        with pytest.raises(ValueError, match="takes 1 inputs"):
            runtime.execute(handle, [])
        # non-contiguous and read-only inputs are fine
        x = np.asfortranarray(np.random.default_rng(0).standard_normal((1, 3, 16, 16), dtype=np.float32))
        x.flags.writeable = False
        (got,) = runtime.execute(handle, [x])
        assert got.shape == (1, 10)
    finally:
        runtime.release(handle)


def test_input_specs_are_kept_only_for_the_core_s_read_only_lists(monkeypatch):
    """The inputs read from ``metadata["input_specs"]`` are kept by that list only when it is the
    core's read-only ``handoff.ManifestList`` (which cannot change): a plain list, or a changeable
    subclass of list, is read on every load."""
    from handoff import ManifestList
    from handoff_xnnpack import runtime as xnnpack_runtime

    read = []
    real = xnnpack_runtime._input_specs
    monkeypatch.setattr(xnnpack_runtime, "_input_specs", lambda m: read.append(1) or real(m))

    class Changeable(list):
        pass

    specs = [[6, [1, 3, 16, 16]]]
    want = ((np.dtype("float32"), (1, 3, 16, 16)),), 1
    for kind in (list, Changeable, ManifestList):
        metadata = {"input_specs": kind(specs), "num_outputs": 1}
        assert xnnpack_runtime._inputs(metadata) == want == xnnpack_runtime._inputs(metadata)
    assert len(read) == 2 + 2 + 1


def test_outputs_are_fresh(runtime, cnn_lowered):
    """``fresh_outputs``: each execute returns new, writable arrays, sharing memory with neither
    the inputs, the blob nor an earlier call's outputs, and no later call changes them."""
    model, lowered = cnn_lowered
    assert runtime.fresh_outputs
    blob = memoryview(lowered.blob)
    handle = runtime.load(blob, lowered.metadata, parsed())
    try:
        xs = [np.random.default_rng(seed).standard_normal((1, 3, 16, 16), dtype=np.float32) for seed in (1, 2)]
        (first,) = runtime.execute(handle, [xs[0]])
        kept = first.copy()
        (second,) = runtime.execute(handle, [xs[1]])
        np.testing.assert_array_equal(first, kept)  # not overwritten by the second call
        assert not np.array_equal(first, second) and first.flags.writeable and second.flags.writeable
        blob_span = np.frombuffer(blob, np.uint8)
        for out in (first, second):
            assert not any(np.shares_memory(out, other) for other in (*xs, blob_span, first if out is second else second))
        with torch.no_grad():
            np.testing.assert_allclose(first, model(torch.from_numpy(xs[0])).numpy(), rtol=1e-4, atol=1e-4)
    finally:
        runtime.release(handle)


def test_threads(runtime, cnn_lowered):
    model, lowered = cnn_lowered
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = model(x).numpy()
    for threads in ("1", "2"):
        handle = runtime.load(memoryview(lowered.blob), lowered.metadata, parsed(threads=threads))
        try:
            assert runtime.threads() == int(threads)
            np.testing.assert_allclose(runtime.execute(handle, [x.numpy()])[0], want, **FP32)
            if threads == "1":  # the pool cannot be resized under a loaded delegate
                with pytest.raises(ValueError, match="process-wide pool of 1 threads"):
                    runtime.load(memoryview(lowered.blob), lowered.metadata, parsed(threads="2"))
        finally:
            runtime.release(handle)
    # the compile-time option is the default
    meta = XnnpackCompiler(parsed(threads="1")).preprocess(
        export(XnnpackCompiler(parsed()), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(1, 4)), "t").metadata
    assert meta["threads"] == 1
