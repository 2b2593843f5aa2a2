"""One conformance case against one backend: partition it with that backend alone, run the
program, compare with eager PyTorch, and say what went wrong in one of a few words (:data:`CAUSES`).

A case passes when the backend declines it with a reason for every node (a rejection is data), or
when what it claims lowers, loads, runs and matches eager within the tolerance of the case's
dtype. Anything claimed that then fails is a failure: a lowering error, a load error, a run error,
wrong output dtypes or shapes, or a wrong result. Nodes the backend declines run on the host.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import HandoffError, one_line
from ..testing import TOLERANCE
from .expectations import Expectations

#: Why a case failed, in the words the report and the summary table use.
CAUSES = ("compiler unavailable", "capability error", "declined without reason", "promised op declined",
          "lowering error", "load error", "run error", "wrong dtype/shape", "wrong result", "internal error")
#: Runs of each program, each on fresh random inputs.
SEEDS = (101, 202)



class CaseFailure(Exception):
    """A case the backend got wrong: its :data:`CAUSES` word and a one-line message."""

    def __init__(self, cause: str, message: str):
        super().__init__(f"{cause}: {message}")
        self.cause, self.message = cause, message


@dataclasses.dataclass
class Outcome:
    """What one run of a case did (one per fixed item, one per drawn example)."""

    case: str
    category: str
    dtype: str
    mode: str
    dims: dict[str, int]
    status: str = "passed"  # passed | declined | lowered (run half skipped) | failed
    cause: str | None = None
    message: str = ""
    nodes: int = 0
    delegated_nodes: int = 0
    partitions: int = 0
    lowering_seconds: float = 0.0  # what the backend's compiler took (also for blobs the cache supplied)
    cached_partitions: int = 0
    blob_bytes: int = 0
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    snr_db: float | None = None
    tolerance: str | None = None
    delegated_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    declined: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class Target:
    """The backend under test and what the suite was told about it."""

    backend: str
    plugins: Any  # handoff.Plugins
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    runtime_options: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerance: str | None = None  # a TOLERANCE row for every float output (a backend computing in fp16)
    expectations: Expectations = dataclasses.field(default_factory=Expectations)
    _available: dict[str, tuple[bool, str]] = dataclasses.field(default_factory=dict)

    def compiler_available(self) -> tuple[bool, str]:
        if "compiler" not in self._available:
            self._available["compiler"] = self.plugins.compiler_available(self.backend)
        return self._available["compiler"]

    def runtime_available(self) -> tuple[bool, str]:
        if "runtime" not in self._available:
            self._available["runtime"] = self.plugins.runtime_available(self.backend)
        return self._available["runtime"]


class Variant:
    """A case built at some dimensions in one dtype: the module under test, the float32 reference
    holding the same (rounded) weights, and the exported program (shared by every backend)."""

    def __init__(self, case: Any, dtype: str, dims: Mapping[str, int]):
        import torch

        from .cases import random_values

        self.case, self.dtype, self.dims = case, dtype, dict(dims)
        base = case.build(self.dims)
        if dtype == "float16":
            self.module = base.half()
            self.reference = _float_copy(self.module)
        else:
            self.module = self.reference = base
        gen = torch.Generator().manual_seed(case.seed)
        self.example = tuple(random_values(shape, kind, dtype, self.dims, gen)
                             for shape, kind in case.input_shapes(self.dims))
        self._exported: Any = None

    def exported(self) -> Any:
        """``torch.export`` of the module (not yet decomposed: each backend keeps its own ops whole)."""
        if self._exported is None:
            import torch

            from ..export import quiet_torch

            with torch.no_grad(), quiet_torch():
                self._exported = torch.export.export(self.module, self.example, strict=False)
        return self._exported

    def inputs(self, seed: int) -> tuple[list[np.ndarray], list[Any]]:
        """Fresh inputs: numpy arrays for the program, tensors for the float32 reference."""
        import torch

        from .cases import random_values

        gen = torch.Generator().manual_seed(self.case.seed ^ seed)
        values = [random_values(shape, kind, self.dtype, self.dims, gen)
                  for shape, kind in self.case.input_shapes(self.dims)]
        ref = [v.float() if v.dtype == torch.float16 else v for v in values]
        return [v.numpy() for v in values], ref

    def expected(self, ref_inputs: Sequence[Any]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.reference(*ref_inputs)
        return [t.detach().numpy() for t in _flatten(out)]


def _float_copy(module: Any) -> Any:
    import copy

    return copy.deepcopy(module).float()


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return [out]


_VARIANTS: collections.OrderedDict[tuple[Any, ...], Variant] = collections.OrderedDict()
_VARIANTS_KEPT = 8  # the items of one variant for every backend run one after another


def variant(case: Any, dtype: str, dims: Mapping[str, int]) -> Variant:
    """The (memoised) :class:`Variant`: every backend of a session shares its export."""
    key = (case.name, dtype, tuple(sorted(dims.items())))
    if key in _VARIANTS:
        _VARIANTS.move_to_end(key)
        return _VARIANTS[key]
    built = _VARIANTS[key] = Variant(case, dtype, dims)
    while len(_VARIANTS) > _VARIANTS_KEPT:
        _VARIANTS.popitem(last=False)
    return built


def run_case(target: Target, case: Any, dtype: str, dims: Mapping[str, int], mode: str) -> Outcome:
    """Lower ``case`` with the target backend alone and, where its runtime can run here, run and
    compare it. Returns the :class:`Outcome` (status ``passed``, ``declined`` or ``lowered``);
    raises :class:`CaseFailure` carrying a failed one (``exc.outcome``)."""
    outcome = Outcome(case.name, case.category, dtype, mode, dict(dims))
    try:
        _run(target, case, dtype, dims, outcome)
    except CaseFailure as exc:
        outcome.status, outcome.cause, outcome.message = "failed", exc.cause, exc.message
        exc.outcome = outcome  # type: ignore[attr-defined]
        raise
    return outcome


def lower(target: Target, var: Variant) -> Any:
    """Partition ``var`` with the target backend alone (nodes it declines go to the host):
    the :class:`handoff.PartitionResult`, or ``None`` when it declined a node the host cannot run
    (so what it claimed cannot run either). Raises :class:`CaseFailure` for its errors."""
    import handoff
    from handoff import Limits

    from ..lower import LoweringFailure
    from ..zoo import ResolvedModel

    bid = target.backend
    ok, why = target.compiler_available()
    if not ok:
        raise CaseFailure("compiler unavailable", why)
    resolved = ResolvedModel(name=f"{var.case.name}[{var.dtype}]", exported=var.exported())
    try:
        return handoff.partition(resolved, backends=[bid], options={bid: target.options} if target.options else None,
                                 fallback=False, aten=True, default_limits=Limits(min_size=1),
                                 on_lower_error="fail", plugins=target.plugins)
    except HandoffError as exc:
        if isinstance(exc.__cause__, LoweringFailure):
            raise CaseFailure("lowering error", str(exc)) from exc
        if "would run on the host" in str(exc):
            return None
        raise CaseFailure("capability error", str(exc)) from exc


def _run(target: Target, case: Any, dtype: str, dims: Mapping[str, int], outcome: Outcome) -> None:
    bid = target.backend
    var = variant(case, dtype, dims)
    result = lower(target, var)
    if result is None:
        outcome.status = "declined"
        outcome.message = "not run: it declined a node the host cannot run, so what it claimed cannot run either"
        return
    report = result.report
    stats = report.stats[bid]
    outcome.nodes, outcome.delegated_nodes, outcome.partitions = report.total_nodes, stats.nodes, stats.partitions
    outcome.lowering_seconds, outcome.blob_bytes = stats.compile_seconds, stats.blob_bytes
    outcome.cached_partitions, outcome.delegated_ops = stats.cached_partitions, dict(stats.ops)
    outcome.declined = _declined(report, bid)

    silent = sorted({d["op"] for d in outcome.declined if not d["reason"].strip() or d["reason"].startswith("not reported")})
    if silent:
        raise CaseFailure("declined without reason", f"{bid} declined {', '.join(silent)} without a reason; return "
                          "a one-line reason from Compiler.support for every node it does not take")
    broken = target.expectations.broken_promises(bid, case.name, dtype, outcome.declined, stats.nodes,
                                                 report.total_nodes)
    if broken:
        raise CaseFailure("promised op declined", broken)
    if stats.nodes == 0:
        outcome.status = "declined"
        outcome.message = "; ".join(f"{d['op']}: {d['reason']}" for d in outcome.declined)[:500]
        return
    ok, why = target.runtime_available()
    if not ok:
        outcome.status, outcome.message = "lowered", f"run half skipped: {why}"
        return
    _check_runs(target, var, result, outcome)


def _declined(report: Any, bid: str) -> list[dict[str, Any]]:
    """The backend's declined nodes grouped by op and reason."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for d in report.declined:
        if d["ran_on"] != bid:
            counts[(d["op"], str(d["reasons"].get(bid) or ""))] += 1
    return [{"op": op, "reason": reason, "count": n} for (op, reason), n in sorted(counts.items())]


def _check_runs(target: Target, var: Variant, result: Any, outcome: Outcome) -> None:
    import handoff

    options = {target.backend: target.runtime_options} if target.runtime_options else None
    try:
        program = handoff.load(result.to_bytes(), options=options, plugins=target.plugins)
    except HandoffError as exc:
        raise CaseFailure("load error", str(exc)) from exc
    except Exception as exc:  # the core wraps runtime errors; anything else is still the load's
        raise CaseFailure("load error", one_line(exc)) from exc
    worst: dict[str, Any] = {}
    with program:
        for seed in SEEDS:
            inputs, ref_inputs = var.inputs(seed)
            try:
                got = program.run(inputs)
            except HandoffError as exc:
                cause = "wrong dtype/shape" if "the program expects" in str(exc) else "run error"
                raise CaseFailure(cause, str(exc)) from exc
            except Exception as exc:  # execute raised: the core passes it through
                raise CaseFailure("run error", f"execute raised {one_line(exc)}") from exc
            want = var.expected(ref_inputs)
            if len(got) != len(want):
                raise CaseFailure("wrong dtype/shape", f"the program returned {len(got)} outputs, eager {len(want)}")
            for i, (g, w) in enumerate(zip(got, want)):
                row = _tolerance_row(target, var, g)
                diff = compare(g, w, row)
                diff["output"] = i
                if diff["bad"]:
                    outcome.max_abs_error, outcome.snr_db = diff["max_abs_error"], diff["snr_db"]
                    outcome.max_rel_error, outcome.tolerance = diff["max_rel_error"], row
                    raise CaseFailure("wrong dtype/shape" if diff.get("shape") else "wrong result",
                                      f"seed {seed}, {diff['message']}")
                if not worst or (diff["max_rel_error"] or 0.0) > (worst["max_rel_error"] or 0.0):
                    worst = dict(diff, tolerance=row)
    if worst:
        outcome.max_abs_error, outcome.max_rel_error = worst["max_abs_error"], worst["max_rel_error"]
        outcome.snr_db, outcome.tolerance = worst["snr_db"], worst["tolerance"]


def _tolerance_row(target: Target, var: Variant, got: np.ndarray) -> str:
    """The row of :data:`handoff.testing.TOLERANCE` an output is compared with: ``--handoff-
    tolerance`` for float outputs when given, the case's own row (quantized patterns), else the
    output's dtype (integers and booleans: exact)."""
    if got.dtype.kind == "f":
        if target.tolerance:
            return target.tolerance
        if var.case.tolerance:
            return var.case.tolerance
    name = str(got.dtype)
    return name if name in TOLERANCE else "exact"


def compare(got: np.ndarray, want: np.ndarray, row: str) -> dict[str, Any]:
    """``got`` against ``want`` with the ``row`` of :data:`TOLERANCE` (``rtol``, plus an absolute
    floor of the same fraction of ``want``'s largest magnitude, as :func:`handoff.testing.
    assert_matches_eager`): errors, SNR, and a message naming the worst entry when out of tolerance."""
    if got.shape != want.shape:
        return {"bad": True, "shape": True, "max_abs_error": None, "max_rel_error": None, "snr_db": None,
                "message": f"shape {list(got.shape)}, eager gives {list(want.shape)}"}
    tol = TOLERANCE.get(row, 0.0)
    g, w = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(w)
    err = np.where(both_nan, 0.0, np.abs(g - w))
    err = np.where(np.isnan(err), np.inf, err)
    finite = np.abs(w[np.isfinite(w)])
    scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    allowed = tol * np.abs(np.nan_to_num(w, posinf=0.0, neginf=0.0)) + tol * scale
    bad = (err > allowed) & ~(np.isinf(w) & (g == w))
    max_abs = float(err.max()) if err.size else 0.0
    signal, noise = float(np.sum(np.nan_to_num(w) ** 2)), float(np.sum(np.nan_to_num(err, posinf=1e300) ** 2))
    snr = None if noise == 0.0 else (10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    out = {"bad": bool(bad.any()), "max_abs_error": max_abs, "max_rel_error": max_abs / scale,
           "snr_db": None if snr is None or not math.isfinite(snr) else snr, "message": ""}
    if out["bad"]:
        idx = np.unravel_index(int(np.argmax(np.where(bad, err - allowed, -np.inf))), err.shape)
        where = tuple(int(i) for i in idx)
        words = f"{row}: {tol:g} relative" if tol else "exact"
        snr_text = "n/a" if out["snr_db"] is None else f"{out['snr_db']:.1f} dB"
        out["message"] = (f"output {list(got.shape)} {got.dtype}: {int(bad.sum())} of {bad.size} values out of "
                          f"tolerance ({words}); worst at {list(where)}: got {got[where]!r}, eager {want[where]!r}; "
                          f"max error {max_abs:.3g}, SNR {snr_text}")
    return out

