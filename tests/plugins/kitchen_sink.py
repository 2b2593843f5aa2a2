"""A test plugin that implements every hook of handoff.hookspecs.

Its two backends, ``sink`` and ``sinkb``, are small but real: the compiler serialises a partition
into a list of elementwise ops plus weights, and the runtime interprets that list with numpy. Which
ATen ops each claims is an option (``ops``), so tests can build any mix of claimed and declined
nodes; ``fail_on`` makes lowering fail at an op; ``fuse`` reports mul->relu pairs as fused patterns.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping, Sequence

import numpy as np

from handoff import BackendSpec, Lowered, LoweringError, ZooModel, hookimpl
from handoff.zoo import ResolvedModel

#: ATen op -> numpy implementation (args after the tensors are scalars)
NUMPY_OPS = {
    "aten.add.Tensor": lambda a, b, alpha=1: a + alpha * b,
    "aten.sub.Tensor": lambda a, b, alpha=1: a - alpha * b,
    "aten.mul.Tensor": lambda a, b: a * b,
    "aten.relu.default": lambda a: np.maximum(a, 0),
    "aten.neg.default": lambda a: -a,
    "aten.sin.default": np.sin,
    "aten.tanh.default": np.tanh,
}
DEFAULT_OPS = "aten.add.Tensor,aten.mul.Tensor,aten.relu.default"
OPTIONS = {"ops": "comma-separated ATen ops to claim", "fail_on": "an ATen op whose lowering fails",
           "crash_on": "an ATen op whose lowering raises a plain error that names no node",
           "fuse": "1: report mul->relu pairs as fused patterns"}
RUNTIME_OPTIONS = {"check": "1: refuse non-finite outputs"}
MAGIC = b"SINK"

calls: list[str] = []  # hooks called, for the tests


@hookimpl
def handoff_backends() -> list[BackendSpec]:
    calls.append("handoff_backends")
    return [BackendSpec(id=bid, version="9.9", compiler=f"{__name__}:SinkCompiler", runtime=f"{__name__}:SinkRuntime",
                        description=f"kitchen-sink test backend {bid}", options=OPTIONS,
                        runtime_options=RUNTIME_OPTIONS) for bid in ("sink", "sinkb")]


@hookimpl
def handoff_zoo_models() -> dict[str, ZooModel]:
    calls.append("handoff_zoo_models")
    return {"sink_net": ZooModel(f"{__name__}:sink_net", [((2, 8), "float32")], "add/mul/relu/sin chain")}


@hookimpl
def handoff_resolve_model(spec: str, input_shapes: Sequence[Any], zoo: Mapping[str, ZooModel]) -> ResolvedModel | None:
    calls.append("handoff_resolve_model")
    if not spec.startswith("sink:"):
        return None
    import torch

    return ResolvedModel(name=spec, module=sink_net(), example_inputs=(torch.randn(2, 8),))


@hookimpl
def handoff_report(report: Any) -> None:
    calls.append("handoff_report")
    report.notes.append(f"kitchen sink saw {report.total_nodes} nodes")


def sink_net() -> Any:
    import torch

    class SinkNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(x * self.w + 1.0)
            z = torch.sin(y) + x
            return torch.relu(z * y)

    torch.manual_seed(0)
    return SinkNet().eval()


class SinkCompiler:
    def __init__(self, options: Mapping[str, str]):
        self.ops = set(options.get("ops", DEFAULT_OPS).split(","))
        unknown = self.ops - set(NUMPY_OPS)
        if unknown:
            raise ValueError(f"ops {sorted(unknown)} unknown; valid: {', '.join(NUMPY_OPS)}")
        self.fail_on = options.get("fail_on")
        self.crash_on = options.get("crash_on")
        self.fuse = options.get("fuse") == "1"

    def ops_to_not_decompose(self) -> list[Any]:
        return []

    def support(self, ep: Any) -> dict[str, str | None]:
        out = {}
        for node in ep.graph.nodes:
            if node.op == "call_function":
                op = str(node.target)
                out[node.name] = None if op in self.ops else f"sink has no kernel for {op}"
        return out

    def fused_patterns(self, ep: Any) -> list[list[str]]:
        if not self.fuse:
            return []
        return [[n.args[0].name, n.name] for n in ep.graph.nodes
                if str(n.target) == "aten.relu.default" and str(getattr(n.args[0], "target", "")) == "aten.mul.Tensor"]

    def preprocess(self, ep: Any, name: str) -> Lowered:
        sig = ep.graph_signature
        weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        env: dict[str, Any] = {}
        program: list[Any] = []
        consts: list[list[float]] = []
        inputs = 0
        for node in ep.graph.nodes:
            if node.op == "placeholder":
                if node.name in weights:
                    t = ep.state_dict.get(weights[node.name], ep.constants.get(weights[node.name]))
                    env[node.name] = ["const", len(consts)]
                    consts.append(t.detach().numpy().tolist())
                else:
                    env[node.name] = ["input", inputs]
                    inputs += 1
            elif node.op == "call_function":
                op = str(node.target)
                if op == self.fail_on:
                    raise LoweringError(f"sink refuses {op}", node=node.name)
                if op == self.crash_on:
                    raise RuntimeError("internal compiler error 0x2a")
                if op not in NUMPY_OPS:
                    raise LoweringError(f"sink cannot lower {op}", node=node.name)
                args = [env[a.name] if hasattr(a, "name") else ["scalar", a] for a in node.args]
                program.append([op, args, dict(node.kwargs)])
                env[node.name] = ["tmp", len(program) - 1]
            elif node.op == "output":
                outputs = [env[o.name] for o in node.args[0]]
        body = json.dumps({"program": program, "consts": consts, "outputs": outputs}).encode()
        return Lowered(MAGIC + struct.pack("<I", len(body)) + body, {"compiler": "sink", "ops": len(program)})


class SinkRuntime:
    loaded = 0
    released = 0

    def is_available(self) -> tuple[bool, str]:
        return True, ""

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, str]) -> Any:
        data = bytes(blob)
        if data[:4] != MAGIC:
            raise ValueError("not a sink blob")
        (n,) = struct.unpack("<I", data[4:8])
        SinkRuntime.loaded += 1
        return {**json.loads(data[8:8 + n]), "check": options.get("check") == "1"}

    def execute(self, handle: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        tmps: list[Any] = []

        def get(ref: list[Any]) -> Any:
            kind, i = ref
            return {"input": lambda: inputs[i], "const": lambda: np.asarray(handle["consts"][i], dtype=np.float32),
                    "tmp": lambda: tmps[i], "scalar": lambda: i}[kind]()

        for op, args, kwargs in handle["program"]:
            out = NUMPY_OPS[op](*[get(a) for a in args], **kwargs)
            tmps.append(np.asarray(out, dtype=np.float32))
        outs = [np.asarray(get(o), dtype=np.float32) for o in handle["outputs"]]
        if handle["check"] and not all(np.isfinite(o).all() for o in outs):
            raise FloatingPointError("sink produced a non-finite output")
        return outs

    def release(self, handle: Any) -> None:
        SinkRuntime.released += 1
