"""The ahead-of-time half of the ``xnnpack`` backend: ExecuTorch 1.5.1's XNNPACK toolchain.

Capability is XNNPACK's own: :meth:`XnnpackCompiler.support` rewrites ops XNNPACK has no kernel
for into ops it has (:mod:`handoff_xnnpack.rewrites`, the same rewrites lowering applies),
converts that copy of the program to ExecuTorch's Edge dialect exactly as
``to_edge_transform_and_lower`` does, folds what computes from constants alone
(:class:`_FoldConstants`), lets
``XnnpackPartitioner`` (its per-op ``PartitionerConfig`` classes and their ``check_constraints``)
tag what it would delegate, and maps the tags back to the ATen nodes through torch.fx's
``from_node`` provenance. A node's verdict comes from the Edge nodes that compute from its inputs
(not from constant operands Edge makes under the same provenance). For each node it declines, the
reason is the one the config reports through executorch's ``WhyNoPartition`` logger (``"Add node
doesn't support alpha != 1"``), or "XNNPACK has no kernel for OP" when no config exists for the op.

Lowering (:meth:`XnnpackCompiler.preprocess`) is the rewrites, then ``to_edge_transform_and_lower`` with
the same fold and ``XnnpackPartitioner`` and then ``to_executorch``: the blob is the resulting
``.pte``, which must hold exactly one ``XnnpackBackend`` delegate call and no other kernel.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import operator
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

from handoff import (Compiler, Lowered, LoweringError, extract_partition, is_quantized, one_line, partition_source,
                     quantized_dtype, quiet_loggers)

# Importing ExecuTorch pulls in torchao, which logs warnings about CUDA kernels a CPU wheel cannot
# load and a torch.compile deprecation: noise in a CPU lowering flow.
with quiet_loggers("torchao", "torch.utils._pytree"):
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.backends.xnnpack.utils.configs import (
        get_xnnpack_edge_compile_config,
        get_xnnpack_executorch_backend_config,
    )
    from executorch.exir import EdgeProgramManager, schema as pte_schema
    from executorch.exir.backend.canonical_partitioners.config_partitioner import format_target_name
    from executorch.exir.backend.utils import WhyNoPartition
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    from executorch.exir.verification.verifier import EXIREdgeDialectVerifier
    from executorch.exir.program._program import (
        _can_skip_using_EDGE_DO_NOT_DECOMP,
        _gen_edge_manager_for_partitioners,
        _remove_invalid_ops_for_not_decompose,
        _sanity_check_graph_for_non_decomp_ops,
        lift_constant_tensor_pass,
    )

from . import EXECUTORCH_VERSION, _format, rewrites
from .rewrites import DECOMPOSITIONS, rewrite

#: executorch's name for the XNNPACK delegate (``XnnpackBackend.__name__``).
BACKEND_ID = "XnnpackBackend"
#: dtypes XNNPACK's configs accept for fp32/fp16 graphs (``_check_node_has_valid_dtype``).
_FLOAT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16"}
_LOG = logging.getLogger(__name__)


class XnnpackCompiler(Compiler):
    """Capability and lowering for the ``xnnpack`` backend (see the module docstring).

    Work carried from :meth:`support` to :meth:`preprocess`: when the program :meth:`support` is
    asked about could be one partition whole, it judges the cut :meth:`preprocess` would then get
    (:func:`handoff.extract_partition` of every node: the same computation, weights no node reads
    left out) and keeps that cut's Edge conversion until the next :meth:`preprocess`, which lowers
    it instead of converting again when its partition is indeed that whole program
    (:func:`handoff.partition_source`). One conversion per compiler, that is per ``partition`` run
    and options, dropped at the next :meth:`preprocess` or :meth:`support`; nothing process-wide.
    """

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        #: (the program :meth:`support` was asked about, the Edge conversion of its whole cut)
        self._converted: tuple[torch.export.ExportedProgram, EdgeProgramManager] | None = None

    def cache_key(self) -> str:
        """The toolchain behind a blob besides options and plugin version: ExecuTorch, torch, the
        blob format, and this plugin's lowering code (the rewrites change what a graph lowers to)."""
        return _toolchain_key()

    # -- decomposition ------------------------------------------------------------------------
    def ops_to_not_decompose(self) -> Sequence[torch._ops.OpOverload]:
        """The ops XNNPACK's partitioner asks ExecuTorch to keep whole (``linear``, ``hardswish``,
        ``max_pool2d``, ``prelu``, ``upsample_bilinear2d``, torchao's quantize ops), filtered the way
        ``to_edge_transform_and_lower`` filters them."""
        ops, _ = XnnpackPartitioner().ops_to_not_decompose(None)
        return list(_remove_invalid_ops_for_not_decompose(list(ops)))

    def fused_patterns(self, ep: Any) -> Sequence[Sequence[str]]:
        """None needed: every node XNNPACK claims lowers on its own (batch norm after a conv is
        fused when both land in one partition, and decomposed to a depthwise conv otherwise)."""
        return []

    def quantizer(self, scheme: str) -> Any:
        """ExecuTorch's ``XNNPACKQuantizer`` with its symmetric config: weights int8 per output
        channel, activations int8 per tensor (what ExecuTorch's own int8 XNNPACK flow uses)."""
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))

    # -- capability ---------------------------------------------------------------------------
    def support(self, ep: torch.export.ExportedProgram) -> dict[str, str | None]:
        """ATen node name -> ``None`` when XNNPACK takes it, else XNNPACK's one-line reason.

        Judged on the program :meth:`preprocess` lowers (rewritten, in Edge, constants folded): a
        node is taken when XNNPACK's partitioner tags every Edge node that computes it from its
        inputs. Nodes that compute nothing at run time (an identity, or a value of weights alone,
        folded into a constant) are taken when a neighbour is, and then join its partition."""
        names = [n.name for n in ep.graph.nodes if n.op == "call_function"]
        partitioner = XnnpackPartitioner()
        self._converted = None
        judged = _whole_cut(ep, names)
        try:
            manager = _edge_manager(rewrite(judged), partitioner)
        except Exception as exc:  # the Edge conversion refuses the program: nothing is claimable
            reason = f"ExecuTorch's Edge conversion failed: {one_line(exc)}"
            return {name: reason for name in names}
        edge = manager.exported_program()
        with _quiet_partitioner():
            partitioner.partition(edge)
        verdict = self._verdict(judged, edge, partitioner, names)
        if judged is not ep:
            for enode in edge.graph.nodes:  # as converted: preprocess's partitioner tags it afresh
                enode.meta.pop("delegation_tag", None)
            self._converted = (ep, manager)
        return verdict

    def _verdict(self, ep: torch.export.ExportedProgram, edge: torch.export.ExportedProgram,
                 partitioner: XnnpackPartitioner, names: list[str]) -> dict[str, str | None]:
        """:meth:`support`'s answer from ``edge``, ``ep`` converted and tagged by ``partitioner``."""
        origins = _origins(ep, edge)
        by_aten: dict[str, list[torch.fx.Node]] = {}
        for enode, anames in origins.items():
            for aname in anames:
                by_aten.setdefault(aname, []).append(enode)
        aten_nodes = {n.name: n for n in ep.graph.nodes}
        from_weights = {n.name for n in _constant_nodes(ep) if n.op == "call_function"}
        edge_constants = _constant_nodes(edge)
        reasons: dict[torch.fx.Node, str | None] = {}

        def declined(enodes: list[torch.fx.Node]) -> str | None:
            """XNNPACK's reason for the first of ``enodes`` it leaves out, None if it takes all."""
            for enode in enodes:
                if enode.meta.get("delegation_tag") is None:
                    if enode not in reasons:
                        reasons[enode] = _why_declined(enode, edge, partitioner)
                    return reasons[enode]
            return None

        verdict: dict[str, str | None] = {}
        # nodes that compute nothing at run time, with the reason to decline them if they are alone
        pending: dict[str, str] = {}
        for name in names:
            enodes = by_aten.get(name, [])
            anode = aten_nodes[name]
            if why := _quantized_dtype_reason(anode):  # XNNPACK's partitioner would tag it, lowering fail
                verdict[name] = why
                continue
            if not enodes:
                if anode.target is operator.getitem and isinstance(anode.args[0], torch.fx.Node):
                    # follows its producer (multi-output ops are judged as a whole)
                    verdict[name] = verdict.get(anode.args[0].name, "not reported")
                elif not anode.users:
                    # removed by the Edge conversion (_assert_tensor_metadata, dead code): nothing to run
                    verdict[name] = None
                elif anode.target in DECOMPOSITIONS:  # rewritten to nothing (an expand to its own shape)
                    pending[name] = (f"{_op_name(anode)}: an identity here (XNNPACK drops it), but neither its "
                                     "input nor its users run on XNNPACK")
                elif name in from_weights:  # folded into a constant by _FoldConstants
                    pending[name] = (f"{_op_name(anode)}: computed from weights alone (lowering folds it into a "
                                     "constant), but none of its users runs on XNNPACK")
                else:
                    verdict[name] = (f"{_op_name(anode)} has no counterpart in ExecuTorch's Edge program, "
                                     "so XNNPACK's partitioner never saw it")
                continue
            # The Edge nodes that compute from the node's inputs decide, in XNNPACK's words. Edge
            # also makes operands from constants under the same provenance (``x + 3``: an int64
            # tensor cast to float32); _FoldConstants folds those, and one it could not fold would
            # stay outside the delegate, so it declines the node too, saying so.
            data = [e for e in enodes if e not in edge_constants]
            verdict[name] = declined(data or enodes)
            if verdict[name] is None and data and (why := declined([e for e in enodes if e in edge_constants])):
                verdict[name] = f"{_op_name(anode)}: XNNPACK takes it, but not the operand Edge makes for it ({why})"
        # Nothing of a pending node runs wherever it lands. XNNPACK takes it only when a neighbour
        # runs on XNNPACK (it then joins that partition), so it never makes a partition of its own;
        # repeated, so that a chain of them joins through its end.
        verdict.update(pending)

        def joins(name: str) -> bool:
            neighbours = (*aten_nodes[name].all_input_nodes, *aten_nodes[name].users)
            return any(verdict.get(n.name, "not judged") is None for n in neighbours)

        while joined := [name for name in pending if joins(name)]:
            for name in joined:
                verdict[name] = None
                del pending[name]
        return verdict

    # -- lowering -----------------------------------------------------------------------------
    def preprocess(self, ep: torch.export.ExportedProgram, name: str) -> Lowered:
        """``to_edge_transform_and_lower`` with :class:`_FoldConstants` and ``XnnpackPartitioner``,
        then ``to_executorch``. When ``ep`` is the whole of the program :meth:`support` was asked
        about (:attr:`handoff.PartitionSource.whole`, cut from that very object), the Edge
        conversion :meth:`support` made of the same cut is lowered instead of converting ``ep``
        again; it is used once and dropped either way."""
        converted, self._converted = self._converted, None
        source = partition_source(ep)
        partitioner = XnnpackPartitioner()
        try:
            with _quiet_partitioner():
                if converted is not None and source is not None and source.whole and source.program is converted[0]:
                    edge_manager = converted[1]  # support converted a cut of the same nodes: this very program
                else:
                    edge_manager = _edge_manager(rewrite(ep), partitioner)
                edge_manager = _lower(edge_manager, partitioner)
        except Exception as exc:
            raise LoweringError(f"xnnpack: partition {name}: ExecuTorch's XNNPACK lowering failed: "
                                f"{one_line(exc)}") from exc
        edge = edge_manager.exported_program()
        gm = edge.graph_module
        delegates: list[torch.fx.Node] = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is torch.ops.higher_order.executorch_call_delegate:
                delegates.append(node)
            elif node.target is operator.getitem and node.args[0] in delegates:
                continue
            else:
                sources = _sources(node, id(ep.graph), {n.name for n in ep.graph.nodes})
                where = f" (from node {sources[0]})" if sources else ""
                raise LoweringError(f"xnnpack: partition {name} lowered with {_op_name(node)} left outside "
                                    f"XNNPACK{where}", node=sources[0] if sources else None)
        if len(delegates) != 1:
            raise LoweringError(f"xnnpack: partition {name} lowered into {len(delegates)} XNNPACK delegate calls, "
                                "expected exactly one")
        lowered = getattr(gm, delegates[0].args[0].target)
        if lowered.backend_id != BACKEND_ID:
            raise LoweringError(f"xnnpack: partition {name} was delegated to {lowered.backend_id}, not {BACKEND_ID}")
        xnn_header, xnn_schema = _xnnpack_identifiers(lowered.processed_bytes)

        try:
            program = edge_manager.to_executorch(get_xnnpack_executorch_backend_config())
        except Exception as exc:
            raise LoweringError(f"xnnpack: partition {name}: ExecuTorch could not emit the program: "
                                f"{one_line(exc)}") from exc
        plans = program.executorch_program.execution_plan
        if len(plans) != 1 or plans[0].operators or [d.id for d in plans[0].delegates] != [BACKEND_ID]:
            kernels = [op.name for plan in plans for op in plan.operators]
            raise LoweringError(f"xnnpack: partition {name} lowered with {', '.join(kernels) or 'other delegates'} "
                                "left outside XNNPACK")
        pte = bytes(program.buffer)
        et_version = metadata.version("executorch")
        precision = _precision(ep)
        header = {
            "executorch": et_version,
            "pte_identifier": pte[4:8].decode("ascii", "replace"),
            "xnnpack_header": xnn_header,
            "xnnpack_schema": xnn_schema,
            "backend_id": BACKEND_ID,
        }
        meta = {
            "compiler": "executorch",
            "version": et_version,
            "backend_id": BACKEND_ID,
            "xnnpack_schema": xnn_schema,
            "precision": precision,
            "num_inputs": len(plans[0].inputs),
            "num_outputs": len(plans[0].outputs),
            "pte_bytes": len(pte),
        }
        values = [plans[0].values[i].val for i in plans[0].inputs]
        if all(isinstance(v, pte_schema.Tensor) for v in values):
            # the method's inputs as ExecuTorch's method metadata gives them (ScalarType code, sizes),
            # so loading the delegate does not ask the method for them (runtime._input_specs)
            meta["input_specs"] = [[int(v.scalar_type), list(v.sizes)] for v in values]
        if is_quantized(ep):
            # ExecuTorch's XNNPACK passes fuse each dequantize -> op -> quantize into one QS8 operator
            meta["int8_compute"] = "XNNPACK int8 (QS8) kernels, dequantize-op-quantize fused by ExecuTorch"
        if self.options["threads"] is not None:
            meta["threads"] = self.options["threads"]
        if et_version != EXECUTORCH_VERSION:
            meta["warning"] = f"handoff-xnnpack is tested with executorch {EXECUTORCH_VERSION}"
        return Lowered(blob=_format.pack(pte, header), metadata=meta)


# -- helpers --------------------------------------------------------------------------------------
@functools.cache
def _toolchain_key() -> str:
    """:meth:`XnnpackCompiler.cache_key`, computed once per process (it reads two source files)."""
    code = hashlib.sha256()
    for module in (rewrites, sys.modules[__name__]):
        code.update(Path(module.__file__).read_bytes())
    return json.dumps({"executorch": metadata.version("executorch"), "torch": torch.__version__,
                       "blob_format": _format.FORMAT_VERSION, "code": code.hexdigest()}, sort_keys=True)


def _whole_cut(ep: torch.export.ExportedProgram, names: list[str]) -> torch.export.ExportedProgram:
    """What :meth:`XnnpackCompiler.preprocess` gets when every node of ``ep`` lands in one
    partition, when that is ``ep``'s computation with its node names (:attr:`handoff.PartitionSource.whole`;
    a node named like a cut's placeholder, ``input_0``, would be renamed), else ``ep`` itself."""
    try:
        cut, _, _ = extract_partition(ep, names)
    except Exception:  # a program the core would not cut this way (a non-tensor input): judged as given
        return ep
    source = partition_source(cut)
    same = source is not None and source.whole and [n.name for n in cut.graph.nodes if n.op == "call_function"] == names
    return cut if same else ep


def _edge_manager(ep: torch.export.ExportedProgram, partitioner: XnnpackPartitioner) -> EdgeProgramManager:
    """The first half of ``to_edge_transform_and_lower(ep, transform_passes=[_FoldConstants()],
    partitioner=[partitioner], compile_config=get_xnnpack_edge_compile_config())``, as executorch
    1.5.1 does it: ``ep`` in Edge dialect (the partitioner's ops preserved), transformed by
    :class:`_FoldConstants`, constants lifted. ``ep`` itself is not changed. :func:`_lower` is the
    second half; :meth:`XnnpackCompiler.support` partitions the result to judge nodes."""
    manager = _gen_edge_manager_for_partitioners(
        {"forward": [partitioner]}, {"forward": ep}, get_xnnpack_edge_compile_config(), None)
    manager = manager.transform([_FoldConstants()])
    lift_constant_tensor_pass(manager.exported_program("forward"))
    return manager


def _lower(manager: EdgeProgramManager, partitioner: XnnpackPartitioner) -> EdgeProgramManager:
    """The second half of ``to_edge_transform_and_lower`` (see :func:`_edge_manager`), as
    executorch 1.5.1 does it: delegate what ``partitioner`` tags, check that no op it asked to keep
    whole is left outside the delegate, and verify the result is valid Edge dialect."""
    lowered = manager.to_backend({"forward": partitioner})
    program = lowered.exported_program("forward")
    config = get_xnnpack_edge_compile_config()
    kept, check = partitioner.ops_to_not_decompose(program)
    if not _can_skip_using_EDGE_DO_NOT_DECOMP(partitioner, program):
        kept = _remove_invalid_ops_for_not_decompose(kept)
    _sanity_check_graph_for_non_decomp_ops("forward", program, set(kept), check,
                                           partitioner_name=type(partitioner).__name__, generate_error=True)
    if config._check_ir_validity:
        EXIREdgeDialectVerifier(edge_compile_config=config, class_only=True,
                                preserve_ops=config.preserve_ops + list(kept))()(program.graph_module)
    return lowered


class _FoldConstants(ExportedProgramPassBase):
    """ExecuTorch's ``constant_prop_pass`` as an Edge transform pass: every node that computes from
    weights and constants alone becomes a constant (``full``, quantize ops and impure ops excepted,
    as ExecuTorch excepts them).

    Edge turns a Python scalar operand into a tensor of the scalar's own type and casts it to the
    other operand's (``x + 3`` on float32 ``x``: an int64 ``3`` and a ``_to_dim_order_copy``).
    XNNPACK declines the int64 cast, and ``to_edge_transform_and_lower`` alone leaves one such copy
    outside its delegate per scalar (18 in torchvision's MobileNetV3-small, from its hardsigmoids);
    folded, XNNPACK reads float32 constants instead and the delegate is whole."""

    def call(self, ep: torch.export.ExportedProgram) -> ExportedProgramPassResult:
        if not any(n.op == "call_function" for n in _constant_nodes(ep)):
            return ExportedProgramPassResult(ep, False)
        skip_dim_order = get_xnnpack_edge_compile_config()._skip_dim_order  # the clone it adds for constant outputs
        return ExportedProgramPassResult(constant_prop_pass(ep, _skip_dim_order=skip_dim_order), True)


def _constant_nodes(ep: torch.export.ExportedProgram) -> set[torch.fx.Node]:
    """The nodes of ``ep`` whose value depends on no user input: its weights (parameters, buffers
    it does not mutate, lifted constants) and the pure ops that compute from them alone."""
    sig = ep.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    weights = {*sig.inputs_to_parameters, *sig.inputs_to_lifted_tensor_constants,
               *(name for name, fqn in sig.inputs_to_buffers.items() if fqn not in mutated)}
    constant: set[torch.fx.Node] = set()
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in weights or (
                node.op == "call_function" and not node.is_impure() and all(i in constant for i in node.all_input_nodes)):
            constant.add(node)
    return constant


def _sources(node: torch.fx.Node, graph_id: int, names: set[str]) -> list[str]:
    """Names of the nodes of the graph ``graph_id`` that ``node`` was made from, following
    ``node.meta["from_node"]`` (newest first, stopping at the first ancestor in that graph).

    ``graph_id`` is the id of a graph alive during the whole conversion, so no graph made by the
    conversion can share it; graphs older than it that did are further up the chain."""
    found: list[str] = []
    stack = list(reversed(node.meta.get("from_node") or []))
    seen = 0
    while stack and seen < 10000:
        seen += 1
        src = stack.pop()
        if src.graph_id == graph_id and src.name in names:
            if src.name not in found:
                found.append(src.name)
            continue
        stack.extend(reversed(src.from_node or []))
    return found


def _origins(ep: torch.export.ExportedProgram, edge: torch.export.ExportedProgram) -> dict[torch.fx.Node, list[str]]:
    """Edge ``call_function`` node -> the ATen node names of ``ep`` it comes from."""
    names = {n.name for n in ep.graph.nodes if n.op == "call_function"}
    getitems = {(n.args[0].name, n.args[1]): n.name for n in ep.graph.nodes
                if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node)}
    origins: dict[torch.fx.Node, list[str]] = {}
    for enode in edge.graph.nodes:
        if enode.op != "call_function":
            continue
        found = _sources(enode, id(ep.graph), names)
        if enode.target is operator.getitem and isinstance(enode.args[0], torch.fx.Node):
            # a retraced getitem's provenance names its producer; match the ATen getitem instead
            producers = origins.get(enode.args[0]) or _sources(enode.args[0], id(ep.graph), names)
            matched = [getitems[(p, enode.args[1])] for p in producers if (p, enode.args[1]) in getitems]
            found = matched or found
        if found:
            origins[enode] = found
        else:
            _LOG.debug("xnnpack: edge node %s has no ATen origin", enode.name)
    return origins


class _WhyCapture(logging.Handler):
    """Collects what XNNPACK's partitioner configs report through ``WhyNoPartition``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[tuple[Any, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, WhyNoPartition):  # the same object is reused: read it now
            self.reasons.append((record.msg.node, str(record.msg.reason)))


@contextlib.contextmanager
def _capture_why() -> Iterator[_WhyCapture]:
    logger = logging.getLogger("executorch.backends.xnnpack")
    handler = _WhyCapture()
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep the debug records out of the application's handlers
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _quiet_partitioner() -> contextlib.AbstractContextManager[None]:
    """Silence executorch's per-node INFO/WARNING chatter while partitioning and lowering."""
    return quiet_loggers("executorch.backends.xnnpack", "executorch.exir")


def _why_declined(node: torch.fx.Node, edge: torch.export.ExportedProgram, partitioner: XnnpackPartitioner) -> str:
    """Why XNNPACK's partitioner left the Edge node ``node`` out, in its configs' words."""
    op = _op_name(node)
    if node.target is operator.getitem:
        src = node.args[0]
        return f"output {node.args[1]} of {_op_name(src) if isinstance(src, torch.fx.Node) else src} is not taken by XNNPACK"
    target = getattr(node.target, "__name__", str(node.target))
    config = partitioner.target_partitioner_configs.get(format_target_name(target))
    if config is None:
        return f"XNNPACK has no kernel for {op}"
    with _capture_why() as why:
        try:
            ok = config.check_constraints(node, edge)
        except Exception as exc:
            return f"{op}: XNNPACK's {type(config).__name__} failed: {one_line(exc)}"
    said: list[str] = []
    for who, reason in why.reasons:
        if (who is node or who is None or not isinstance(who, torch.fx.Node)) and reason not in said:
            said.append(reason)
    if ok:
        detail = f": {'; '.join(said)}" if said else ""
        return f"{op}: passes XNNPACK's {type(config).__name__} checks but its partitioner did not take it{detail}"
    if not said:
        said.append(f"{type(config).__name__} constraints not met")
    if any(r == "invalid dtype" for r in said):
        bad = sorted({str(d).replace("torch.", "") for d in _dtypes(node) if d not in _FLOAT_DTYPES})
        if bad:
            said = [f"invalid dtype {', '.join(bad)} (XNNPACK takes float32, float16)" if r == "invalid dtype" else r
                    for r in said]
    return f"{op}: {'; '.join(said)}"


def _dtypes(node: torch.fx.Node) -> set[torch.dtype]:
    vals = [a.meta.get("val") for a in node.all_input_nodes] + [node.meta.get("val")]
    out: set[torch.dtype] = set()
    for val in vals:
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, torch.Tensor):
                out.add(v.dtype)
    return out


#: What XNNPACK's quantized operators take (ExecuTorch's ``validate_quant_zeropoints``: int8,
#: uint8, int32 for biases); its partitioner tags quantize/dequantize ops of other dtypes anyway.
_QUANTIZED_DTYPES = (torch.int8, torch.uint8, torch.int32)


def _quantized_dtype_reason(node: torch.fx.Node) -> str | None:
    """Why XNNPACK cannot take a quantize/dequantize op of ``node``'s dtype (uint16: 16-bit
    activations), or None (not such an op, or a dtype it takes)."""
    dtype = quantized_dtype(node)
    if dtype is None or dtype in _QUANTIZED_DTYPES:
        return None
    return (f"{_op_name(node)} with dtype {str(dtype).removeprefix('torch.')}: XNNPACK's quantized operators take "
            f"int8 and uint8 tensors (int32 biases), its lowering refuses others ('Unsupported dtype for "
            f"quantization'); quantize for xnnpack with its own quantizer (8-bit)")


def _op_name(node: torch.fx.Node) -> str:
    """``aten.cumsum.default`` for an Edge or ATen op."""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "_name", None) or getattr(target, "__name__", None) or str(target)
    schema = getattr(target, "_schema", None)
    if schema is not None:
        ns, _, base = schema.name.partition("::")
        overload = schema.overload_name or "default"
        return f"{ns}.{base}.{overload}"
    return str(name)


def _xnnpack_identifiers(processed: bytes) -> tuple[str, str]:
    """The XNNPACK delegate payload's header magic (``XH00``) and flatbuffer schema identifier
    (``XN01``), read from the bytes XnnpackBackend.preprocess produced."""
    data = bytes(processed)
    try:
        head = XNNHeader.from_bytes(data[:XNNHeader.EXPECTED_LENGTH])
        magic = XNNHeader.EXPECTED_MAGIC.decode()
        fb = data[head.flatbuffer_offset:head.flatbuffer_offset + 8]
    except ValueError:  # no XNNHeader: the payload is the bare flatbuffer
        magic, fb = "", data[:8]
    return magic, fb[4:8].decode("ascii", "replace")


def _precision(ep: torch.export.ExportedProgram) -> str:
    """``fp32``, ``fp16`` or ``mixed``, from the floating dtypes of the partition's tensors."""
    kinds = set()
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
                kinds.add(_FLOAT_DTYPES.get(v.dtype, str(v.dtype).replace("torch.", "")))
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed" if kinds else "none"

