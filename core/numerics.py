"""Per-delegate numerics: which delegate of a program carries its numerical error.

A whole-program comparison with eager PyTorch says *that* outputs are off, not where. Here each
delegate is checked on its own: the exported graph the program was partitioned from is evaluated
eagerly (``torch.fx.Interpreter``, every node's value kept), each delegate is cut out as a
one-delegate program (its blob, a manifest whose inputs and outputs are the delegate's), loaded
with :func:`handoff.load`, and run on the eager values at its boundary. Its outputs are compared
with the eager values of the same nodes, so an error points at one delegate and its ops, and
does not leak into the delegates after it.

The program's values name the graph nodes that produce them (the manifest's optional
``values[i].node``, ``docs/format.md`` §4.3); programs written before it existed cannot be
checked this way. Splitting the work: :func:`delegate_cases` (needs torch, in the process that
exported the model) and :func:`run_case` (runtime only, no torch: ``handoff compare`` runs it in
the strategy's own worker process).
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from typing import Any, Mapping, Sequence

import numpy as np

from .bench import errors
from .errors import HandoffError, one_line
from .program import ProgramFile, program_bytes

#: A delegate whose outputs differ from eager by more than this, relative to the largest eager
#: magnitude of the output, is reported as a mismatch (``--tolerance``).
DEFAULT_TOLERANCE = 1e-3


@dataclasses.dataclass
class DelegateCase:
    """One delegate as a program of its own, with the eager values at its boundary."""

    delegate: int  # index in the program's delegates
    backend: str
    partition: str
    ops: dict[str, int]  # the ATen ops it runs (those its outputs depend on), with counts
    program: bytes  # the one-delegate program
    inputs: list[np.ndarray]  # eager values of its inputs, in order
    expected: list[np.ndarray]  # eager values of its outputs, in order


def eager_values(ep: Any, inputs: Sequence[Any]) -> dict[str, Any]:
    """Run ``ep`` (an ``ExportedProgram``) eagerly on ``inputs`` (its user inputs, tensors or
    arrays) and return every node's value by node name: placeholders (weights included),
    intermediate values and the outputs."""
    import torch
    import torch.fx

    from .fold import weight_tensors

    weights = weight_tensors(ep)
    user = iter(torch.as_tensor(x) for x in inputs)
    args = []
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in weights:
            args.append(weights[node.name][1])
        else:
            try:
                args.append(next(user))
            except StopIteration:
                raise HandoffError(f"the exported program takes {len(ep.graph_signature.user_inputs)} input(s), "
                                   f"got {len(inputs)}") from None
    interpreter = torch.fx.Interpreter(ep.graph_module, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*args)
    return {node.name: value for node, value in interpreter.env.items()}


def delegate_cases(program: ProgramFile, ep: Any, inputs: Sequence[Any],
                   values: Mapping[str, Any] | None = None, signer: Any = None) -> list[DelegateCase]:
    """Every delegate of ``program`` as a :class:`DelegateCase`, its boundary values taken from
    an eager run of ``ep`` (the decomposed graph it was partitioned from) on ``inputs``
    (``values``: that run's :func:`eager_values`, when the caller has it already).

    :param signer: signs each one-delegate program (``handoff.signing.LocalKey``) so that its
        native code loads. Pass one only when ``program`` itself is trusted: made in this process,
        or loaded already with the runtime's trust checks."""
    m = program.manifest
    values = eager_values(ep, inputs) if values is None else values
    nodes = {n.name: n for n in ep.graph.nodes}
    cases = []
    for ins in m["instructions"]:
        if ins["op"] != "delegate":
            continue
        d = ins["delegate"]
        entry = m["delegates"][d]
        ins_nodes = [_node_of(m, v, values, program.name) for v in ins["inputs"]]
        out_nodes = [_node_of(m, v, values, program.name) for v in ins["outputs"]]
        cases.append(DelegateCase(
            delegate=d, backend=entry["backend"], partition=entry["partition"],
            ops=_ops_between(nodes, ins_nodes, out_nodes),
            program=_one_delegate_program(m, ins, bytes(program.segment(entry["segment"])), signer),
            inputs=[_array(values[_node_of(m, v, values, program.name)], m["values"][v], v)
                    for v in dict.fromkeys(ins["inputs"])],
            expected=[_array(values[n], m["values"][v], v) for n, v in zip(out_nodes, ins["outputs"])]))
    return cases


def run_case(case: DelegateCase, options: Mapping[str, Mapping[str, Any]] | None = None,
             plugins: Any = None) -> dict[str, Any]:
    """Load ``case``'s one-delegate program, run it on its eager inputs and compare its outputs
    with the eager ones. Returns the :func:`handoff.bench.errors` figures plus the delegate's
    identity, ``relative_error`` (max abs error over the largest eager magnitude), or
    ``skipped`` with the reason when the delegate cannot run here."""
    from .runtime import load

    row = summary(case)
    try:
        ok, why = _runtime_available(case.backend, plugins)
        if not ok:
            return {**row, "skipped": f"backend '{case.backend}' cannot run here: {why}"}
        with load(case.program, options={k: v for k, v in (options or {}).items() if k == case.backend},
                  plugins=plugins) as program:
            got = program.run(case.inputs)
    except HandoffError as exc:
        return {**row, "skipped": str(exc)}
    except Exception as exc:  # a runtime's stray exception is this delegate's result, not the run's end
        return {**row, "skipped": f"backend '{case.backend}' failed: {one_line(exc, 300)}"}
    figures = errors(got, case.expected)
    scale = max((float(np.max(np.abs(e.astype(np.float64)), initial=0.0)) for e in case.expected
                 if np.issubdtype(e.dtype, np.floating)), default=0.0)
    rel = figures["max_abs_error"] / scale if scale else figures["max_abs_error"]
    return {**row, **figures, "relative_error": rel}


def summary(case: DelegateCase) -> dict[str, Any]:
    """The identity of a case, as reported: delegate index, backend, partition and its ops."""
    return {"delegate": case.delegate, "backend": case.backend, "partition": case.partition,
            "nodes": sum(case.ops.values()), "ops": dict(case.ops)}


def check_delegates(program: ProgramFile, ep: Any, inputs: Sequence[Any],
                    options: Mapping[str, Mapping[str, Any]] | None = None, plugins: Any = None,
                    tolerance: float = DEFAULT_TOLERANCE, signer: Any = None) -> list[dict[str, Any]]:
    """:func:`run_case` for every delegate of ``program`` in this process, each row marked
    ``mismatch`` when its relative error exceeds ``tolerance`` (``signer`` as for
    :func:`delegate_cases`)."""
    rows = [run_case(case, options, plugins) for case in delegate_cases(program, ep, inputs, signer=signer)]
    return mark(rows, tolerance)


def mark(rows: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """Flag each checked row ``mismatch`` (relative error over ``tolerance``) and the row with the
    largest relative error ``worst``."""
    checked = [r for r in rows if "skipped" not in r]
    for r in checked:
        r["mismatch"] = bool(r["relative_error"] > tolerance)
    if checked:
        max(checked, key=lambda r: r["relative_error"])["worst"] = True
    return rows


def export_for(manifest: Mapping[str, Any], model: str, plugins: Any,
               input_shapes: Sequence[Any] = ()) -> tuple[Any, Any]:
    """``(resolved model, decomposed ExportedProgram)``: ``model`` resolved and exported the way the program's ``partition`` run
    exported it (ops its backends keep whole stay whole), so the program's node names are the
    graph's. Raises :class:`HandoffError` when the program was written from another model."""
    from .export import export_model, resolve_model

    chain = list(manifest.get("metadata", {}).get("backends") or sorted({d["backend"] for d in manifest["delegates"]}))
    options: dict[str, dict[str, str]] = {}
    for d in manifest["delegates"]:
        options.setdefault(d["backend"], dict(d.get("options", {})))
    keep = [op for b in chain for op in plugins.compiler(b, options.get(b, {})).ops_to_not_decompose()]
    try:
        resolved = resolve_model(model, input_shapes, plugins)
        # folded as the program's partition run folded it (programs before the flag were not)
        ep = export_model(resolved, keep, fold=manifest.get("metadata", {}).get("folded") is True)
    except HandoffError as exc:
        shapes = ", ".join(f"{dtype}{list(shape)}" for shape, dtype in input_shapes) or "none"
        raise HandoffError(f"{model} does not export with the program's inputs ({shapes}): {exc}; was the program "
                           f"partitioned from another model? pass the model it was made from") from exc
    graph = {n.name: n for n in ep.graph.nodes}
    for vid, value in enumerate(manifest["values"]):
        name = value.get("node")
        if name is None:
            continue
        val = graph[name].meta.get("val") if name in graph else None
        shape = list(getattr(val, "shape", [])) if val is not None else None
        dtype = str(getattr(val, "dtype", "")).removeprefix("torch.")
        if val is None or shape != value["shape"] or dtype != value["dtype"]:
            found = f"{dtype}{shape}" if val is not None else "no such node"
            raise HandoffError(f"value {vid} of the program is node {name} ({value['dtype']}{value['shape']}), but "
                               f"{model} exported here has {found}: the program was partitioned from another model "
                               f"(or another torch version); pass the model it was made from")
    return resolved, ep


def _node_of(manifest: Mapping[str, Any], vid: int, values: Mapping[str, Any], where: str) -> str:
    name = manifest["values"][vid].get("node")
    if name is None:
        raise HandoffError(f"{where}: value {vid} names no graph node (the program was written before values "
                           f"carried node names); re-partition it with this handoff to check delegates")
    if name not in values:
        raise HandoffError(f"{where}: value {vid} is node {name}, which the exported model does not have: the "
                           f"program was partitioned from another model; pass the model it was made from")
    return name


def _array(value: Any, declared: Mapping[str, Any], vid: int) -> np.ndarray:
    arr = value.detach().contiguous().numpy() if hasattr(value, "detach") else np.asarray(value)
    if list(arr.shape) != list(declared["shape"]) or str(arr.dtype) != declared["dtype"]:
        raise HandoffError(f"value {vid} (node {declared.get('node')}) is {arr.dtype}{list(arr.shape)} in the eager run but "
                           f"{declared['dtype']}{declared['shape']} in the program: the program was partitioned "
                           f"from another model; pass the model it was made from")
    return arr


def _ops_between(nodes: Mapping[str, Any], inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, int]:
    """The ops computing ``outputs`` from ``inputs``: the graph walked back from the outputs,
    stopping at the inputs and at placeholders (weights)."""
    from .partitioner import op_name

    stop, seen = set(inputs), set()
    todo = [nodes[o] for o in outputs]
    counts: collections.Counter[str] = collections.Counter()
    while todo:
        n = todo.pop()
        if n.name in seen or n.name in stop or n.op != "call_function":
            continue
        seen.add(n.name)
        if n.target is not operator.getitem:
            counts[op_name(n.target)] += 1
        todo.extend(n.all_input_nodes)
    return dict(counts.most_common())


def _one_delegate_program(manifest: Mapping[str, Any], ins: Mapping[str, Any], blob: bytes,
                          signer: Any = None) -> bytes:
    """The bytes of a program that runs the delegate call ``ins`` alone: its inputs are the
    program's inputs, its outputs the program's outputs. Fallback copies are left out: what is
    checked is the delegate's own backend."""
    remap: dict[int, int] = {}
    values = []
    for vid in [*ins["inputs"], *ins["outputs"]]:
        if vid not in remap:
            remap[vid] = len(values)
            values.append(dict(manifest["values"][vid]))
    inputs = list(dict.fromkeys(ins["inputs"]))
    delegate = {k: v for k, v in manifest["delegates"][ins["delegate"]].items() if k != "fallbacks"}
    delegate["segment"] = 0
    sub = {"handoff_version": manifest["handoff_version"], "values": values,
           "inputs": [{"name": f"input_{i}", "value": remap[v]} for i, v in enumerate(inputs)],
           "outputs": [{"name": f"output_{i}", "value": remap[v]} for i, v in enumerate(ins["outputs"])],
           "constants": [], "delegates": [delegate],
           "instructions": [{"op": "delegate", "delegate": 0, "inputs": [remap[v] for v in ins["inputs"]],
                             "outputs": [remap[v] for v in ins["outputs"]]}],
           "metadata": {"checks": f"delegate {ins['delegate']} ({delegate['partition']})",
                        "model": manifest.get("metadata", {}).get("model", "")}}
    return program_bytes(sub, [blob], signer=signer)


def _runtime_available(backend: str, plugins: Any) -> tuple[bool, str]:
    from .plugins import get_plugins

    plugins = plugins or get_plugins()
    if backend not in plugins.backends:
        return False, plugins.not_installed_message(backend)
    return plugins.runtime_available(backend)
