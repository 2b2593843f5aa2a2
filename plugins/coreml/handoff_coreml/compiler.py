"""The ahead-of-time half of the ``coreml`` backend: coremltools 9.0's torch.export frontend.

Lowering one partition (:meth:`CoreMLCompiler.preprocess`):

1. the capability check of :mod:`handoff_coreml.capability` runs on the partition (a node it
   declines is a :class:`handoff.LoweringError` naming it, never a silently wrong conversion);
2. ``coremltools.convert(ep, convert_to="mlprogram", minimum_deployment_target=...,
   compute_precision=...)`` writes the ML Program package (``.mlpackage``), with the partition's
   inputs and outputs as features ``input_0..``/``output_0..`` of their dtypes (Core ML has no
   int64 or bool features: int32 and float32 carry them);
3. the package is zipped into the blob (:mod:`handoff_coreml._format`), and the blob is checked
   as the runtime will read it: unpacked with the runtime's own checks, reloaded with
   ``coremltools.models.MLModel(..., skip_model_load=True)``, its specification's features
   compared with the partition's; and every partition node must be accounted for by the ML
   Program: each MIL operation carries the debug handles of the torch nodes it came from (through
   coremltools' fusions), and a node none carries must be a ``getitem``, computed from weights
   alone (folded into a constant) or a reshape/copy that MIL removed. Anything else is a
   ``LoweringError``: a conversion that silently dropped work.

Capability (:meth:`CoreMLCompiler.support`) is coremltools' own frontend, asked about every node
(:mod:`handoff_coreml.capability`); after planning, :meth:`CoreMLCompiler.check_partition`
converts every planned partition for real (option ``verify``, on by default) and declines the
nodes coremltools fails on in context: the node its error names, else one found by bisection. That conversion is kept, so ``preprocess``
of the same partition (the same nodes cut from the same program, :func:`handoff.partition_source`)
does not convert it again. The core remembers the answers
(``$HANDOFF_HOME/capability``, :class:`handoff.cache.CapabilityCache`): a later run of the same
model and options converts nothing to check.
"""

from __future__ import annotations

import operator
import os
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from handoff import (Compiler, Lowered, LoweringError, extract_partition, first_failing, one_line, partition_source,
                     temp_dir)

from . import __version__, _format, _package, capability
from ._quiet import quiet

with quiet():
    import coremltools as ct
    from coremltools.converters.mil.mil.scope import ScopeSource

A = torch.ops.aten
CT = capability.CT
#: Ops MIL removes when they change nothing but the view of the data, or only check it (their
#: handles may vanish).
_MOVEMENT = frozenset({A.view.default, A._unsafe_view.default, A.clone.default, A.alias.default, A.expand.default,
                       A.permute.default, A.squeeze.dims, A.squeeze.dim, A.unsqueeze.default, A.slice.Tensor,
                       A._to_copy.default, A._assert_tensor_metadata.default})
_QUOTED = re.compile(r"[\"']([A-Za-z_][\w.]*)[\"']")  # a quoted name in coremltools' errors
_CONSTANT, _EMPTY = object(), object()  # verification outcomes of groups with nothing to convert


class CoreMLCompiler(Compiler):
    """Capability and lowering for the ``coreml`` backend (see the module docstring).

    Options (typed, see :data:`handoff_coreml._format.OPTIONS`): ``deployment_target``,
    ``precision``, ``compute_units`` (recorded as the delegate's default), ``verify``.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.target = self.options.get("deployment_target") or "iOS15"
        self.precision = self.options.get("precision") or "fp16"
        self.compute_units = self.options.get("compute_units") or "all"
        self.verify = bool(self.options.get("verify", True))
        #: what check_partition converted, by the cut it converted (:func:`_cut_key`): (program cut from, conversion)
        self._converted: dict[tuple[int, tuple[str, ...]], tuple[Any, Lowered]] = {}

    def cache_key(self) -> str:
        """What decides a blob besides the options and the plugin's code: the converter, and torch
        (whose export the converter reads)."""
        return f"coremltools {ct.__version__}; torch {torch.__version__}; blob format {_format.FORMAT_VERSION}"

    def ops_to_not_decompose(self) -> Sequence[Any]:
        """``aten.linear``: coremltools converts it to one MIL ``linear`` (decomposed it is a
        transpose, a matmul or addmm and reshapes around it)."""
        return [A.linear.default]

    # -- capability ---------------------------------------------------------------------------
    def support(self, ep: torch.export.ExportedProgram) -> dict[str, str | None]:
        return capability.translate(ep, self.target)

    def check_partition(self, ep: Any, nodes: Sequence[str]) -> dict[str, str]:
        """Convert the planned partition ``nodes`` for real (when ``verify`` is on); decline the
        nodes that make it fail (:meth:`_find_refused`). The core remembers the answer per program,
        partition, options, this plugin's code and :meth:`cache_key` (no cache of its own here)."""
        if not self.verify:
            return {}
        by_name = {n.name: n for n in ep.graph.nodes}
        return self._find_refused(ep, [n for n in nodes if by_name[n].target is not operator.getitem])

    def _find_refused(self, ep: Any, group: list[str]) -> dict[str, str]:
        """Convert ``group``; while it fails, decline the node the failure names (coremltools
        names MIL ops after the torch nodes, and the checks here name the node they refuse)
        directly, or, when it names no node of the group, the last node of the smallest failing
        prefix (topological order, :func:`handoff.first_failing`: about log2(n) conversions), then
        convert the rest again. A rest with nothing to convert is declined whole. The rest's
        conversion is kept for :meth:`preprocess`."""
        by_name = {n.name: n for n in ep.graph.nodes}
        last: list[Any] = [None]  # names, outcome, content key, conversion, named node of the latest check

        def check(names: list[str]) -> str | None:
            if last[0] != names:  # bisection starts by checking the group just checked
                last[:] = [list(names), *self._check(ep, names)]
            return None if last[1] is _CONSTANT or last[1] is _EMPTY else last[1]

        declined, rest = {}, list(group)
        while rest and check(rest) is not None:
            named = last[4]
            if named in rest:
                declined[named] = f"{CT} fails to convert {capability.op_name(by_name[named].target)} in this graph: {last[1]}"
                rest.remove(named)
                continue
            culprit, error, alone = next(first_failing(check, rest))
            context = "even alone" if alone else "in this graph (what precedes it converts without it)"
            declined[culprit] = f"{CT} fails to convert {capability.op_name(by_name[culprit].target)} {context}: {error}"
            rest.remove(culprit)
        if rest and (last[1] is _CONSTANT or last[1] is _EMPTY):
            why = "computes only from weights (a constant)" if last[1] is _CONSTANT else "has no outputs"
            declined.update({n: f"this group of {len(rest)} node(s) {why}: nothing for Core ML to run"
                             for n in rest})
        elif rest and last[2] is not None:
            self._converted[last[2]] = (ep, last[3])
        return declined

    def _check(self, ep: Any, names: list[str]) -> tuple[Any, Any, Lowered | None, str | None]:
        """``(outcome, cut key, conversion, node)`` of converting ``names`` (with their
        getitems) as one partition: outcome ``None`` when it converts, the failure otherwise, or
        :data:`_CONSTANT` / :data:`_EMPTY` for groups with nothing to run; ``node``: the node the
        failure names, if any."""
        wanted = set(names)
        ordered = [n.name for n in ep.graph.nodes if n.op == "call_function" and (
            n.name in wanted or (n.target is operator.getitem and n.args[0].name in wanted))]
        try:
            sub, inputs, outputs = extract_partition(ep, ordered, {})
        except Exception as exc:
            return f"cannot cut the group out of the program: {one_line(exc)}", None, None, None
        if not inputs:
            return _CONSTANT, None, None, None
        if not outputs:
            return _EMPTY, None, None, None
        key = _cut_key(sub)
        try:
            return None, key, self._lower(sub, "group"), None
        except LoweringError as exc:  # the converter's words, without the class name
            return " ".join(str(exc).split()), key, None, exc.node
        except Exception as exc:
            return one_line(exc), key, None, None

    # -- lowering -----------------------------------------------------------------------------
    def preprocess(self, ep: torch.export.ExportedProgram, name: str) -> Lowered:
        """The conversion :meth:`check_partition` made of this very partition (the same nodes cut
        from the same program, :func:`handoff.partition_source`), else a new one."""
        source = partition_source(ep)
        kept = self._converted.pop(_cut_key(ep), None) if source is not None else None
        if kept is not None and kept[0] is source.program:
            return kept[1]
        return self._lower(ep, name)

    def _lower(self, ep: torch.export.ExportedProgram, name: str) -> Lowered:
        for node, reason in capability.translate(ep, self.target).items():
            if reason:
                raise LoweringError(f"{node}: {reason}", node=node)
        return self.lower_unchecked(ep, name)

    def lower_unchecked(self, ep: torch.export.ExportedProgram, name: str) -> Lowered:
        """Lowering without the capability check (``tools/check_op_table.py`` converts what the
        check declines with it). Changes ``ep`` in place: omitted defaults filled in, debug handles."""
        capability.fill_defaults(ep)
        calls = [n for n in ep.graph.nodes if n.op == "call_function"]
        for i, node in enumerate(calls):  # provenance through MIL's passes (see _unaccounted)
            node.meta["debug_handle"] = i
        inputs = [_feature(f"input_{i}", n) for i, n in enumerate(_user_inputs(ep))]
        outputs = [_feature(f"output_{i}", n) for i, n in enumerate(_outputs(ep))]
        with temp_dir("coreml") as tmp:
            start = time.perf_counter()
            try:
                with quiet():
                    model = ct.convert(
                        ep, convert_to="mlprogram", skip_model_load=True,
                        minimum_deployment_target=capability.TARGETS[self.target],
                        compute_precision=ct.precision.FLOAT16 if self.precision == "fp16" else ct.precision.FLOAT32,
                        compute_units=ct.ComputeUnit[self.compute_units.upper()],
                        inputs=[ct.TensorType(name=f["name"], dtype=np.dtype(f["coreml_dtype"])) for f in inputs],
                        outputs=[ct.TensorType(name=f["name"], dtype=np.dtype(f["coreml_dtype"])) for f in outputs],
                        package_dir=os.path.join(tmp, _format.PACKAGE))
            except Exception as exc:  # coremltools names a MIL op after the torch node it converts
                named = [m for m in _QUOTED.findall(str(exc)) if m in {n.name for n in calls}]
                raise LoweringError(f"{CT} failed to convert {name}: {one_line(exc)}",
                                    node=named[0] if named else None) from exc
            seconds = time.perf_counter() - start
            missing = _unaccounted(ep, calls, model._mil_program)
            if missing:
                raise LoweringError(f"{CT} converted {name} without computing {', '.join(missing[:5])}"
                                    f"{' and more' if len(missing) > 5 else ''}: no MIL operation carries "
                                    f"{'its' if len(missing) == 1 else 'their'} provenance", node=missing[0].split()[0])
            header = {"coremltools": ct.__version__, "handoff_coreml": __version__,
                      "spec_version": int(model.get_spec().specificationVersion),
                      "deployment_target": self.target, "precision": self.precision,
                      "compute_units": self.compute_units, "inputs": inputs, "outputs": outputs}
            blob = _format.pack(header, os.path.join(tmp, _format.PACKAGE))
            del model
        spec = _reloaded(blob)
        metadata = {
            "compiler": "coremltools", "coremltools_version": ct.__version__, "format": _format.FORMAT_VERSION,
            "spec_version": header["spec_version"], "deployment_target": self.target, "precision": self.precision,
            "compute_units": self.compute_units, "inputs": inputs, "outputs": outputs,
            "mil_ops": _package.mil_ops(spec), "package_bytes": len(blob), "convert_seconds": round(seconds, 3),
        }
        return Lowered(blob, metadata)


def _user_inputs(ep: Any) -> list[torch.fx.Node]:
    names = set(ep.graph_signature.user_inputs)
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]


def _outputs(ep: Any) -> list[torch.fx.Node]:
    (out,) = [n for n in ep.graph.nodes if n.op == "output"]
    return list(out.args[0])


def _feature(name: str, node: torch.fx.Node) -> dict[str, Any]:
    """A Core ML input/output feature for the partition value ``node``."""
    val = node.meta["val"]
    dtype = str(val.dtype).removeprefix("torch.")
    if dtype not in _format.BOUNDARY_DTYPES:
        raise LoweringError(f"{node.name} crosses the partition boundary as {dtype}, which Core ML features cannot "
                            f"carry (valid: {', '.join(_format.BOUNDARY_DTYPES)})", node=node.name)
    return {"name": name, "dtype": dtype, "coreml_dtype": _format.BOUNDARY_DTYPES[dtype],
            "shape": [int(d) for d in val.shape]}


def _unaccounted(ep: Any, calls: list[torch.fx.Node], program: Any) -> list[str]:
    """Partition nodes no MIL operation of ``program`` carries the debug handle of, except
    ``getitem`` nodes, nodes computed from weights alone (folded into constants), data movement
    MIL may remove, and nodes computing exactly what an accounted earlier node computes (merged by
    MIL's common-subexpression elimination): ``["name (op)", ...]``."""
    seen: set[int] = set()
    for op in program.functions["main"].operations:
        seen.update(h for h in op.scopes.get(ScopeSource.EXIR_DEBUG_HANDLE, []) if isinstance(h, int))
    sig = ep.graph_signature
    constant = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)
    missing = []
    first: dict[tuple[Any, str, str], torch.fx.Node] = {}  # the first node of each computation
    same: dict[torch.fx.Node, torch.fx.Node] = {}  # node -> the first node computing the same
    accounted: set[torch.fx.Node] = set()
    for i, node in enumerate(calls):
        if all(a.name in constant for a in node.all_input_nodes):
            constant.add(node.name)
        # MIL's common-subexpression elimination keeps one of identical ops, with one handle: a
        # node computing exactly what an earlier one computes is accounted for by it (the GRU's
        # ``gi[:, t, :H]``, ``gi[:, t, H:2H]``, ... are one ``select`` each in torch, one in MIL).
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: same.get(n, n))
        key = (node.target, repr(args[0]), repr(args[1]))
        if key in first and torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
            same[node] = first[key]
        else:
            first[key] = node
        if (i in seen or node.target is operator.getitem or node.name in constant or node.target in _MOVEMENT
                or (node in same and same[node] in accounted)):
            accounted.add(node)
            continue
        missing.append(f"{node.name} ({capability.op_name(node.target)})")
    return missing


def _reloaded(blob: bytes) -> Any:
    """The blob as the runtime reads it: unpacked with its checks, the package reloaded by
    coremltools (``skip_model_load``), its features compared with the header; its specification."""
    container = _format.unpack(blob)
    with temp_dir("coreml") as tmp:
        spec = _package.read_spec(_format.extract(container, tmp))
    try:
        _package.check_spec(spec, container.header)
    except ValueError as exc:
        raise LoweringError(f"{CT} wrote a package that does not match the partition: {exc}") from None
    return spec


def _cut_key(sub: Any) -> tuple[int, tuple[str, ...]] | None:
    """Which cut ``sub`` is (:func:`handoff.partition_source`): the program it was cut from (by
    identity; the entry holds that program alive, so the id names no other) and its nodes. Cuts
    are deterministic: the group ``check_partition`` converted and the same partition handed to
    ``preprocess`` have the same key. ``None`` for a program not cut by ``extract_partition``."""
    source = partition_source(sub)
    return None if source is None else (id(source.program), source.nodes)


