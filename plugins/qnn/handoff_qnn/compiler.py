"""The ahead-of-time half of the ``qnn`` backend.

Lowering one partition (:meth:`QnnCompiler.preprocess`):

1. ``torch.onnx.export(ep, dynamo=True)`` turns the partition's ``ExportedProgram`` into ONNX
   (weights become initializers; ONNX node metadata keeps the FX node each came from);
2. ONNX Runtime compiles it with the QNN execution provider on the HTP backend, with
   ``session.disable_cpu_ep_fallback=1`` (every node on QNN, or an error) and
   ``ep.context_enable=1, ep.context_embed_mode=0``: the EP writes the QNN context binary (the
   compiled HTP graph, weights included) and an EPContext model that refers to it by file name;
3. both files go into the delegate blob (:mod:`handoff_qnn._format`).

When the QNN EP refuses nodes, the partition is compiled a second time with fallback allowed and
verbose logging captured, to name the refused ONNX nodes, the QNN EP's reason, and the FX node
each came from (:class:`handoff.LoweringError` ``node``).

Capability (:meth:`QnnCompiler.support`) has two layers:

* the per-op table of :mod:`handoff_qnn.ops` (dtypes, ranks, attributes, fp32 vs fp16 kernels),
  checked one op at a time against real compiles by ``tools/check_op_table.py``;
* an in-context check after planning (:meth:`QnnCompiler.check_partition`, option ``verify``, on
  by default): HTP's fp32 path fails to finalize some op *combinations* whose ops compile alone (a
  MatMul fed by Div, Exp, Sqrt or Reciprocal; Softmax of a scaled input feeding a MatMul). So every
  partition the core plans is compiled as it stands; when it fails, the smallest failing prefix
  (in topological order) is found by bisection and its last node declined with QNN's message,
  until the rest compiles; the core plans again without the declined nodes, and remembers the
  answers (``$HANDOFF_HOME/capability``, :class:`handoff.cache.CapabilityCache`, keyed by the
  program, partition, options, plugin code and :meth:`QnnCompiler.cache_key`: the QNN SDK).
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import re
import time
from typing import Any, Iterator, Mapping, Sequence

import onnx
import onnx.utils
import torch

from handoff import (Compiler, Lowered, LoweringError, extract_partition, first_failing, one_line,
                     quiet_loggers, temp_dir)

from . import __version__, _format, _ort, ops
from ._worker import worker_for

_LOG = logging.getLogger(__name__)
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool",
                onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT16: "int16", onnx.TensorProto.UINT16: "uint16",
                onnx.TensorProto.DOUBLE: "float64"}
_CTX_NAME = "qnn_ctx.onnx"  # the EPContext model's file name; the EP names the binary qnn_ctx_qnn.bin
_FX_NODE = re.compile(r"^%([A-Za-z0-9_]+) :")
_CONSTANT, _EMPTY, _QDQ_ONLY = object(), object(), object()  # outcomes of groups with nothing to compile
_NOTHING = {_CONSTANT: "computes only from weights (a constant)", _EMPTY: "is a no-op on its own (only copies)",
            _QDQ_ONLY: "holds only quantize/dequantize ops, which the QNN EP leaves to the CPU at a graph's edge"}


class QnnCompiler(Compiler):
    """Capability and lowering for the ``qnn`` backend (see the module docstring).

    Options (typed, see :data:`handoff_qnn._format.OPTIONS`): ``soc_model``, ``htp_arch``,
    ``precision``, ``activation_bits`` (the quantizer's), ``verify``; ``htp_performance_mode`` is a
    run-time option and only checked here.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.target = _format.compile_target(self.options)
        self.verify = bool(self.options.get("verify", True))
        self._worker = worker_for(self.provider_options())  # compiles run in a child process: see _worker

    def _session(self, data: bytes, config: Mapping[str, str], severity: int = _ort.LOG_ERROR) -> tuple[str | None, list[str]]:
        """Create a QNN session for ``data`` in the compile worker: ``(error or None, log lines)``."""
        try:
            answer = self._worker.call({"op": "compile", "model": data, "provider_options": self.provider_options(),
                                        "config": dict(config), "severity": severity})
        except RuntimeError as exc:
            return str(exc), []
        return answer.get("error"), list(answer.get("log", []))

    def quantizer(self, scheme: str) -> Any:
        """ExecuTorch's ``QnnQuantizer`` (HTP's rules; :mod:`handoff_qnn.quantizer`) with option
        ``activation_bits`` (8: 8a8w, 16: 16a8w) and per-channel int8 weights."""
        from .quantizer import htp_quantizer

        return htp_quantizer(self.target, int(self.options.get("activation_bits") or 8))

    # -- capability ---------------------------------------------------------------------------
    def support(self, ep: torch.export.ExportedProgram) -> dict[str, str | None]:
        return ops.support(ep, self.target)

    def cache_key(self) -> str:
        """The toolchain behind a blob besides options and plugin code: the QNN SDK (through
        onnxruntime-qnn), ONNX Runtime, and torch (its ONNX exporter)."""
        return json.dumps({**_ort.versions(), "torch": torch.__version__}, sort_keys=True)

    # -- in-context check ---------------------------------------------------------------------
    def check_partition(self, ep: torch.export.ExportedProgram, nodes: Sequence[str]) -> dict[str, str]:
        """Compile the planned partition as it stands (option ``verify``); decline the nodes that
        make it fail (:meth:`_find_refused`). The core remembers the answer per program,
        partition, options, this plugin's code and :meth:`cache_key` (no cache of its own here)."""
        if not self.verify:
            return {}
        by_name = {n.name: n for n in ep.graph.nodes}
        return self._find_refused(ep, [n for n in nodes if by_name[n].target is not operator.getitem], by_name)

    def _find_refused(self, ep: Any, group: list[str], by_name: Mapping[str, Any]) -> dict[str, str]:
        """Decline, one at a time, the last node of the smallest failing prefix (topological
        order) of ``group``, with the dequantize users of a quantize so declined, until the rest
        compiles (:func:`handoff.first_failing`, over whole quantize/dequantize units:
        :func:`_qdq_units`); a rest with nothing to compile is declined whole.

        The group is exported to ONNX once; each sub-list the search tries is cut out of that
        export (:class:`_OnnxCut`) instead of being exported again (the export, not QNN's compile,
        was most of the time: ~7 checks per declined node on the bandwidth GRU). A cut can answer
        unlike the export of the same nodes: on zoo:langid the prefix holding bmm_3 passed as a
        cut and fails as an export, so add_3 after it was blamed. So the search trusts the cuts
        first, then checks where they led: the rest is cut out of the program and exported
        exactly as the core will lower it (:func:`handoff.extract_partition`). When that
        compiles, the answer stands. When it fails, a cut misled the search, and the search runs
        again, this time exporting, before each decline, the prefix that passed as a cut and
        blames the node (:meth:`_search` with ``confirm``). Every answer is remembered for the
        group (an export's for any later check of the same nodes, a cut's for the second search),
        so the second search compiles only those exports. Should its rest fail as an export too,
        the search goes on over that rest with an export per check."""
        whole = self._export(ep, group)
        cut = _OnnxCut(whole, ep, group) if isinstance(whole, onnx.ModelProto) else None
        answers: dict[frozenset[str], tuple[Any, bool]] = {}
        for confirm in (False, True):
            declined, last, by_cut = self._search(ep, group, by_name, whole, cut, answers, confirm)
            rest = [n for n in group if n not in declined]
            if not (rest and by_cut):
                break
            last = self._remembered(ep, rest, answers)
            if not isinstance(last, str):
                break
            if not confirm:
                _LOG.info("qnn: the rest the cuts left fails as an export; searching again, confirming each decline")
                continue
            more, last, _ = self._search(ep, rest, by_name, None, None, answers, False)
            declined.update(more)
            rest = [n for n in rest if n not in more]
        if rest and last in _NOTHING:
            declined.update({n: f"this group of {len(rest)} node(s) {_NOTHING[last]}: nothing for HTP to run"
                             for n in rest})
        return declined

    def _search(self, ep: Any, group: list[str], by_name: Mapping[str, Any], whole: Any, cut: _OnnxCut | None,
                answers: dict[frozenset[str], tuple[Any, bool]], confirm: bool) -> tuple[dict[str, str], Any, bool]:
        """:func:`handoff.first_failing` over ``group``'s quantize/dequantize units (``whole``: its
        export or outcome, when at hand; ``cut``: sub-lists cut out of it, else exported one by
        one): the declined nodes, the outcome of the last check (the rest's) and whether that
        outcome came from a cut (then the rest is still to be checked on its own export).
        ``answers`` keeps every check's outcome (set of names -> outcome, whether a cut gave it):
        an export's answers hold for any later check of the same nodes, a cut's where cuts are used.

        With ``confirm``, no node is declined on a passing cut's word: before a node is declined,
        the prefix before it (which passed), where a cut answered, is exported and compiled on its
        own; should that fail, the search goes on over the nodes not yet declined with an export
        per check. The failing prefix is not confirmed: a cut has been seen to pass where the
        export of the same nodes fails (zoo:langid), never to fail where it passes."""
        last: list[Any] = [None]
        last_by_cut, checks = [False], [0]
        passed: list[tuple[list[str], bool] | None] = [None]  # the latest check that passed: names, by a cut

        def check(names: list[str]) -> str | None:
            key, by_cut = frozenset(names), False
            if key in answers and (cut is not None or not answers[key][1]):
                last[0], by_cut = answers[key]
            elif whole is not None and len(names) == len(group):
                last[0] = self._compile_check(whole)
            elif _only_qdq(by_name[n] for n in names):
                last[0] = _QDQ_ONLY  # as _export says; a cut would be compiled and blamed
            elif cut is not None and (model := cut.model(names)) is not None:
                last[0], by_cut = self._compile_check(model), True
            else:
                last[0] = self._remembered(ep, names, answers)
            answers[key] = (last[0], by_cut)
            checks[0] += 1
            last_by_cut[0] = by_cut
            if not isinstance(last[0], str):
                passed[0] = (names, by_cut)
            return None if last[0] in _NOTHING else last[0]

        def cut_misled(alone: bool) -> bool:
            """Whether the prefix before the culprit passed as a cut and fails as an export."""
            if alone or passed[0] is None or not passed[0][1]:
                return False
            names = passed[0][0]
            passed[0] = (names, False)  # confirmed: the next round does not export it again
            return isinstance(self._remembered(ep, names, answers), str)

        declined: dict[str, str] = {}
        order, together = _qdq_units(ep, group, by_name)
        confirmed_at = -1
        for culprit, error, alone in first_failing(check, order, together):
            if confirm and checks[0] != confirmed_at:  # not a node tied to the one just declined
                confirmed_at = checks[0]
                if cut_misled(alone):
                    _LOG.info("qnn: a cut passed where its export fails before %s; searching on with exports", culprit)
                    more, outcome, _ = self._search(ep, [n for n in group if n not in declined], by_name, None, None,
                                                    answers, False)
                    return {**declined, **more}, outcome, False
            op = ops.op_name(by_name[culprit].target)
            source = by_name[culprit].args[0]
            if ops.is_qdq(by_name[culprit], "dequantize") and getattr(source, "name", None) in declined:
                declined[culprit] = f"{op} reads {source.name}, declined with it: {declined[source.name]}"
            else:
                context = "even alone" if alone else "in this graph (what precedes it compiles without it)"
                declined[culprit] = f"QNN HTP fails to compile {op} {context}: {error}"
            _LOG.info("qnn: declined %s (%s) after an in-context compile failed", culprit, op)
        return declined, last[0], last_by_cut[0]

    def _remembered(self, ep: Any, names: list[str], answers: dict[frozenset[str], tuple[Any, bool]]) -> Any:
        """:meth:`_check` of ``names``, kept in ``answers`` (and taken from there when an export gave it)."""
        key = frozenset(names)
        if key not in answers or answers[key][1]:
            answers[key] = (self._check(ep, names), False)
        return answers[key][0]

    def _check(self, ep: Any, names: list[str]) -> Any:
        """``None`` when ``names`` (with their getitems) compile on QNN as one graph, the failure
        message otherwise, or :data:`_CONSTANT` / :data:`_EMPTY` / :data:`_QDQ_ONLY` for groups with
        nothing to run."""
        return self._compile_check(self._export(ep, names))

    def _export(self, ep: Any, names: list[str]) -> Any:
        """``names`` (with their getitems) cut out of ``ep`` and exported to ONNX as the core will
        lower them, or the outcome that makes a compile moot (an error, :data:`_CONSTANT`,
        :data:`_EMPTY`, :data:`_QDQ_ONLY`). A group of quantize/dequantize ops alone is one: the
        QNN EP hands a graph's input quantize and output dequantize to the CPU, so such a prefix
        of a quantized partition would fail on its own and be blamed for what follows it."""
        wanted = set(names)
        ordered = [n.name for n in ep.graph.nodes if n.op == "call_function" and (
            n.name in wanted or (n.target is operator.getitem and n.args[0].name in wanted))]
        if _only_qdq(n for n in ep.graph.nodes if n.name in wanted):
            return _QDQ_ONLY
        try:
            sub, inputs, _ = extract_partition(ep, ordered, {})
        except Exception as exc:
            return f"cannot cut the group out of the program: {one_line(exc)}"
        if not inputs:
            return _CONSTANT
        try:
            model = to_onnx(sub, "group")
        except LoweringError as exc:
            return str(exc)
        return model if model.graph.node else _EMPTY

    def _compile_check(self, model: Any) -> Any:
        """Compile ``model`` (an ONNX model) on QNN: ``None`` or the failure; other outcomes pass through."""
        if not isinstance(model, onnx.ModelProto):
            return model
        error, _ = self._session(model.SerializeToString(), {})
        return None if error is None else one_line(error)

    # -- lowering -----------------------------------------------------------------------------
    def preprocess(self, ep: torch.export.ExportedProgram, name: str) -> Lowered:
        for node, reason in ops.support(ep, self.target).items():
            if reason:
                raise LoweringError(f"{node}: {reason}", node=node)
        return self.lower_unchecked(ep, name)

    def lower_unchecked(self, ep: torch.export.ExportedProgram, name: str) -> Lowered:
        """:meth:`preprocess` without the op-table check (``tools/check_op_table.py`` uses it to
        compile what the table declines)."""
        start = time.perf_counter()
        model = to_onnx(ep, name)
        export_seconds = time.perf_counter() - start
        user_inputs = len(ep.graph_signature.user_inputs)
        if len(model.graph.input) != user_inputs:
            raise LoweringError(f"torch.onnx.export produced {len(model.graph.input)} graph inputs for a partition "
                                f"with {user_inputs} inputs")
        versions = _ort.versions()
        with temp_dir("qnn") as tmp:  # removed by the next run if this one is killed
            ctx_path = os.path.join(tmp, _CTX_NAME)
            start = time.perf_counter()
            self._compile(model, ctx_path, ep, versions)
            compile_seconds = time.perf_counter() - start
            ctx_bytes, binaries = _read_context(tmp, ctx_path)
        ctx = onnx.load_from_string(ctx_bytes)
        sdk_build = _attr(next(n for n in ctx.graph.node if n.op_type == "EPContext"), "ep_sdk_version")
        inputs = [_io(v) for v in ctx.graph.input]
        outputs = [_io(v) for v in ctx.graph.output]
        header = {
            "qnn_sdk_version": versions["qnn_sdk_version"],
            "qnn_sdk_build": sdk_build,
            "onnxruntime_qnn": versions["onnxruntime_qnn"],
            "onnxruntime": versions["onnxruntime"],
            "handoff_qnn": __version__,
            "htp_arch": self.target.htp_arch,
            "soc_model": self.target.soc_model,
            "soc_name": self.target.soc_name,
            "precision": self.target.precision,
            "inputs": inputs,
            "outputs": outputs,
        }
        blob = _format.pack(header, (_CTX_NAME, ctx_bytes), binaries)
        metadata = {
            "compiler": "onnxruntime-qnn",
            "qnn_sdk_version": versions["qnn_sdk_version"],
            "qnn_sdk_build": sdk_build,
            "onnxruntime_qnn_version": versions["onnxruntime_qnn"],
            "onnxruntime_version": versions["onnxruntime"],
            "format": _format.FORMAT_VERSION,
            "backend": "htp",
            "htp_arch": self.target.htp_arch,
            "soc_model": self.target.soc_name,
            "precision": self.target.precision,
            "context_binary_bytes": sum(len(d) for _, d in binaries),
            "onnx_nodes": len(model.graph.node),
            "export_seconds": round(export_seconds, 3),
            "compile_seconds": round(compile_seconds, 3),
            "num_inputs": len(inputs),
            "num_outputs": len(outputs),
            "inputs": inputs,
            "outputs": outputs,
        }
        compute = _int8_compute(ep)
        if compute:
            metadata["int8_compute"] = compute
        return Lowered(blob, metadata)

    def provider_options(self) -> dict[str, str]:
        return self.target.provider_options()

    def _compile(self, model: onnx.ModelProto, ctx_path: str, ep: Any, versions: Mapping[str, str]) -> None:
        data = model.SerializeToString()
        config = {"ep.context_enable": "1", "ep.context_embed_mode": "0", "ep.context_file_path": ctx_path}
        qnn = f"QNN SDK {versions['qnn_sdk_version']} (onnxruntime-qnn {versions['onnxruntime_qnn']})"
        error, log = self._session(data, config)
        if error is not None:
            message = one_line(error)
            if "assigned to the default CPU EP" in message:
                refused = self._refused_nodes(data)
                if refused:
                    onnx_name, op_type, reason = refused[0]
                    fx = _fx_node(model, onnx_name, ep)
                    where = f"ONNX node {onnx_name} ({op_type}" + (f", from FX node {fx}" if fx else "") + ")"
                    more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
                    raise LoweringError(f"the QNN EP of {qnn} does not take {where}{more}: {reason}", node=fx)
            errors = [line for line in _log_errors(log) if line not in message]
            detail = f" [{'; '.join(errors[:3])}]" if errors else ""
            raise LoweringError(f"{qnn} failed to compile the partition for HTP: {message}{detail}")
        if not os.path.exists(ctx_path):
            raise LoweringError(f"the QNN EP of {qnn} wrote no EPContext model (nothing to compile?)")

    def _refused_nodes(self, data: bytes) -> list[tuple[str, str, str]]:
        """``(onnx node, op type, reason)`` of every node the QNN EP declines, from its verbose log
        (a session with CPU fallback allowed; it may fail later, the log is what counts)."""
        _, log = self._session(data, {"session.disable_cpu_ep_fallback": "0"}, severity=0)
        refused: dict[str, tuple[str, str, str]] = {}
        current: list[str] = []
        failed = False
        for line in log:
            if "Validation FAILED" in line:
                failed, current = True, []
            elif "Validation PASSED" in line:
                failed, current = False, []
            m = re.search(r"Operator type: (\S+) Node name: (.*?) Node index", line)
            if m and failed:
                current.append(m.group(2))
                refused.setdefault(m.group(2), (m.group(2), m.group(1), "refused by the QNN EP"))
            m = re.search(r"REASON : (.*)", line)
            if m and failed:
                for node in current:
                    refused[node] = (refused[node][0], refused[node][1], m.group(1).strip())
                failed, current = False, []
            m = re.search(r"Unsupported nodes in QNN EP: (.*)", line)
            if m:
                for name, op_type in re.findall(r"name: (.*?), type: (\w+)", m.group(1)):
                    refused.setdefault(name, (name, op_type, "refused by the QNN EP"))
        return list(refused.values())


def _only_qdq(nodes: Any) -> bool:
    """Whether ``nodes`` (FX nodes) are all quantize/dequantize ops."""
    return all(ops.is_qdq(n, "") for n in nodes)


def _qdq_units(ep: Any, group: list[str], by_name: Mapping[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """``group`` in the order bisection cuts it, and the nodes it must keep together
    (``first_failing``'s ``together``):
    an op with the quantize ops of its results, their dequantize users, and what it reads from
    weights alone (dequantized weights and their transposes); a quantize of an input with its
    dequantize users. Cuts then fall only after a dequantize, where float crosses: a cut between
    a quantize and its dequantize hands an integer tensor across, which the QNN EP refuses on its
    own, and a prefix ending among an op's weight inputs has nothing to run; either would be
    blamed instead of the unit at fault, which is declined whole. The order is topological with
    what a node reads from weights alone moved right before it (graph order puts weights first),
    so a unit never precedes the unit that quantizes its input."""
    members, weights = set(group), ops.weight_names(ep)
    from_weights: dict[Any, bool] = {}

    def weight_only(node: Any) -> bool:
        if node not in from_weights:
            from_weights[node] = node.op == "placeholder" and node.name in weights or (
                node.op == "call_function" and bool(node.all_input_nodes)
                and all(weight_only(a) for a in node.all_input_nodes))
        return from_weights[node]

    def weight_path(node: Any) -> list[str]:
        return [n for a in node.all_input_nodes if a.op == "call_function" and weight_only(a)
                for n in (*weight_path(a), a.name)]

    together: dict[str, list[str]] = {}
    for name in group:
        node = by_name[name]
        if ops.is_qdq(node, "dequantize") or weight_only(node) or node.target is operator.getitem:
            continue  # getitems follow their producer
        if ops.is_qdq(node, "quantize"):
            source = node.args[0] if node.args else None
            if ops.is_qdq(source, "") or getattr(source, "op", None) == "call_function":
                continue  # an op's result: tied to that op
            quantizes = [node]
            unit = [name]
        else:
            users = [u for g in node.users for u in (g.users if g.target is operator.getitem else [g])]
            quantizes = [u for u in users if ops.is_qdq(u, "quantize")]
            if not quantizes:
                continue
            unit = [*weight_path(node), name]
        unit += [q.name for q in quantizes if q is not node] + [d.name for q in quantizes for d in q.users
                                                                 if ops.is_qdq(d, "dequantize")]
        unit = [n for n in dict.fromkeys(unit) if n in members]
        for n in unit:
            together[n] = unit
    order: list[str] = []

    def emit(name: str) -> None:
        for a in by_name[name].all_input_nodes:
            if a.name in members and a.name not in order and weight_only(a):
                emit(a.name)
        if name not in order:
            order.append(name)

    for name in group:
        if not weight_only(by_name[name]):
            emit(name)
    return order + [n for n in group if n not in order], together


class _OnnxCut:
    """Sub-lists of a group's FX nodes cut out of the group's one ONNX export with
    ``onnx.utils.Extractor``, for :meth:`QnnCompiler._find_refused`.

    Each ONNX node belongs to the FX node ``torch.onnx`` recorded in its metadata
    (``pkg.torch.onnx.fx_node``); a node the exporter's optimizer made without that record
    belongs to the FX node of the value it reads (or, reading only graph inputs, of its first
    reader); a node reading only weights and constants belongs to none and is kept wherever it
    is read. A cut keeps the ONNX nodes of the FX nodes named: its inputs are the values they
    read from other nodes or the graph's inputs, its outputs the values read outside it or the
    graph's outputs, as :func:`handoff.extract_partition` cuts the FX graph.

    The exporter's optimizer fuses chains (``view -> bmm -> view`` becomes one MatMul recorded
    as the last view): an FX node of the group with no ONNX node of its own was absorbed by the
    ONNX nodes it feeds. A cut that keeps some but not all FX nodes of such a fused node cannot
    be made faithfully (:meth:`model` returns ``None``: export that candidate on its own), so
    the search blames the node the per-candidate export would (the bmm, not the view). The
    rest the search settles on is checked once more on its own export."""

    def __init__(self, model: onnx.ModelProto, ep: Any, group: Sequence[str]) -> None:
        graph = model.graph
        self._nodes = list(graph.node)
        constant = {t.name for t in graph.initializer}
        producer: dict[str, int] = {}
        self._owner: list[str | None] = []
        unowned = []
        for i, node in enumerate(self._nodes):
            live = [v for v in node.input if v and v not in constant]
            owner = _fx_name(node)
            if owner is None and live:
                owner = next((self._owner[producer[v]] for v in live if v in producer), None)
                if owner is None:
                    unowned.append(i)
            if owner is None and not live:
                constant.update(v for v in node.output if v)
            self._owner.append(owner)
            producer.update((v, i) for v in node.output if v)
        self._readers: dict[str, list[int]] = {}
        for i, node in enumerate(self._nodes):
            for v in node.input:
                self._readers.setdefault(v, []).append(i)
        for i in reversed(unowned):  # reads only graph inputs: it goes with its first reader
            readers = [self._owner[r] for v in self._nodes[i].output for r in self._readers.get(v, ())]
            self._owner[i] = next((o for o in readers if o is not None), None)
        self._constant = constant
        self._graph_outputs = {o.name for o in graph.output}
        by_name = {n.name: n for n in ep.graph.nodes}
        inside, live = set(group), set(ep.graph_signature.user_inputs)  # live: computed from the inputs
        for n in ep.graph.nodes:
            if n.op == "call_function" and (n.name not in inside or any(i.name in live for i in n.all_input_nodes)):
                live.add(n.name)
        absorbed = (inside & live) - set(self._owner)  # weights-only nodes were folded, not fused
        self._fused: list[set[str]] = []  # per ONNX node: the FX nodes it computes besides its owner
        for owner in self._owner:
            fused, stack = set(), [owner] if owner in by_name else []
            while stack:
                for inp in by_name[stack.pop()].all_input_nodes:
                    if inp.name in absorbed and inp.name not in fused:
                        fused.add(inp.name)
                        stack.append(inp.name)
            self._fused.append(fused)
        self._extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))

    def model(self, names: Sequence[str]) -> Any:
        """The ONNX model of ``names``, :data:`_EMPTY` / :data:`_CONSTANT` (nothing to compile), or
        ``None`` when ``names`` splits a fused ONNX node."""
        keep = set(names)
        inside = [i for i, owner in enumerate(self._owner) if owner in keep]
        if any(not self._fused[i] <= keep for i in inside) or any(
                self._fused[i] & keep for i, owner in enumerate(self._owner) if owner is not None and owner not in keep):
            return None
        made = {v for i in inside for v in self._nodes[i].output if v}
        inputs = list(dict.fromkeys(v for i in inside for v in self._nodes[i].input
                                    if v and v not in made and v not in self._constant))
        outputs = [v for i in inside for v in self._nodes[i].output if v and (
            v in self._graph_outputs or any(self._owner[r] not in keep for r in self._readers.get(v, ())))]
        if not outputs:
            return _EMPTY
        if not inputs:
            return _CONSTANT
        return self._extractor.extract_model(inputs, outputs)


def _fx_name(node: onnx.NodeProto) -> str | None:
    """The FX node ``torch.onnx`` exported ``node`` from (its ``pkg.torch.onnx.fx_node`` record)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.fx_node":
            m = _FX_NODE.match(prop.value)
            return m.group(1) if m else None
    return None


def to_onnx(ep: torch.export.ExportedProgram, name: str = "partition") -> onnx.ModelProto:
    """The partition as an ONNX model (``torch.onnx.export(..., dynamo=True)``); opset 21 when it
    holds 16-bit quantize/dequantize ops (uint16/int16 QuantizeLinear needs it), else the default."""
    sixteen = any(ops.qdq_dtype(n) in (torch.uint16, torch.int16) for n in ep.graph.nodes
                  if getattr(n.target, "namespace", None) == ops.QDQ_NAMESPACE)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(ep, dynamo=True, verbose=False, optimize=True,
                                        **({"opset_version": 21} if sixteen else {}))
    except Exception as exc:
        raise LoweringError(f"torch.onnx.export failed for {name}: {one_line(exc)}") from exc
    return program.model_proto


def _int8_compute(ep: torch.export.ExportedProgram) -> str | None:
    """How a quantized partition computes, for the report (``None`` for a float one)."""
    weights = ops.weight_names(ep)  # dequantized weights (int32 biases, a LayerNorm's uint8 scale) are not activations
    dtypes = sorted({str(ops.qdq_dtype(n)).removeprefix("torch.") for n in ep.graph.nodes
                     if getattr(n.target, "namespace", None) == ops.QDQ_NAMESPACE and "per_tensor" in n.target.__name__
                     and not (n.args and getattr(n.args[0], "name", None) in weights)} - {"int32"})
    if not dtypes:
        return None
    return (f"HTP integer kernels ({'/'.join(dtypes)} activations, int8 weights): the QNN EP fuses each ONNX "
            f"DequantizeLinear -> op -> QuantizeLinear unit")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx logs a warning per torchvision op it cannot register, on every export."""
    import warnings

    with quiet_loggers("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _read_context(folder: str, ctx_path: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The EPContext model and the context binaries it names (plain file names in ``folder``)."""
    with open(ctx_path, "rb") as f:
        ctx_bytes = f.read()
    ctx = onnx.load_from_string(ctx_bytes)
    nodes = [n for n in ctx.graph.node if n.op_type == "EPContext"]
    others = [f"{n.name} ({n.op_type})" for n in ctx.graph.node if n.op_type != "EPContext"]
    if others:
        raise LoweringError(f"the QNN EP left nodes outside its context: {', '.join(others[:5])}")
    if not nodes:
        raise LoweringError("the QNN EP compiled nothing: the partition is empty after ONNX export "
                            "(only no-op ops, folded away)")
    binaries: list[tuple[str, bytes]] = []
    for node in nodes:
        if _attr(node, "embed_mode") not in (0, None):
            raise LoweringError("the QNN EP embedded the context binary despite ep.context_embed_mode=0")
        if _attr(node, "main_context") == 0:
            continue  # shares the binary of a main-context node
        ref = _attr(node, "ep_cache_context")
        if not isinstance(ref, str) or os.path.basename(ref) != ref or not ref:
            raise LoweringError(f"EPContext node {node.name} refers to {ref!r}, not a file next to the model")
        if ref not in {n for n, _ in binaries}:
            with open(os.path.join(folder, ref), "rb") as f:
                binaries.append((ref, f.read()))
    return ctx_bytes, binaries


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return None


def _io(value: onnx.ValueInfoProto) -> dict[str, Any]:
    t = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": value.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}


def _fx_node(model: onnx.ModelProto, onnx_name: str, ep: Any) -> str | None:
    """The FX node of ``ep`` that ``torch.onnx`` lowered to ONNX node ``onnx_name``."""
    names = {n.name for n in ep.graph.nodes if n.op == "call_function"}
    fx = next((_fx_name(node) for node in model.graph.node if node.name == onnx_name), None)
    if fx in names:
        return fx
    guess = onnx_name.removeprefix("node_")
    return guess if guess in names else None


def _log_errors(lines: list[str]) -> list[str]:
    """The messages of ONNX Runtime's error-level log lines (colour codes and prefixes removed)."""
    out = []
    for line in lines:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = re.search(r"\[E:onnxruntime:[^\]]*\] (.*)", line)
        if m and m.group(1) not in out:
            out.append(m.group(1).strip())
    return out

