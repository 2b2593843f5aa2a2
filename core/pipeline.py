"""The ahead-of-time pipeline in one call: export -> partition -> lower -> program.

:func:`partition` is what ``handoff partition`` runs; it returns a :class:`PartitionResult`
holding the program (manifest + segments, written with :meth:`PartitionResult.write`) and the
delegation report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import hostops
from .cache import CapabilityCache
from .errors import HandoffError, one_line
from .export import Decompositions, export_model, resolve_model
from .fold import Folding, folding
from .lower import Assembled, Lowerer, LoweringFailure, Move, assemble, graph_digest
from .partitioner import HOST, GraphView, Limits, Partition, Plan, graph_view, plan
from .plugins import Plugins, get_plugins
from .report import Report
from .zoo import InputSpec, ResolvedModel

FALLBACK_BACKEND = "tvm"
ON_LOWER_ERROR = ("fail", "fallback")
#: Phases timed in the report's ``timings`` (seconds); ``write`` is filled in by
#: :meth:`PartitionResult.write`.
TIMED_PHASES = ("export", "quantize", "capability", "plan", "lower", "write")
#: The default ``--min-partition-size``: a partition smaller than this joins a neighbouring
#: partition whose backend also takes its nodes (see :mod:`handoff.partitioner`), because each
#: delegate boundary costs more than the few ops it would run (measured: docs/plugins.md,
#: "Partition size").
DEFAULT_MIN_PARTITION_SIZE = 3


@dataclasses.dataclass
class PartitionResult:
    """The program (manifest and segments), the delegation report of one ``partition`` run, and
    the decomposed ``ExportedProgram`` it was partitioned from (:attr:`exported`: the graph whose
    node names the manifest's values carry; :mod:`handoff.numerics` evaluates it eagerly).

    :meth:`to_bytes` and :meth:`write` sign the program with the local key (``handoff.signing``)
    unless ``sign=False``: the runtime of this machine trusts it, and others can trust it by
    adding its public key (``handoff key``)."""

    assembled: Assembled
    report: Report
    #: with ``quantize=``: the PT2E result, whose ``reference`` is the quantized eager model
    quantized: Any = None
    exported: Any = None

    def to_bytes(self, alignment: int = 64, sign: bool = True) -> bytes:
        from .program import program_bytes

        data = program_bytes(self.assembled.manifest, self.assembled.segments, alignment=alignment,
                             signer=_signer(sign))
        remember_blobs(self.assembled.manifest, self.assembled.segments)
        return data

    def write(self, path: str, alignment: int = 64, sign: bool = True) -> int:
        """Write the ``.hof`` file; returns its size in bytes."""
        from .limits import RUN_BYTES_NOTE, run_bytes
        from .program import write_program

        start = time.perf_counter()
        notes = remember_blobs(self.assembled.manifest, self.assembled.segments)
        notes[RUN_BYTES_NOTE] = str(run_bytes(self.assembled.manifest))  # its first load's limit check compares
        size = write_program(path, self.assembled.manifest, self.assembled.segments, alignment=alignment,
                             signer=_signer(sign), remember=True,  # its first load skips the checks
                             notes=notes)
        self.report.output, self.report.program_bytes = str(path), size
        self.report.timings["write"] = time.perf_counter() - start
        return size


def remember_blobs(manifest: Mapping[str, Any], segments: Sequence[Any]) -> dict[str, str]:
    """Blobs lowered on this machine are trusted: a runtime that checks unknown blobs in a separate
    process (:mod:`handoff.probe`) loads these directly. Returns their keys by note name, for the
    written file's record."""
    from .probe import blob_key, note_name, remember

    keys = {}
    for d in manifest["delegates"]:
        for e in (d, *d.get("fallbacks", ())):  # its own blob and its fallback copies (format 1.3)
            key = blob_key(e["backend"], e["backend_version"], segments[e["segment"]], e["metadata"])
            remember(e["backend"], key)
            keys[note_name(e["segment"], e["backend"], e["backend_version"])] = key
    return keys


def _signer(sign: bool) -> Any:
    if not sign:
        return None
    from .signing import local_key

    return local_key()


def backend_chain(backends: Sequence[str], plugins: Plugins, fallback: bool) -> list[str]:
    """Expand presets, check every backend is installed, and append ``tvm`` when falling back."""
    chain = plugins.registry.expand([b.strip() for b in backends if b.strip()])
    for b in chain:
        if b == HOST:
            raise HandoffError(f"'{HOST}' is the host, not a backend; it takes what no backend claims")
        plugins.spec(b)
    if fallback and FALLBACK_BACKEND not in chain:
        plugins.spec(FALLBACK_BACKEND)
        chain.append(FALLBACK_BACKEND)
    return chain


def partition(model: Any, example_inputs: Sequence[Any] = (), *, backends: Sequence[str] = (),
              input_shapes: Sequence[InputSpec] = (), options: Mapping[str, Mapping[str, Any]] | None = None,
              fallback: bool = True, aten: bool = True, limits: Mapping[str, Limits] | None = None,
              default_limits: Limits | None = None,
              on_lower_error: str = "fail", use_cache: bool = True, plugins: Plugins | None = None,
              progress: Callable[[str, int, int], None] | None = None, trust_model: bool = False,
              fallback_copies: bool = False, quantize: str | None = None, calibration: int | None = None,
              calibration_data: Any = None, capability: CapabilityCache | None = None,
              decompositions: Decompositions | None = None, fold: bool = True) -> PartitionResult:
    """Partition ``model`` across ``backends`` (priority order) and lower every partition.

    :param model: a MODEL string (``zoo:small_cnn``, ``m.pt2``, ``file.py:Name``), an
        ``nn.Module`` (with ``example_inputs``) or an ``ExportedProgram``.
    :param backends: backend ids or ``preset:NAME``, first = highest priority.
    :param options: backend id -> option name -> value (compile-time options; strings as typed on
        the command line, or values of the option's type).
    :param fallback: append the built-in ``tvm`` backend to take what the others leave.
    :param aten: allow host ops for nodes no backend takes (the CLI's ``--no-fallback`` turns off
        both this and ``fallback``); only ops on the runtime's allow-list (:mod:`handoff.hostops`).
    :param limits: backend id -> :class:`Limits` (min partition size, max partitions);
        backends not named get ``default_limits`` (min size :data:`DEFAULT_MIN_PARTITION_SIZE`).
    :param on_lower_error: ``"fail"`` or ``"fallback"`` (move a failed partition's nodes on).
    :param progress: called as ``progress(message, done, total)`` while lowering.
    :param trust_model: read model files that run code when loaded (a ``.pt2`` holding pickles).
    :param fallback_copies: store next to each vendor delegate a copy of the same partition
        compiled by the built-in ``tvm`` backend (for the host or ``options["tvm"]["target"]``),
        which the runtime runs where the vendor's runtime is missing or fails to load.
    :param quantize: ``"int8"``: PT2E-quantize the float model first with the selected backends'
        quantizers (:mod:`handoff.quantization`), calibrated on ``calibration`` random batches or on
        ``calibration_data`` (a ``.npz`` path or a sequence of input tuples). A model that already
        holds PT2E quantize/dequantize ops is partitioned as it is, without this.
    :param capability: where the backends' capability answers (``support``, ``fused_patterns``,
        ``check_partition``) are remembered; pass one :class:`handoff.cache.CapabilityCache` to
        several calls on the same model (``handoff compare`` does) to ask each backend once.
        Default: a new one, backed by ``$HANDOFF_HOME/capability`` unless ``use_cache=False``.
    :param decompositions: where the model's decompositions to core ATen are remembered; pass one
        :class:`handoff.export.Decompositions` to several calls on the same ``ExportedProgram`` (or
        ``ResolvedModel`` holding one; ``handoff compare`` does) to decompose it once per set of
        ops the backends keep whole. Default: decompose in this call.
    :param fold: evaluate what the model computes from its weights alone at partition time and
        store it as constants (:mod:`handoff.fold`; the report's ``folding`` says what); the CLI's
        ``--no-fold`` turns it off.
    """
    clock = _Clock()
    plugins = plugins or get_plugins()
    if on_lower_error not in ON_LOWER_ERROR:
        raise HandoffError(f"--on-lower-error {on_lower_error!r}: choose one of {', '.join(ON_LOWER_ERROR)}")
    chain = backend_chain(backends, plugins, fallback)
    if not chain and not aten:
        raise HandoffError("no backends selected and host ATen ops are off; pass --backends (installed: "
                           f"{', '.join(plugins.backends)}) or drop --no-fallback")
    given = {b: dict(o) for b, o in (options or {}).items()}
    compiled = [*chain, FALLBACK_BACKEND] if fallback_copies and FALLBACK_BACKEND not in chain else list(chain)
    for b in given:
        if b not in compiled:
            raise HandoffError(f"options given for backend '{b}', which is not selected; selected: {', '.join(chain)}")
    parsed = {b: plugins.parse_options(b, given.get(b, {})) for b in compiled}
    compilers = {b: plugins.compiler(b, given.get(b, {})) for b in compiled}
    for b in limits or {}:
        if b not in chain:
            raise HandoffError(f"partition limits given for backend '{b}', which is not selected; selected: {', '.join(chain)}")
    default_limits = default_limits or Limits(min_size=DEFAULT_MIN_PARTITION_SIZE)
    limits = {b: (limits or {}).get(b, default_limits) for b in chain}
    versions = {b: plugins.spec(b).version for b in compiled}
    identities = {b: f"{versions[b]};{plugins.code_identity(b)}" for b in compiled}

    with clock("export"):
        resolved = _resolve(model, example_inputs, input_shapes, plugins, trust_model)
    quantized = None
    if quantize:
        from .quantization import quantize_resolved

        with clock("quantize"):
            quantized = quantize_resolved(resolved, {b: compilers[b] for b in chain}, quantize, calibration,
                                          calibration_data)
        resolved = ResolvedModel(name=resolved.name, exported=quantized.exported,
                                 example_inputs=resolved.example_inputs)
    elif calibration is not None or calibration_data is not None:
        raise HandoffError("--calibration and --calibration-data calibrate --quantize; add --quantize int8")
    with clock("export"):
        keep = [op for b in chain for op in compilers[b].ops_to_not_decompose()]
        ep = export_model(resolved, keep, decompositions, fold)
        from .quantization import duplicate_dequantize, is_quantized, quantized_spans

        int8 = is_quantized(ep)
        if int8:
            duplicate_dequantize(ep)
        import torch

        decomp_table = torch.export.default_decompositions()
        for op in keep:
            decomp_table.pop(op, None)

    capability = capability if capability is not None else CapabilityCache(disk=use_cache)
    with clock("capability"):
        view = graph_view(ep)
        digest = graph_digest(ep)
        asked = {b: CapabilityCache.key("capability", b, identities[b], compilers[b].cache_key(),
                                        json.dumps(dict(parsed[b]), sort_keys=True, default=str), digest)
                 for b in compiled}
        support, patterns = {}, {}
        for b in chain:
            support[b], patterns[b] = _capability(b, compilers[b], ep, capability, asked[b])
        if int8:  # an op travels with its quantize/dequantize ops (handoff.quantization.quantized_spans)
            spans = quantized_spans(ep)
            for b in chain:
                patterns[b] += spans

    lowerer = Lowerer(ep, compilers, identities, parsed, decomp_table, use_cache=use_cache)
    excluded: dict[str, dict[str, str]] = {}
    moves: list[Move] = []
    no_host_reason = "--no-fallback" if not fallback else "--no-aten"
    while True:
        with clock("plan"):
            the_plan = plan(view, chain, support, patterns, limits, allow_host=aten,
                            excluded=excluded, no_host_reason=no_host_reason)
        with clock("capability"):
            shrunk = _check_partitions(the_plan, compilers, ep, capability, asked, excluded)
        if shrunk:
            continue
        _refuse_host_ops(view, the_plan)
        lowered = {}
        try:
            with clock("lower"):
                for i, part in enumerate(the_plan.partitions):
                    if progress:
                        progress(f"lowering {part.name} ({len(part.nodes)} nodes)", i, len(the_plan.partitions))
                    lowered[part.name] = lowerer.lower(part)
                if progress:
                    progress("lowered", len(the_plan.partitions), len(the_plan.partitions))
            break
        except LoweringFailure as fail:
            part = fail.part
            remembered = " (a cached failure of this partition; --no-cache compiles it again)" if fail.cached else ""
            if on_lower_error != "fallback":
                raise HandoffError(f"backend '{part.backend}' failed to lower partition {part.name} "
                                   f"({len(part.nodes)} nodes); first failing op: {fail.first_op}: {fail.message}"
                                   f"{remembered}; retry with --on-lower-error=fallback or drop '{part.backend}' "
                                   f"from --backends") from fail
            reason = f"lowering of {part.name} failed at {fail.first_op}: {fail.message}{remembered}"
            moves.append(Move(part.backend, part.name, list(part.nodes), reason))
            for n in part.nodes:
                excluded.setdefault(n, {})[part.backend] = reason

    copies: dict[str, list[Any]] = {}
    copy_notes: list[dict[str, Any]] = []
    if fallback_copies:
        with clock("capability"):
            tvm_support = support.get(FALLBACK_BACKEND) or _capability(
                FALLBACK_BACKEND, compilers[FALLBACK_BACKEND], ep, capability, asked[FALLBACK_BACKEND])[0]
        with clock("lower"):
            copies, copy_notes = _fallback_copies(the_plan, lowerer, tvm_support)
    with clock("lower"):
        metadata = {"model": resolved.name, "backends": chain, "folded": fold}
        recorded = {b: {k: str(v) for k, v in given.get(b, {}).items()} for b in compiled}
        assembled = assemble(ep, the_plan, lowered, recorded, versions, metadata, copies)
    report = Report.build(resolved.name, chain, view, the_plan, lowered, moves, assembled)
    report.copies = copy_notes
    report.folding = (folding(ep) or Folding()).to_json() if fold else None
    if int8:
        report.quantization = _quantization_note(quantized, the_plan, view, lowered)
    report.timings.update(clock.seconds)
    plugins.pm.hook.handoff_report(report=report)
    return PartitionResult(assembled, report, quantized, ep)


def _quantization_note(quantized: Any, the_plan: Plan, view: GraphView, lowered: Mapping[str, Any]) -> dict[str, Any]:
    """The report's ``quantization``: how the model was quantized (when by this run) and, per
    backend, the quantize/dequantize ops it received and how its delegates compute them."""
    from .quantization import QDQ_NAMESPACE

    note: dict[str, Any] = quantized.to_json() if quantized else {"scheme": "int8", "calibration": "quantized "
                                                                  "before handoff (a PT2E model)"}
    per: dict[str, dict[str, Any]] = {}
    for node in view.order:
        if view.ops[node].startswith(QDQ_NAMESPACE + "."):
            entry = per.setdefault(the_plan.assignment[node], {"qdq_ops": 0, "compute": []})
            entry["qdq_ops"] += 1
    for part in the_plan.partitions:
        how = lowered[part.name].lowered.metadata.get("int8_compute")
        if how and part.backend in per and how not in per[part.backend]["compute"]:
            per[part.backend]["compute"].append(how)
    note["backends"] = per
    return note


class _Clock:
    """Seconds spent per phase of :func:`partition` (the report's ``timings``)."""

    def __init__(self) -> None:
        self.seconds = {phase: 0.0 for phase in TIMED_PHASES}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


def _backend_call(backend: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a compiler method, turning a plugin's stray exception into a one-line error naming it."""
    try:
        return fn(*args)
    except HandoffError:
        raise
    except Exception as exc:
        raise HandoffError(f"backend '{backend}': {what} failed: {one_line(exc, 300)}") from exc


def _capability(backend: str, compiler: Any, ep: Any, capability: CapabilityCache,
                key: str) -> tuple[dict[str, str | None], list[list[str]]]:
    """``(support, fused patterns)`` of ``backend`` for ``ep``, asked once per graph (``capability``)."""
    def ask() -> dict[str, Any]:
        return {"support": {n: (None if r is None else str(r))
                            for n, r in dict(_backend_call(backend, "capability check", compiler.support, ep)).items()},
                "patterns": [list(p) for p in _backend_call(backend, "capability check", compiler.fused_patterns, ep)]}

    answer = capability.get(CapabilityCache.key(key, "support"), ask)
    return dict(answer["support"]), [list(p) for p in answer["patterns"]]


def _fallback_copies(the_plan: Plan, lowerer: Lowerer,
                     tvm_support: Mapping[str, str | None]) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """Each vendor partition lowered again by the built-in ``tvm`` backend, where it takes every
    node: ``(partition name -> [copy], report entries)``; a partition ``tvm`` cannot take whole
    gets no copy, and its entry says why."""
    copies: dict[str, list[Any]] = {}
    notes = []
    for part in the_plan.partitions:
        if part.backend == FALLBACK_BACKEND:
            continue
        note: dict[str, Any] = {"partition": part.name, "backend": part.backend, "copy": None, "bytes": 0}
        declined = next(((n, r) for n in part.nodes if (r := tvm_support.get(n, "not reported")) is not None), None)
        if declined:
            note["reason"] = f"tvm declines {declined[0]}: {declined[1]}"
        else:
            try:
                lp = lowerer.lower(Partition(FALLBACK_BACKEND, f"{part.name}_copy", part.nodes))
            except LoweringFailure as fail:
                note["reason"] = f"tvm failed to lower it at {fail.first_op}: {fail.message}"
            else:
                copies[part.name] = [lp]
                note.update(copy=FALLBACK_BACKEND, bytes=len(lp.lowered.blob))
        notes.append(note)
    return copies, notes


def _check_partitions(the_plan: Plan, compilers: Mapping[str, Any], ep: Any, capability: CapabilityCache,
                      asked: Mapping[str, str], excluded: dict[str, dict[str, str]]) -> bool:
    """Ask each backend whether it can compile each of its planned partitions whole
    (``Compiler.check_partition``); nodes it takes out are excluded from it. Returns whether any
    partition shrank (the caller plans again). Answers are remembered per graph and partition
    (``capability``)."""
    shrunk = False
    for part in the_plan.partitions:
        def ask(part: Partition = part) -> dict[str, str]:
            answer = _backend_call(part.backend, f"check_partition of {part.name}",
                                   compilers[part.backend].check_partition, ep, list(part.nodes))
            return {n: str(r) for n, r in dict(answer or {}).items() if n in set(part.nodes)}

        checked = capability.get(CapabilityCache.key(asked[part.backend], "check_partition", *part.nodes), ask)
        for node, reason in checked.items():
            if part.backend not in excluded.get(node, {}):
                excluded.setdefault(node, {})[part.backend] = reason
                shrunk = True
    return shrunk


def _refuse_host_ops(view: GraphView, the_plan: Plan) -> None:
    """A node left to the host must be an op the runtime runs there (:mod:`handoff.hostops`)."""
    for node in the_plan.host_nodes:
        why = hostops.refusal(view.ops[node])
        if why:
            declined = "; ".join(f"{b}: {r}" for b, r in the_plan.reasons.get(node, {}).items()) or "no backend tried"
            raise HandoffError(f"node {view.label(node)} would run on the host, but {why}; every backend declined it "
                               f"({declined}); select a backend that takes it")


def _resolve(model: Any, example_inputs: Sequence[Any], input_shapes: Sequence[InputSpec],
             plugins: Plugins, trust_model: bool = False) -> ResolvedModel:
    if isinstance(model, str):
        return resolve_model(model, input_shapes, plugins, trust_model)
    if isinstance(model, ResolvedModel):
        return model
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        return ResolvedModel(name="ExportedProgram", exported=model)
    if isinstance(model, torch.nn.Module):
        if not example_inputs:
            raise HandoffError(f"{type(model).__name__}: pass example_inputs to partition an nn.Module")
        return ResolvedModel(name=type(model).__name__, module=model, example_inputs=tuple(example_inputs))
    raise HandoffError(f"cannot partition a {type(model).__name__}; pass a MODEL string, nn.Module or ExportedProgram")
