"""handoff-xnnpack through the core: partition, program file, runtime, against eager torch.

The core's zoo models under ``--backends xnnpack`` and ``--backends xnnpack,tvm``, and a model
with an op XNNPACK has no kernel for, which must be split around it with XNNPACK's reason in the
report. Tolerances: handoff.testing.TOLERANCE (fp32: 1e-4 relative of eager).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1]

torch = pytest.importorskip("torch")
pytest.importorskip("executorch.backends.xnnpack")
pytest.importorskip("tvm")
from torch import nn  # noqa: E402

import handoff  # noqa: E402
from handoff.testing import check_against_eager  # noqa: E402

pytestmark = pytest.mark.slow


def _rendered(report) -> str:
    from rich.console import Console

    out = io.StringIO()
    report.render(Console(file=out, width=250))
    return out.getvalue()


@pytest.mark.parametrize("backends", [("xnnpack",), ("xnnpack", "tvm")], ids=",".join)
@pytest.mark.parametrize("name", ["small_cnn", "small_transformer"])
def test_zoo_model(name, backends, plugins):
    """Every node of the core's CNN and transformer runs on XNNPACK, in one delegate: the
    transformer's layer norms, 4-D matmul expands, unbind squeezes and mean pooling are claimed
    through the plugin's rewrites (handoff_xnnpack.rewrites)."""
    result = handoff.partition(f"zoo:{name}", backends=list(backends))
    report = result.report
    assert report.coverage("xnnpack") == 100.0
    assert report.stats["xnnpack"].partitions == 1
    assert report.declined == []
    assert "100.0%" in _rendered(report)
    zoo = plugins.zoo()[name]
    with handoff.load(result.to_bytes()) as program:
        assert [d["backend"] for d in program.manifest["delegates"]] == ["xnnpack"]
        assert program.manifest["delegates"][0]["metadata"]["precision"] == "fp32"
        check_against_eager(program, zoo.build(), zoo.inputs)


class CumsumBetween(nn.Module):
    """Linear layers on both sides of a cumsum, which XNNPACK has no kernel for."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 8)
        with torch.no_grad():  # random affine parameters: a default LayerNorm is the identity map
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = torch.relu(self.fc1(self.norm(x)))
        return self.fc2(torch.cumsum(y, dim=1)).mean(dim=1)


def test_model_split_around_an_op_xnnpack_lacks(plugins):
    torch.manual_seed(0)
    model = CumsumBetween().eval()
    # min size 1: the two-node tail (fc2, mean) would otherwise join TVM's partition as an island
    result = handoff.partition(model, (torch.randn(2, 6, 16),), backends=["xnnpack", "tvm"],
                               default_limits=handoff.Limits(1))
    report = result.report
    (declined,) = report.declined
    assert declined["op"] == "aten.cumsum.default" and declined["ran_on"] == "tvm"
    assert declined["reasons"] == {"xnnpack": "XNNPACK has no kernel for aten.cumsum.default"}
    assert report.stats["tvm"].nodes == 1
    assert report.stats["xnnpack"].partitions == 2  # before and after the cumsum
    text = _rendered(report)
    assert "aten.cumsum.default" in text and "XNNPACK has no kernel for aten.cumsum.default" in text
    with handoff.load(result.to_bytes()) as program:
        assert [d["backend"] for d in program.manifest["delegates"]] == ["xnnpack", "tvm", "xnnpack"]
        check_against_eager(program, model, [((2, 6, 16), "float32")])
        stats = program.stats()
        # XNNPACK returns numpy and TVM keeps TVM tensors: only the two edges between them cross
        # (into TVM through DLPack, and back). Before, every delegate input and output did.
        assert [d["memory"] for d in stats["delegates"]] == ["host", "tvm:cpu", "host"]
        old = sum(len(i["inputs"]) + len(i["outputs"]) for i in program.manifest["instructions"])
        assert stats["host_transfers"] == 2 < old == 6


def test_edge_conversion_of_support_is_lowered_when_the_partition_is_the_whole_model(plugins, monkeypatch):
    """ExecuTorch's Edge conversion runs once for a model XNNPACK takes whole (support's is
    lowered by preprocess), and once more per partition for a model split around an op XNNPACK
    lacks (each partition is converted on its own); both programs match eager torch."""
    from handoff_xnnpack import compiler

    converted = []
    real = compiler._edge_manager
    monkeypatch.setattr(compiler, "_edge_manager", lambda *a: converted.append(a) or real(*a))
    whole = handoff.partition("zoo:small_cnn", backends=["xnnpack"], use_cache=False)
    assert whole.report.stats["xnnpack"].partitions == 1 and len(converted) == 1
    # the same bytes as a compiler that converts the partition afresh
    names = [n.name for n in whole.exported.graph.nodes if n.op == "call_function"]
    fresh = plugins.compiler("xnnpack", {}).preprocess(handoff.extract_partition(whole.exported, names)[0], "p0")
    (delegate,) = whole.assembled.manifest["delegates"]
    assert len(converted) == 2 and bytes(whole.assembled.segments[delegate["segment"]]) == fresh.blob
    zoo = plugins.zoo()["small_cnn"]
    with handoff.load(whole.to_bytes()) as program:
        check_against_eager(program, zoo.build(), zoo.inputs)
    converted.clear()
    torch.manual_seed(0)
    model = CumsumBetween().eval()
    split = handoff.partition(model, (torch.randn(2, 6, 16),), backends=["xnnpack"], fallback=False, use_cache=False,
                              default_limits=handoff.Limits(1))
    assert split.report.stats["xnnpack"].partitions == 2 and len(converted) == 1 + 2
    with handoff.load(split.to_bytes()) as program:
        check_against_eager(program, model, [((2, 6, 16), "float32")])


def test_runs_from_8_threads_match_single_threaded_runs(plugins):
    """xnnpack, tvm, xnnpack from 8 threads at once, 200 runs each: XNNPACK is reentrant (its own
    pool lock), one Relax VM is not (the core serialises the TVM delegate)."""
    import threading

    import numpy as np

    torch.manual_seed(0)
    result = handoff.partition(CumsumBetween().eval(), (torch.randn(2, 6, 16),), backends=["xnnpack", "tvm"],
                               default_limits=handoff.Limits(min_size=1))
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((2, 6, 16), dtype=np.float32) for _ in range(16)]
    failures: list = []
    with handoff.load(result.to_bytes()) as program:
        want = [program.run([x])[0] for x in inputs]

        def work(k):
            try:
                for i in range(200):
                    j = (k + i) % len(inputs)
                    if not np.array_equal(program.run([inputs[j]])[0], want[j]):
                        failures.append(f"thread {k}, run {i}: differs from the single-threaded result")
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(f"thread {k}: {exc!r}")

        workers = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert program.stats()["runs"] == len(inputs) + 8 * 200
    assert not failures, failures[:3]


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder (4 heads over 7 tokens) with a head on the first token."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(x)[:, 0])


class TorchAttention(nn.Module):
    """nn.MultiheadAttention (2 heads over 5 tokens) and a LayerNorm: the same attention graph as
    TorchEncoder's on other shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.attention, self.norm = nn.MultiheadAttention(16, 2, batch_first=True), nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.attention(x, x, x, need_weights=False)[0] + x)


@pytest.mark.parametrize("model,shape", [(TorchEncoder, (1, 7, 32)), (TorchAttention, (1, 5, 16))],
                         ids=["TransformerEncoder", "MultiheadAttention"])
def test_torch_attention_modules(model, shape, plugins):
    """torch's own attention modules: XNNPACK takes all but the NaN guard of the attention's
    decomposition (eq/logical_not/any/where, no XNNPACK kernel), which TVM runs. Both share one
    HANDOFF_HOME, so the guard's TVM partition, the same graph on other shapes, must not be
    reused across them (the lowering cache keys on shapes)."""
    torch.manual_seed(0)
    model = model().eval()
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    result = handoff.partition(model, (torch.randn(shape),), backends=["xnnpack", "tvm"])
    report = result.report
    assert report.coverage("xnnpack") > 80.0 and report.stats["aten"].nodes == 0
    assert {d["op"] for d in report.declined} >= {"aten.where.self", "aten.any.dim"}
    assert all(d["reasons"]["xnnpack"].startswith("XNNPACK has no kernel for") for d in report.declined)
    check_against_eager(result.to_bytes(), model, [(shape, "float32")])


def test_inspect_and_run_keep_native_chatter_off_stderr(plugins, tmp_path):
    """ExecuTorch's cpuinfo prints five ``[cpuinfo_utils.cpp:…]`` lines to fd 2 whenever its runtime
    loads; ``handoff inspect`` and ``handoff run`` keep them off the terminal (stderr holds only
    handoff's own lines, here none), and show them with ``--debug``."""
    import os
    import subprocess

    path = tmp_path / "cnn.hof"
    handoff.partition("zoo:small_cnn", backends=["xnnpack"], fallback=False).write(str(path))
    exe = Path(sys.executable).with_name("handoff")
    env = {**os.environ, "HANDOFF_PLUGINS": "handoff_xnnpack.plugin", "PYTHONPATH": str(PLUGIN_DIR)}

    def stderr_of(*args: str) -> str:
        done = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    for command in (["inspect", str(path)], ["run", str(path)]):
        err = stderr_of(*command)
        assert [line for line in err.splitlines() if not line.startswith("handoff")] == [], err
    assert "cpuinfo" in stderr_of("run", str(path), "--debug")
