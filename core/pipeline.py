"""The ahead-of-time pipeline in one call: export -> partition -> lower -> program.

:func:`partition` is what ``handoff partition`` runs; it returns a :class:`PartitionResult`
holding the program (manifest + segments, written with :meth:`PartitionResult.write`) and the
delegation report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from .errors import HandoffError
from .export import export_model, resolve_model
from .lower import Assembled, Lowerer, LoweringFailure, Move, assemble
from .partitioner import HOST, Limits, graph_view, plan
from .plugins import Plugins, get_plugins
from .report import Report
from .zoo import InputSpec, ResolvedModel

FALLBACK_BACKEND = "tvm"
ON_LOWER_ERROR = ("fail", "fallback")


@dataclasses.dataclass
class PartitionResult:
    assembled: Assembled
    report: Report

    def to_bytes(self, alignment: int = 64) -> bytes:
        from .program import program_bytes

        return program_bytes(self.assembled.manifest, self.assembled.segments, alignment=alignment)

    def write(self, path: str, alignment: int = 64) -> int:
        """Write the ``.hof`` file; returns its size in bytes."""
        from .program import write_program

        size = write_program(path, self.assembled.manifest, self.assembled.segments, alignment=alignment)
        self.report.output, self.report.program_bytes = str(path), size
        return size


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
              input_shapes: Sequence[InputSpec] = (), options: Mapping[str, Mapping[str, str]] | None = None,
              fallback: bool = True, aten: bool = True, limits: Mapping[str, Limits] | None = None,
              default_limits: Limits = Limits(),
              on_lower_error: str = "fail", use_cache: bool = True, plugins: Plugins | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> PartitionResult:
    """Partition ``model`` across ``backends`` (priority order) and lower every partition.

    :param model: a MODEL string (``zoo:small_cnn``, ``m.pt2``, ``file.py:Name``), an
        ``nn.Module`` (with ``example_inputs``) or an ``ExportedProgram``.
    :param backends: backend ids or ``preset:NAME``, first = highest priority.
    :param options: backend id -> option name -> value (compile-time options).
    :param fallback: append the built-in ``tvm`` backend to take what the others leave.
    :param aten: allow host ATen ops for nodes no backend takes (the CLI's ``--no-fallback``
        turns off both this and ``fallback``).
    :param limits: backend id -> :class:`Limits` (min partition size, max partitions);
        backends not named get ``default_limits``.
    :param on_lower_error: ``"fail"`` or ``"fallback"`` (move a failed partition's nodes on).
    :param progress: called as ``progress(message, done, total)`` while lowering.
    """
    plugins = plugins or get_plugins()
    if on_lower_error not in ON_LOWER_ERROR:
        raise HandoffError(f"--on-lower-error {on_lower_error!r}: choose one of {', '.join(ON_LOWER_ERROR)}")
    chain = backend_chain(backends, plugins, fallback)
    if not chain and not aten:
        raise HandoffError("no backends selected and host ATen ops are off; pass --backends (installed: "
                           f"{', '.join(plugins.backends)}) or drop --no-fallback")
    options = {b: dict(o) for b, o in (options or {}).items()}
    for b in options:
        if b not in chain:
            raise HandoffError(f"options given for backend '{b}', which is not selected; selected: {', '.join(chain)}")
    compilers = {b: plugins.compiler(b, options.get(b, {})) for b in chain}
    for b in limits or {}:
        if b not in chain:
            raise HandoffError(f"partition limits given for backend '{b}', which is not selected; selected: {', '.join(chain)}")
    limits = {b: (limits or {}).get(b, default_limits) for b in chain}
    versions = {b: plugins.spec(b).version for b in chain}

    resolved = _resolve(model, example_inputs, input_shapes, plugins)
    keep = [op for b in chain for op in compilers[b].ops_to_not_decompose()]
    ep = export_model(resolved, keep)
    import torch

    decomp_table = torch.export.default_decompositions()
    for op in keep:
        decomp_table.pop(op, None)

    view = graph_view(ep)
    support, patterns = {}, {}
    for b in chain:
        try:
            support[b] = dict(compilers[b].support(ep))
            patterns[b] = [list(p) for p in compilers[b].fused_patterns(ep)]
        except HandoffError:
            raise
        except Exception as exc:
            raise HandoffError(f"backend '{b}': capability check failed: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:300]}") from exc

    lowerer = Lowerer(ep, compilers, versions, options, decomp_table, use_cache=use_cache)
    excluded: dict[str, dict[str, str]] = {}
    moves: list[Move] = []
    no_host_reason = "--no-fallback" if not fallback else "--no-aten"
    while True:
        the_plan = plan(view, chain, support, patterns, limits, allow_host=aten,
                        excluded=excluded, no_host_reason=no_host_reason)
        lowered = {}
        try:
            for i, part in enumerate(the_plan.partitions):
                if progress:
                    progress(f"lowering {part.name} ({len(part.nodes)} nodes)", i, len(the_plan.partitions))
                lowered[part.name] = lowerer.lower(part)
            if progress:
                progress("lowered", len(the_plan.partitions), len(the_plan.partitions))
            break
        except LoweringFailure as fail:
            part = fail.part
            if on_lower_error != "fallback":
                raise HandoffError(f"backend '{part.backend}' failed to lower partition {part.name} "
                                   f"({len(part.nodes)} nodes); first failing op: {fail.first_op}: {fail.message}; "
                                   f"retry with --on-lower-error=fallback or drop '{part.backend}' from --backends") from fail
            reason = f"lowering of {part.name} failed at {fail.first_op}: {fail.message}"
            moves.append(Move(part.backend, part.name, list(part.nodes), reason))
            for n in part.nodes:
                excluded.setdefault(n, {})[part.backend] = reason

    metadata = {"model": resolved.name, "backends": chain}
    assembled = assemble(ep, the_plan, lowered, options, versions, metadata)
    report = Report.build(resolved.name, chain, view, the_plan, lowered, moves)
    plugins.pm.hook.handoff_report(report=report)
    return PartitionResult(assembled, report)


def _resolve(model: Any, example_inputs: Sequence[Any], input_shapes: Sequence[InputSpec],
             plugins: Plugins) -> ResolvedModel:
    if isinstance(model, str):
        return resolve_model(model, input_shapes, plugins)
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
