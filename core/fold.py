"""Step 2 of the pipeline: fold what the model computes from its weights alone into constants.

Some tensors of a model do not depend on its inputs: swin's shifted-window attention masks and
relative-position biases, the index tensors of ``torch.roll``, a decomposed linear layer's
transposed weight. Exported as they are, they are computed at every run, and their ops (int64
``arange`` and ``fmod``, bool ``eq`` and ``where``, ``slice_scatter``) are ones accelerators
decline: WGSL has no 64-bit integers, so vulkan left 25 delegates of torchvision's swin_t where
folded it needs far fewer. Folding evaluates them once, at partition time, with eager ATen, and
the graph reads the results as constants (``ExportedProgram`` lifted tensor constants), so every
backend sees the same smaller graph. ExecuTorch's ``constant_prop_pass`` does this for its
programs.

What is folded: ``call_function`` nodes of ATen ops (no custom or quantize/dequantize ops: a
dequantized weight stays int8 for the backend that fuses it; no random ops; no mutation) whose
inputs are all weights (parameters, buffers, lifted constants) or other folded nodes, and whose
value is at most :data:`GROWTH_BYTES` larger than the weights it is computed from (sized from the
graph before anything is evaluated); a larger one (a weight broadcast to an activation's shape, a
big ``full``) stays computed, and :attr:`Folding.kept` says why. Only the values the rest of the
graph reads become constants. Weights that only folded nodes read leave the program. A folded
int64 tensor that only serves as an index is stored int32 where its values fit.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

#: The most a folded value may exceed the bytes of the weights it is computed from: it is stored
#: in the program, where the ops it replaces took none. One MiB holds swin_t's attention masks at
#: 224x224 (64 windows of 49x49 float32: 614,656 bytes) and keeps a broadcast to a feature map's
#: shape out.
GROWTH_BYTES = 1 << 20


@dataclasses.dataclass
class Folding:
    """What :func:`fold_constants` did to one program (the report's ``folding``)."""

    #: the nodes evaluated at partition time and removed from the graph
    nodes: list[str] = dataclasses.field(default_factory=list)
    #: folded node -> the constant placeholder that holds its value now (nodes computing the same
    #: op on the same arguments share one)
    constants: dict[str, str] = dataclasses.field(default_factory=dict)
    #: bytes of the new constants, and of the weights that left the program because only folded
    #: nodes read them
    added_bytes: int = 0
    removed_bytes: int = 0
    #: nodes that could be folded but stay computed: ``{"node", "op", "bytes", "reason"}``
    kept: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def weight_tensors(ep: Any) -> dict[str, tuple[str, Any]]:
    """placeholder name -> (kind, tensor) for parameters, buffers and lifted constants."""
    sig = ep.graph_signature
    out: dict[str, tuple[str, Any]] = {}
    for name, target in sig.inputs_to_parameters.items():
        out[name] = ("parameter", ep.state_dict[target])
    for name, target in sig.inputs_to_buffers.items():
        out[name] = ("buffer", ep.state_dict[target] if target in ep.state_dict else ep.constants[target])
    for name, target in sig.inputs_to_lifted_tensor_constants.items():
        out[name] = ("constant", ep.constants[target])
    return out


#: folded program -> what was folded; weak, so the record goes with the program
_FOLDINGS: "weakref.WeakKeyDictionary[Any, Folding]" = weakref.WeakKeyDictionary()


def folding(ep: Any) -> Folding | None:
    """What :func:`fold_constants` folded to make ``ep``, or ``None`` when it did not make it."""
    return _FOLDINGS.get(ep)


def fold_constants(ep: Any, growth_bytes: int = GROWTH_BYTES) -> Any:
    """A program computing what ``ep`` computes, with the values ``ep`` computes from its weights
    alone stored as constants (module docstring). ``ep``'s graph is edited: pass a program nobody
    else holds (:func:`handoff.export.export_model` passes its fresh decomposition). Returns ``ep``
    itself when nothing folds; :func:`folding` tells what was folded."""
    import torch

    weights = weight_tensors(ep)
    graph = ep.graph
    values: dict[Any, Any] = {}
    bases: dict[Any, frozenset[str]] = {}  # folded node -> the weights it is computed from
    # folded node -> the first node computing the same op on the same arguments: a recurrent
    # layer unrolled over 32 steps transposes its weight 32 times, and is stored once
    same: dict[Any, Any] = {}
    first: dict[str, Any] = {}
    record = Folding()
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in weights:
            values[node] = weights[node.name][1]
            bases[node] = frozenset([node.name])
            same[node] = node
        elif node.op == "call_function" and _foldable(node) and all(i in values for i in node.all_input_nodes):
            # Sized from the graph before anything is allocated: a value that would grow the program
            # too much stays computed (and a crafted model cannot make partition allocate it).
            base = frozenset().union(*(bases[i] for i in node.all_input_nodes))
            size, base_bytes = _output_bytes(node), sum(_nbytes(weights[w][1]) for w in base)
            if size > base_bytes + growth_bytes:
                record.kept.append({"node": node.name, "op": str(node.target), "bytes": size,
                                    "reason": f"its value, {_describe(node.meta['val'], size)}, would store "
                                              f"{size - base_bytes} bytes more than the {base_bytes} bytes of weights "
                                              f"it is computed from (folding stores at most {growth_bytes} more)"})
                continue
            key = repr((str(node.target), torch.fx.node.map_arg((node.args, node.kwargs), lambda i: same[i].name)))
            if key in first:
                values[node] = values[first[key]]
            else:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
                try:
                    with torch.no_grad():
                        values[node] = node.target(*args, **kwargs)
                except Exception:  # noqa: BLE001 - an op eager ATen cannot evaluate here stays in the graph
                    continue
                first[key] = node
            same[node] = first[key]
            bases[node] = base
    folded = [n for n in graph.nodes if n.op == "call_function" and n in values]

    # Users first: a value read outside the folded set becomes a constant. One that is not a
    # tensor (a number from ``_local_scalar_dense``) stays computed, and what it reads is read outside.
    computed: set[Any] = set()
    stored: list[Any] = []
    for node in reversed(folded):
        if not any(u not in values or u in computed for u in node.users):
            continue
        if isinstance(values[node], torch.Tensor):
            stored.append(node)
        else:
            computed.add(node)
    if not stored:
        _FOLDINGS[ep] = record
        return ep
    return _rewrite(ep, weights, values, same, [n for n in folded if n not in computed], stored[::-1], record)


def _foldable(node: Any) -> bool:
    import operator

    import torch

    if node.target is operator.getitem:
        return True
    op = node.target
    return (isinstance(op, torch._ops.OpOverload) and op.namespace == "aten" and not op._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in op.tags)


def _narrowed(nodes: list[Any], value: Any) -> Any:
    """An int64 value that ``nodes`` compute and that only indexes (``index_select``'s index,
    ``index.Tensor``'s indices) as int32 when every element fits: accelerators index with 32-bit
    integers (WGSL has no 64-bit ones), and ATen takes either."""
    import torch

    aten = torch.ops.aten
    only_indexes = all((u.target is aten.index_select.default and u.args[2] is n and n not in u.args[:2])
                       or (u.target is aten.index.Tensor and u.args[0] is not n) for n in nodes for u in n.users)
    if (value.dtype != torch.int64 or not only_indexes or value.numel() == 0
            or value.min() < torch.iinfo(torch.int32).min or value.max() > torch.iinfo(torch.int32).max):
        return value
    return value.to(torch.int32)


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def _output_bytes(node: Any) -> int:
    """The bytes of the tensors ``node`` produces, from its traced value (nothing allocated)."""
    import torch

    return sum(_nbytes(v) for v in torch.utils._pytree.tree_leaves(node.meta.get("val"))
               if isinstance(v, torch.Tensor))


def _describe(val: Any, size: int) -> str:
    if not hasattr(val, "dtype"):  # several outputs
        return f"{size} bytes of outputs"
    return f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)} ({size} bytes)"


def _rewrite(ep: Any, weights: dict[str, tuple[str, Any]], values: dict[Any, Any], same: dict[Any, Any],
             folded: list[Any], stored: list[Any], record: Folding) -> Any:
    """``ep`` with ``stored`` read from new lifted constants (one per group of ``same`` nodes) and
    ``folded`` removed."""
    import torch
    from torch.export import ExportedProgram
    from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputSpec,
                                              TensorArgument)

    graph = ep.graph
    sig = ep.graph_signature
    first_input = next(n for n in graph.nodes if n.op != "placeholder" or n.name not in weights)
    read = {n for n in graph.nodes if n.op == "placeholder" and n.name in weights and n.users}
    constants = dict(ep.constants)
    new_specs = []
    placeholders: dict[Any, Any] = {}  # same[node] -> its constant's placeholder
    for node in stored:
        if same[node] in placeholders:
            node.replace_all_uses_with(placeholders[same[node]])
            record.constants[node.name] = placeholders[same[node]].name
            continue
        target = f"folded_{node.name}"
        with graph.inserting_before(first_input):
            placeholder = placeholders[same[node]] = graph.placeholder(f"c_{target}")
        placeholder.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(placeholder)
        group = [n for n in stored if same[n] is same[node]]
        constants[target] = _narrowed(group, values[node].detach().contiguous().clone())
        if constants[target].dtype != values[node].dtype:
            placeholder.meta["val"] = node.meta["val"].fake_mode.from_tensor(constants[target])
        new_specs.append(InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(placeholder.name), target))
        record.constants[node.name] = placeholder.name
        record.added_bytes += _nbytes(constants[target])
    for node in reversed(folded):
        record.nodes.append(node.name)
        graph.erase_node(node)
    record.nodes.reverse()
    dropped = {n.name: n for n in read if not n.users}  # read before, by folded nodes only
    for name, node in dropped.items():
        record.removed_bytes += _nbytes(weights[name][1])
        graph.erase_node(node)
    kept_specs = [s for s in sig.input_specs if s.arg.name not in dropped]
    at = next((i for i, s in enumerate(kept_specs) if s.kind == InputKind.USER_INPUT), len(kept_specs))
    out_specs = [OutputSpec(s.kind, TensorArgument(record.constants[s.arg.name]), s.target)
                 if isinstance(s.arg, TensorArgument) and s.arg.name in record.constants else s
                 for s in sig.output_specs]
    used = {s.target for s in kept_specs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    state_dict = {k: v for k, v in ep.state_dict.items() if k in used}
    used |= {s.target for s in kept_specs + new_specs if s.kind is InputKind.CONSTANT_TENSOR}
    constants = {k: v for k, v in constants.items() if k in used or not isinstance(v, torch.Tensor)}
    graph.lint()
    folded_ep = ExportedProgram(root=ep.graph_module, graph=graph,
                                graph_signature=ExportGraphSignature(kept_specs[:at] + new_specs + kept_specs[at:],
                                                                     out_specs),
                                state_dict=state_dict, range_constraints=ep.range_constraints,
                                module_call_graph=ep.module_call_graph, example_inputs=ep.example_inputs,
                                constants=constants, verifiers=ep.verifiers)
    _FOLDINGS[folded_ep] = record
    return folded_ep
