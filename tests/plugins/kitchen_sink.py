"""A test plugin that implements every hook of handoff.hookspecs, and every method of
:class:`handoff.Compiler` and :class:`handoff.Runtime`: the template for a new backend.

Its two backends, ``sink`` and ``sinkb``, are small but real: the compiler serialises a partition
into a list of elementwise ops plus weights, and the runtime interprets that list with numpy. Which
ATen ops each claims is an option (``ops``), so tests can build any mix of claimed and declined
nodes; ``fail_on`` makes lowering fail at an op; ``fuse`` reports mul->relu pairs as fused patterns;
``max_nodes`` makes ``check_partition`` shrink partitions larger than that; ``wrong_op`` makes the
lowered delegate compute an op wrongly (its result off by :data:`WRONG_BY`), for tests that must
find the delegate carrying an error. Its int8 quantizer (``quantizer``) annotates the ``mul`` ops
it claims (int8 per-tensor inputs and output); it runs them in float between the dequantize and
quantize ops, which it leaves to the next backend.

At run time, ``check=1`` refuses non-finite outputs, ``fail_load=1`` makes loading every blob fail,
``$HANDOFF_SINK_UNAVAILABLE`` (comma-separated backend ids) makes those runtimes report that they
cannot run here (both for tests of fallback copies), and ``memory=device`` makes a backend behave
like a device runtime: its outputs are :class:`SinkTensor` objects (memory domain ``"sink:device"``,
shared by ``sink`` and ``sinkb``), which ``to_host`` copies into numpy. ``sinkb`` is not reentrant:
as a GPU runtime may, it writes every call's outputs into the same buffers of its delegate, and it
raises if two calls of one delegate ever overlap.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from handoff import (PLUGIN_API_VERSION, BackendSpec, Compiler, Lowered, LoweringError, Option, ResolvedModel,
                     Runtime, ZooModel, first_failing, hookimpl, partition_source)

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
OPTIONS = {"ops": Option("str", "comma-separated ATen ops to claim", default=DEFAULT_OPS),
           "fail_on": Option("str", "an ATen op whose lowering fails"),
           "crash_on": Option("str", "an ATen op whose lowering raises a plain error that names no node"),
           "fuse": Option("bool", "report mul->relu pairs as fused patterns", default=False),
           "max_nodes": Option("int", "check_partition takes nodes out of partitions larger than this", min=1),
           "wrong_op": Option("str", "an ATen op the lowered delegate computes wrongly (off by WRONG_BY)")}
RUNTIME_OPTIONS = {"check": Option("bool", "refuse non-finite outputs", default=False),
                   "memory": Option("choice", "where outputs live: host (numpy) or device (SinkTensor)",
                                    default="host", choices=("host", "device")),
                   "fail_load": Option("bool", "loading any blob fails", default=False)}
UNAVAILABLE_ENV = "HANDOFF_SINK_UNAVAILABLE"
DEVICE_MEMORY = "sink:device"
MAGIC = b"SINK"
WRONG_BY = 0.25  # what a ``wrong_op`` adds to that op's result

calls: list[str] = []  # hooks called, for the tests
reused: list[str] = []  # partitions preprocess lowered from what support translated, for the tests


@hookimpl
def handoff_backends() -> list[BackendSpec]:
    calls.append("handoff_backends")
    runtimes = {"sink": "SinkRuntime", "sinkb": "SinkBRuntime"}
    return [BackendSpec(id=bid, version="9.9", compiler=f"{__name__}:SinkCompiler", runtime=f"{__name__}:{runtime}",
                        description=f"kitchen-sink test backend {bid}", options=OPTIONS,
                        runtime_options=RUNTIME_OPTIONS, api_version=PLUGIN_API_VERSION)
            for bid, runtime in runtimes.items()]


@hookimpl
def handoff_catalog() -> dict[str, dict[str, Any]]:
    calls.append("handoff_catalog")
    return {bid: {"distribution": "kitchen-sink", "module": "kitchen_sink", "entry_point": "kitchen_sink",
                  "device": "cpu", "platforms": ["any"], "compiler": {"name": "numpy", "version": np.__version__},
                  "install": "tests/plugins/kitchen_sink.py (HANDOFF_PLUGINS=kitchen_sink)",
                  "description": f"kitchen-sink test backend {bid}"} for bid in ("sink", "sinkb")}


@hookimpl
def handoff_zoo_models() -> dict[str, ZooModel]:
    calls.append("handoff_zoo_models")
    return {"sink_net": ZooModel(f"{__name__}:sink_net", [((2, 8), "float32")], "add/mul/relu/sin chain")}


@hookimpl
def handoff_resolve_model(spec: str, input_shapes: Sequence[Any], zoo: Mapping[str, ZooModel],
                          trust_model: bool) -> ResolvedModel | None:
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


class SinkCompiler(Compiler):
    def __init__(self, options: Mapping[str, Any]):
        super().__init__(options)
        self.ops = set(options["ops"].split(","))
        unknown = self.ops - set(NUMPY_OPS)
        if unknown:
            raise ValueError(f"ops {sorted(unknown)} unknown; valid: {', '.join(NUMPY_OPS)}")
        self.fail_on = options["fail_on"]
        self.crash_on = options["crash_on"]
        self.fuse = options["fuse"]
        self.max_nodes = options["max_nodes"]
        self.wrong_op = options["wrong_op"]
        self.checked: list[list[str]] = []  # partitions check_partition saw, for the tests
        #: (the program support judged, its translation): what preprocess reuses when its
        #: partition is that whole program (handoff.partition_source)
        self.translated: tuple[Any, Lowered] | None = None

    def ops_to_not_decompose(self) -> list[Any]:
        return []

    def check_partition(self, ep: Any, nodes: Sequence[str]) -> dict[str, str]:
        self.checked.append(list(nodes))
        if self.max_nodes is None:
            return {}

        def check(names: list[str]) -> str | None:  # a "compile" that fails on too many nodes
            return None if len(names) <= self.max_nodes else f"sink compiles at most {self.max_nodes} nodes together"

        return {node: message for node, message, _ in first_failing(check, nodes)}

    def cache_key(self) -> str:
        return f"numpy {np.__version__}"

    def quantizer(self, scheme: str) -> Any:
        if scheme != "int8" or "aten.mul.Tensor" not in self.ops:
            return None
        return _sink_quantizer()

    def support(self, ep: Any) -> dict[str, str | None]:
        out = {}
        for node in ep.graph.nodes:
            if node.op == "call_function":
                op = str(node.target)
                out[node.name] = None if op in self.ops else f"sink has no kernel for {op}"
        if all(reason is None for reason in out.values()):  # the whole program may become one partition
            try:
                self.translated = (ep, self._translate(ep))
            except (LoweringError, RuntimeError):  # fail_on, crash_on: preprocess translates again and fails
                self.translated = None
        return out

    def fused_patterns(self, ep: Any) -> list[list[str]]:
        if not self.fuse:
            return []
        return [[n.args[0].name, n.name] for n in ep.graph.nodes
                if str(n.target) == "aten.relu.default" and str(getattr(n.args[0], "target", "")) == "aten.mul.Tensor"]

    def preprocess(self, ep: Any, name: str) -> Lowered:
        translated, self.translated = self.translated, None  # used once: bounded to one program
        source = partition_source(ep)
        if translated is not None and source is not None and source.whole and source.program is translated[0]:
            reused.append(name)
            return translated[1]
        return self._translate(ep)

    def _translate(self, ep: Any) -> Lowered:
        """``ep`` as the sink's op list; :class:`LoweringError` at the first op it cannot run."""
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
                program.append([op, args, dict(node.kwargs), WRONG_BY if op == self.wrong_op else 0.0])
                env[node.name] = ["tmp", len(program) - 1]
            elif node.op == "output":
                outputs = [env[o.name] for o in node.args[0]]
        body = json.dumps({"program": program, "consts": consts, "outputs": outputs}).encode()
        return Lowered(MAGIC + struct.pack("<I", len(body)) + body, {"compiler": "sink", "ops": len(program)})


def _sink_quantizer() -> Any:
    """A PT2E quantizer annotating every unannotated float ``mul`` (torchao imported only here)."""
    import torch
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    act = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                           is_dynamic=False, observer_or_fake_quant_ctr=MinMaxObserver)

    class SinkQuantizer(Quantizer):
        def annotate(self, model: Any) -> Any:
            for node in model.graph.nodes:
                if node.target is torch.ops.aten.mul.Tensor and Q_ANNOTATION_KEY not in node.meta:
                    tensors = {a: act for a in node.args if isinstance(a, torch.fx.Node)}
                    node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(tensors, act, _annotated=True)
            return model

        def validate(self, model: Any) -> None:
            pass

    return SinkQuantizer()


class SinkTensor:
    """A "device value" of the kitchen sink: data the core must not read (it has no
    ``__dlpack__``), only hand to a sink runtime or give to ``to_host``."""

    __slots__ = ("_data", "dtype", "shape")

    def __init__(self, data: np.ndarray) -> None:
        self._data, self.shape, self.dtype = data, data.shape, data.dtype


class SinkRuntime(Runtime):
    backend = "sink"
    loaded = 0
    released = 0
    reentrant = True  # execute keeps no state in the handle but its last stats
    fresh_outputs = True  # host outputs are new arrays (an input handed back is copied: _compute)

    def is_available(self) -> tuple[bool, str]:
        if self.backend in os.environ.get(UNAVAILABLE_ENV, "").split(","):
            return False, f"switched off by ${UNAVAILABLE_ENV}"
        return True, ""

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
        if options["fail_load"]:
            raise RuntimeError(f"{self.backend}: refusing to load (fail_load=1)")
        data = bytes(blob)
        if data[:4] != MAGIC:
            raise ValueError("not a sink blob")
        (n,) = struct.unpack("<I", data[4:8])
        SinkRuntime.loaded += 1
        return {**json.loads(data[8:8 + n]), "check": options["check"], "device": options["memory"] == "device",
                "last": {}, "buffers": None, "busy": threading.Lock()}

    def memory(self, handle: Any) -> str:
        return DEVICE_MEMORY if handle["device"] else "host"

    def execute(self, handle: Any, inputs: Sequence[Any]) -> list[Any]:
        outs = self._compute(handle, [v._data if isinstance(v, SinkTensor) else v for v in inputs])
        if handle["check"] and not all(np.isfinite(o).all() for o in outs):
            raise FloatingPointError("sink produced a non-finite output")
        handle["last"] = {"ops": len(handle["program"])}
        return [SinkTensor(o) for o in outs] if handle["device"] else outs

    def _compute(self, handle: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        tmps: list[Any] = []

        def get(ref: list[Any]) -> Any:
            kind, i = ref
            return {"input": lambda: inputs[i], "const": lambda: np.asarray(handle["consts"][i], dtype=np.float32),
                    "tmp": lambda: tmps[i], "scalar": lambda: i}[kind]()

        for op, args, kwargs, *wrong in handle["program"]:
            offset = wrong[0] if wrong else 0.0  # blobs from before wrong_op (golden_v1_3.hof) have none
            out = NUMPY_OPS[op](*[get(a) for a in args], **kwargs)
            tmps.append(np.asarray(out + offset, dtype=np.float32))
        return [np.array(get(o), dtype=np.float32) for o in handle["outputs"]]  # new arrays: fresh_outputs

    def to_host(self, values: Sequence[Any]) -> list[np.ndarray]:
        return [np.array(v._data) for v in values]  # copies: a device's memory is not the host's

    def stats(self, handle: Any) -> Mapping[str, Any]:
        return handle["last"]

    def release(self, handle: Any) -> None:
        SinkRuntime.released += 1


class SinkBRuntime(SinkRuntime):
    """``sinkb``: not reentrant, and with ``memory=device`` it reuses its output buffers."""

    backend = "sinkb"
    reentrant = False

    def execute(self, handle: Any, inputs: Sequence[Any]) -> list[Any]:
        if not handle["busy"].acquire(blocking=False):
            raise RuntimeError("sinkb: execute entered twice at once on one delegate (the core must serialise it)")
        try:
            outs = super().execute(handle, inputs)
            if not handle["device"]:
                return outs
            if handle["buffers"] is None:
                handle["buffers"] = [SinkTensor(np.empty_like(o._data)) for o in outs]
            for buffer, out in zip(handle["buffers"], outs):
                buffer._data[...] = out._data  # the previous call's outputs are overwritten here
            return handle["buffers"]
        finally:
            handle["busy"].release()
