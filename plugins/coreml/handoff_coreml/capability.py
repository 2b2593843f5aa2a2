"""Which nodes Core ML takes: coremltools' own torch frontend, asked about every node in one pass.

Two layers, both checked against real conversions by ``tools/check_op_table.py``:

1. **Rules** (:func:`rule_reason`) for what coremltools converts *silently wrong* or what a Core ML
   model cannot hold, so a successful translation would not reveal it: Core ML has no 64-bit
   types (coremltools narrows int64 to int32, wrapping values beyond 2**31, and computes float64
   in float32), no int8/uint8/int16 tensors in its torch frontend, at most rank 5, float16
   features only from iOS16/macOS13, static shapes here; and the ops ExecuTorch's Core ML
   partitioner declines for upstream bugs that no conversion shows (``diagonal`` computes wrong
   results, ``argmax``/``argmin`` over the flattened input crash at run time).
2. **Translation** (:func:`translate`): one pass over the whole program with coremltools' own
   registered conversion function for each node (``_TORCH_OPS_REGISTRY``, exactly what
   ``coremltools.convert`` runs), building real MIL ops for the chosen deployment target, so MIL's
   type inference enforces each op's constraints (argument counts, dtypes, ranks, which opset has
   the op). Weights are MIL constants, as in a conversion. A node whose translation fails is
   declined with coremltools' message; its outputs become stand-in MIL placeholders of the right
   type, so every later node is still judged, as it would be when the declined node runs
   elsewhere and feeds the Core ML partition from outside. A translation whose output shape or
   dtype differs from torch's is declined too.

The pass costs one frontend translation of the program (no MIL passes, no serialisation): about
0.2 s for the zoo transformer and 0.8 s for MobileNetV2 here. What only fails in context (a MIL
pass, an input that is constant in the whole program but not in a partition) is caught after
planning by :meth:`handoff_coreml.compiler.CoreMLCompiler.check_partition`.

Imports torch and coremltools: used by the compiler and the check tool only.
"""

from __future__ import annotations

import operator
from typing import Any, Mapping

import torch

from . import COREMLTOOLS_VERSION
from ._quiet import quiet

with quiet():
    from coremltools.converters.mil._deployment_compatibility import AvailableTarget
    from coremltools.converters.mil.frontend.torch.converter import TranscriptionContext
    from coremltools.converters.mil.frontend.torch.internal_graph import InternalTorchIRNode
    from coremltools.converters.mil.frontend.torch.ops import convert_single_node
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
    from coremltools.converters.mil.frontend.torch.utils import (
        TORCH_DTYPE_TO_MIL_DTYPE,
        TorchFrontend,
        sanitize_op_kind,
    )
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, types
    from coremltools.converters.mil.mil.var import Var

A = torch.ops.aten
CT = f"coremltools {COREMLTOOLS_VERSION}"
MAX_RANK = 5
#: dtypes coremltools' torch frontend maps to Core ML types as they are (int64: see INDEX_*).
DTYPES = frozenset({torch.float32, torch.float16, torch.int32, torch.bool})
#: Arguments that are index tensors: int64 is allowed there, since valid indices are bounded by a
#: dimension size and survive the narrowing to int32.
INDEX_ARGS: dict[Any, tuple[int, ...]] = {
    A.embedding.default: (1,), A.index_select.default: (2,), A.gather.default: (2,), A.index.Tensor: (1,),
}
#: Outputs that are indices (int64 allowed, same argument).
INDEX_OUTPUTS: dict[Any, tuple[int, ...]] = {
    A.argmax.default: (0,), A.argmin.default: (0,), A.max.dim: (1,), A.min.dim: (1,), A.topk.default: (1,),
    A.sort.default: (1,),
}
#: Ops coremltools converts but that fail on the device, from ExecuTorch's Core ML partitioner
#: (executorch/backends/apple/coreml/partition/coreml_partitioner.py); Linux cannot show these.
KNOWN_BAD: dict[Any, str] = {
    A.diagonal.default: "Core ML computes aten.diagonal wrong (apple/coremltools#2565; ExecuTorch's Core ML "
                        "partitioner declines it too)",
    A.diagonal_copy.default: "Core ML computes aten.diagonal_copy wrong (apple/coremltools#2565; ExecuTorch's "
                             "Core ML partitioner declines it too)",
}
#: Ops whose trailing default arguments torch.export omits but coremltools' conversion counts
#: (it was written for TorchScript, which spells every argument out): they are filled in from
#: the op's schema before translation and conversion.
FILL_DEFAULTS = frozenset({A.max_pool2d_with_indices.default, A.max_pool2d.default, A.max_pool1d.default,
                           A.max_pool3d_with_indices.default, A.avg_pool2d.default, A.avg_pool1d.default,
                           A.avg_pool3d.default, A.hardtanh.default})
#: Deployment target name -> coremltools' opset.
TARGETS: Mapping[str, AvailableTarget] = {name: getattr(AvailableTarget, name) for name in
                                          ("iOS15", "iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")}


def op_name(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", repr(target))


def registered(target: Any) -> bool:
    """Whether coremltools' torch frontend has a conversion for ``target`` (its own lookup)."""
    try:
        kind = target.name() if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    except Exception:
        return False
    return _TORCH_OPS_REGISTRY.get_func(sanitize_op_kind(kind)) is not None


def filled_args(node: torch.fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of ``node`` as TorchScript spells them, which is how coremltools' conversion
    functions read them: keyword arguments that the schema allows positionally become positional
    (most conversions read positions only, and would silently drop the keyword), with the defaults
    in between spelled out; for :data:`FILL_DEFAULTS` ops every omitted trailing default too.
    Keyword-only arguments stay keywords: a conversion that never looks one up declines the node
    (``_ignored_kwarg``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return tuple(node.args), dict(node.kwargs)
    positional = [a for a in schema.arguments if not a.kwarg_only]
    wanted = [i for i, a in enumerate(positional) if a.name in node.kwargs]
    last = len(positional) - 1 if node.target in FILL_DEFAULTS else max(wanted, default=-1)
    args, kwargs = list(node.args), dict(node.kwargs)
    first = _val(args[0]) if args else None
    floating = isinstance(first, torch.Tensor) and first.is_floating_point()
    for arg in positional[len(args):last + 1]:
        if arg.name in kwargs:
            value = kwargs.pop(arg.name)
        elif arg.has_default_value():
            value = arg.default_value
            if floating and str(arg.type) == "Scalar" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # hardtanh's -1 and 1: MIL's clip wants bounds of x's dtype
        else:
            break
        args.append(torch.fx.immutable_collections.immutable_list(value) if isinstance(value, list) else value)
    return tuple(args), kwargs


def fill_defaults(ep: torch.export.ExportedProgram) -> None:
    """Spell out every node's arguments as :func:`filled_args` does, in place (for conversion)."""
    changed = False
    for node in ep.graph.nodes:
        if node.op == "call_function":
            args, kwargs = filled_args(node)
            if args != tuple(node.args) or kwargs != dict(node.kwargs):
                node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        ep.graph_module.recompile()


# -- layer 1: rules --------------------------------------------------------------------------------
def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else None


def _leaves(values: Any) -> list[torch.Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]


def _used_outputs(node: torch.fx.Node) -> tuple[list[Any], list[int]]:
    val = node.meta.get("val")
    if not isinstance(val, (list, tuple)):
        return [val], [0]
    used = sorted({u.args[1] for u in node.users if u.target is operator.getitem})
    return [val[i] for i in used], used


def rule_reason(node: torch.fx.Node, target: str) -> str | None:
    """Why Core ML must not take ``node`` although coremltools may convert it, or ``None``."""
    op = node.target
    name = op_name(op)
    if op in KNOWN_BAD:
        return KNOWN_BAD[op]
    if op in (A.argmax.default, A.argmin.default) and (node.args[1] if len(node.args) > 1
                                                         else node.kwargs.get("dim")) is None:
        return (f"{name} over the flattened input (dim=None) crashes Core ML at run time (pytorch/executorch#11715; "
                f"ExecuTorch's Core ML partitioner declines it too); flatten and pass dim=0")
    if not registered(op):
        return f"{CT}'s torch frontend has no conversion for {name}"
    outputs, used = _used_outputs(node)
    index_ids = {id(t) for i in INDEX_ARGS.get(op, ()) if i < len(node.args)
                 for t in _leaves([_val(a) for a in torch.utils._pytree.tree_leaves(node.args[i])])}
    index_ids |= {id(t) for i, v in zip(used, outputs) if i in INDEX_OUTPUTS.get(op, ()) for t in _leaves([v])}
    tensors = _leaves([_val(n) for n in node.all_input_nodes]) + _leaves(outputs)
    for t in tensors:
        if t.dtype == torch.int64 and id(t) not in index_ids:
            return ("int64 tensors are not supported by Core ML (coremltools narrows them to int32, silently "
                    "wrapping values beyond 2**31); cast to int32 in the model")
        if t.dtype == torch.float64:
            return "float64 tensors are not supported by Core ML (coremltools computes them in float32); cast to " \
                   "float32 in the model"
        if t.dtype not in DTYPES and t.dtype != torch.int64:
            return (f"dtype {str(t.dtype).removeprefix('torch.')} is not supported by {CT}'s torch frontend "
                    f"(Core ML tensors: float32, float16, int32, bool)")
        if t.dtype == torch.float16 and TARGETS[target] < AvailableTarget.iOS16:
            return ("float16 tensors need deployment target iOS16/macOS13 or newer (Core ML has float16 inputs and "
                    "outputs from there): --option coreml.deployment_target=iOS16")
        if t.dim() > MAX_RANK:
            return f"rank-{t.dim()} tensors are not supported by Core ML (at most {MAX_RANK} dimensions)"
        if any(not isinstance(d, int) for d in t.shape):
            return "dynamic shapes are not supported by handoff-coreml (it converts static shapes only)"
    return None


# -- layer 2: translation ----------------------------------------------------------------------------
def _placeholder(t: torch.Tensor) -> Any:
    with quiet():  # a rank-0 placeholder logs a warning
        return mb.placeholder(shape=tuple(int(d) for d in t.shape), dtype=TORCH_DTYPE_TO_MIL_DTYPE[t.dtype],
                              allow_rank0_input=True)  # a scalar flowing in, e.g. a mean over everything


def _mil_dtype(t: torch.Tensor) -> Any:
    return TORCH_DTYPE_TO_MIL_DTYPE.get(t.dtype)


def _mismatch(node: torch.fx.Node, produced: Any) -> str | None:
    """How coremltools' translation of ``node`` differs from torch in shape or dtype, if it does."""
    val = node.meta.get("val")
    want = list(val) if isinstance(val, (list, tuple)) else [val]
    got = list(produced) if isinstance(produced, (list, tuple)) else [produced]
    _, used = _used_outputs(node)
    for i in used:
        w = want[i] if i < len(want) else None
        g = got[i] if i < len(got) else None
        if not isinstance(w, torch.Tensor):
            continue
        if not isinstance(g, Var):
            return f"{CT} produces no value for output {i} of {op_name(node.target)}"
        if types.is_tensor(g.sym_type) or types.is_scalar(g.sym_type):
            shape = tuple(g.shape) if types.is_tensor(g.sym_type) else ()
            if shape != tuple(w.shape) and not (tuple(w.shape) == () and shape == (1,)):
                return (f"{CT} converts {op_name(node.target)} to a result of shape {list(shape)}, torch's has "
                        f"shape {list(w.shape)}")
            if _mil_dtype(w) is not None and g.dtype != _mil_dtype(w):
                return (f"{CT} converts {op_name(node.target)} to a {types.builtin_to_string(g.dtype)} result, "
                        f"torch's is {str(w.dtype).removeprefix('torch.')}")
    return None


def translate(ep: torch.export.ExportedProgram, target: str, nodes: Any = None) -> dict[str, str | None]:
    """Translate every ``call_function`` node of ``ep`` (or only ``nodes``, names) with
    coremltools' conversion functions for the opset of ``target``, in one pass: ``{node: None or
    coremltools' reason}``. Nodes a rule declines (:func:`rule_reason`) are not translated."""
    sig = ep.graph_signature
    weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    wanted = None if nodes is None else set(nodes)
    placeholders = {}
    user = []
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name not in weights and isinstance(_val(n), torch.Tensor) \
                and _val(n).dtype in TORCH_DTYPE_TO_MIL_DTYPE:
            user.append(n)
            placeholders[n.name] = _placeholder(_val(n))
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    for n in calls:  # stand-ins for the outputs of nodes that end up declined
        for i, t in enumerate(_leaves_indexed(n)):
            if t is not None and t.dtype in TORCH_DTYPE_TO_MIL_DTYPE and all(isinstance(d, int) for d in t.shape):
                placeholders[_stand_in_name(n, i)] = _placeholder(t)
    context = TranscriptionContext(frontend=TorchFrontend.TORCHEXPORT)
    reasons: dict[str, str | None] = {}
    with quiet(), Function(placeholders, opset_version=TARGETS[target]) as fn:
        for n in user:
            context.add(fn.inputs[n.name], torch_name=n.name)
        for n in ep.graph.nodes:
            if n.op == "placeholder" and n.name in weights:
                tensor = ep.state_dict.get(weights[n.name], ep.constants.get(weights[n.name]))
                if isinstance(tensor, torch.Tensor) and tensor.dtype in TORCH_DTYPE_TO_MIL_DTYPE:
                    context.add(mb.const(val=tensor.detach().cpu().numpy(), name=n.name), torch_name=n.name)
        for n in calls:
            reason = None
            if n.target is not operator.getitem:
                reason = rule_reason(n, target)
            if reason is None:
                try:
                    internal = _internal_node(n)
                    convert_single_node(context, internal)
                    if n.target is not operator.getitem:
                        reason = _ignored_kwarg(n, internal.kwinputs) or _mismatch(n, context[n.name])
                except Exception as exc:
                    reason = f"{CT} cannot convert {op_name(n.target)}: {_message(exc)}"
            if reason is not None:
                _stand_in(context, fn, n)
            if wanted is None or n.name in wanted:
                reasons[n.name] = reason
    # the core keeps a getitem with its producer: a getitem coremltools cannot bind declines the producer
    for n in calls:
        if n.target is operator.getitem and reasons.get(n.name) and reasons.get(n.args[0].name) is None \
                and n.args[0].name in reasons:
            reasons[n.args[0].name] = reasons[n.name]
    return reasons


def _leaves_indexed(node: torch.fx.Node) -> list[torch.Tensor | None]:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return [v if isinstance(v, torch.Tensor) else None for v in vals]


def _internal_node(node: torch.fx.Node) -> Any:
    internal = InternalTorchIRNode.from_exir_node(node=_Filled(node))
    if internal.kwinputs:
        internal.kwinputs = _ReadKeys(internal.kwinputs)
    return internal


class _ReadKeys(dict):
    """A node's keyword arguments as coremltools' conversion functions see them, remembering which
    ones they looked up (they read keywords with ``kwinputs.get(name)``, each function its own)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)


#: Keyword arguments that change where or how a tensor is stored, not its values.
_STORAGE_KWARGS = frozenset({"device", "layout", "pin_memory", "memory_format", "non_blocking"})


def _ignored_kwarg(node: torch.fx.Node, kwinputs: Any) -> str | None:
    """A keyword-only argument of ``node`` that changes its result but that coremltools' conversion
    never looked up (it would convert the op as if the argument had its default), or ``None``."""
    read = kwinputs.read if isinstance(kwinputs, _ReadKeys) else set()
    schema = getattr(node.target, "_schema", None)
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()} if schema else {}
    for key, value in filled_args(node)[1].items():  # the keyword-only ones: the others became positional
        if value is None or key in read or key in _STORAGE_KWARGS:
            continue
        if key in defaults and _same(value, defaults[key]):
            continue
        return (f"{CT} ignores the keyword argument {key}={value!r} of {op_name(node.target)} (its conversion "
                f"reads only other arguments), so it would compute a different result")
    return None


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default) and isinstance(value, bool) == isinstance(default, bool)
    except Exception:  # values that do not compare as scalars or lists
        return False


class _Filled:
    """``node`` with its arguments spelled out (:func:`filled_args`), for
    ``InternalTorchIRNode.from_exir_node`` (which reads only these fields): the program itself is
    shared with other backends."""

    def __init__(self, node: torch.fx.Node):
        self.target, self.name, self.meta = node.target, node.name, node.meta
        self.args, self.kwargs = filled_args(node)


def _stand_in_name(node: torch.fx.Node, index: int) -> str:
    return f"_handoff_stand_in_{node.name}_{index}"


def _stand_in(context: Any, fn: Any, node: torch.fx.Node) -> None:
    """Bind a declined node's outputs to placeholders of their type, so its users are judged as
    they would be with the node outside the partition."""
    vals = node.meta.get("val")
    ins = [fn.inputs.get(_stand_in_name(node, i)) for i in range(len(_leaves_indexed(node)))]
    value = tuple(ins) if isinstance(vals, (list, tuple)) else ins[0]
    if value is not None:
        context.add(value, torch_name=node.name, override=True)


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (AssertionError, KeyError, IndexError, TypeError)):
        text = f"{type(exc).__name__}: {text}"
    return text[:300]

