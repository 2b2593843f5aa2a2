"""``handoff compare``: lower one model with several strategies and measure each program.

The model is exported once; each strategy is partitioned and lowered from that export (the
lowering cache shares partitions with equal content between strategies and runs, and remembers
what the compiler took, so a cached run still reports it; one :class:`handoff.cache.CapabilityCache`
asks each backend about the graph once for all strategies, and remembers it for later runs). Each runnable program is then measured
in its own worker process (backends keep per-process state: XNNPACK's thread pool, QNN's
precision), all workers alive at once and timed in interleaved rounds, in rotated order, so drift
of a shared machine does not favour one (:func:`handoff.bench.interleaved`). Outputs are compared
with eager PyTorch on the same fresh random inputs; with ``per_delegate`` every delegate is also
checked on its own (:mod:`handoff.numerics`). A strategy whose runtime is absent here is reported
with its size and coverage, "lowered, not runnable here"; one that fails to lower, with the error.

With ``devices`` (``--rpc HOST:PORT --key K1,K2``) every strategy is measured on a device of
every key instead, from the pool of a TVM RPC tracker (:mod:`handoff.remote`): a row per strategy
and key. Programs are built here, for the ``tvm`` target of each key (``--key-target K=TARGET``,
or what the device says it is; a strategy that tunes measures its candidates on the key's
devices), and shipped; the device loads, runs and times them, one session per timed round, and
the outputs come back to be compared with eager PyTorch here. A strategy using a backend the
device cannot run is "not runnable on K", with the device's reason; a device that fails marks
its row failed, with one line naming the key and the tracker.

This module imports no torch at module level: the workers import it to run programs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import os
import time
import types
from typing import Any, Callable, Mapping, Sequence

from . import numerics
from .bench import errors, interleaved, percentile
from .errors import HandoffError, one_line
from .strategies import Strategy
from .tempfiles import temp_file

#: Seconds a worker may take to answer one request (load, a round of timed runs, the checks).
WORKER_TIMEOUT = 900.0
#: Default measurement settings of ``handoff compare``.
DEFAULT_RUNS, DEFAULT_ROUNDS, DEFAULT_WARMUP, DEFAULT_SEED = 50, 10, 3, 1
#: What the Pareto front minimises.
PARETO_OBJECTIVES = ("p50_ms", "program_bytes", "max_abs_error")

OK, NOT_RUNNABLE, FAILED = "ok", "not runnable here", "failed"


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where ``compare --rpc`` measures: a device of each of ``keys`` from the pool of the TVM RPC
    tracker at ``rpc``. ``key_targets``: ``K=TARGET`` items (:func:`handoff.remote.key_targets`);
    ``wait_s``: how long to wait for a free device; ``timeout_s``: a session's limit (0: none)."""

    rpc: str
    keys: tuple[str, ...]
    key_targets: tuple[str, ...] = ()
    wait_s: float = 120.0
    timeout_s: float = 0.0


@dataclasses.dataclass
class StrategyResult:
    """What one strategy produced and measured. Times are in milliseconds except the lowering's
    (seconds); ``status`` is ``ok``, ``not runnable here`` (lowered, with size and coverage) or
    ``failed`` (``reason`` says why)."""

    strategy: Strategy
    status: str = OK
    reason: str = ""
    key: str | None = None  # the device key it was measured on (compare --rpc); None: here
    chain: list[str] = dataclasses.field(default_factory=list)
    coverage: dict[str, float] = dataclasses.field(default_factory=dict)  # backend (and "aten") -> % of nodes
    delegates: dict[str, int] = dataclasses.field(default_factory=dict)
    crossings: int = 0
    capability_seconds: float = 0.0  # this run's backend capability checks (support, check_partition)
    decompose_seconds: float = 0.0  # this run's decomposition to core ATen (0 when shared with an earlier strategy)
    lower_seconds: float = 0.0  # this run's
    compile_seconds: float = 0.0  # what the compilers took to make the blobs (remembered by the cache)
    cached_partitions: int = 0
    program_bytes: int = 0
    moves: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    declined: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    load_ms: float | None = None
    first_run_ms: float | None = None
    samples_ms: list[float] = dataclasses.field(default_factory=list)
    max_abs_error: float | None = None
    snr_db: float | None = None
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    per_delegate: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pareto: bool = False

    def percentile_ms(self, pct: float) -> float | None:
        return percentile(self.samples_ms, pct) if self.samples_ms else None

    @property
    def label(self) -> str:
        """The strategy's name, and the device key it ran on."""
        return self.strategy.name + (f" on {self.key}" if self.key else "")

    @property
    def status_text(self) -> str:
        """``status``, with "here" replaced by the device key for a remote row."""
        return f"not runnable on {self.key}" if self.status == NOT_RUNNABLE and self.key else self.status

    @property
    def p50_ms(self) -> float | None:
        return self.percentile_ms(50)

    @property
    def p90_ms(self) -> float | None:
        return self.percentile_ms(90)

    def to_json(self) -> dict[str, Any]:
        return {**self.strategy.to_json(), "key": self.key, "status": self.status_text, "reason": self.reason,
                "chain": self.chain,
                "coverage_percent": {b: round(c, 2) for b, c in self.coverage.items()},
                "delegates": self.delegates, "delegate_count": sum(self.delegates.values()),
                "crossings": self.crossings, "capability_seconds": round(self.capability_seconds, 3),
                "decompose_seconds": round(self.decompose_seconds, 3), "lower_seconds": round(self.lower_seconds, 3),
                "compile_seconds": round(self.compile_seconds, 3), "cached_partitions": self.cached_partitions,
                "program_bytes": self.program_bytes, "load_ms": _r(self.load_ms), "first_run_ms": _r(self.first_run_ms),
                "p50_ms": _r(self.p50_ms), "p90_ms": _r(self.p90_ms), "runs": len(self.samples_ms),
                "max_abs_error": jsonable(self.max_abs_error), "snr_db": jsonable(self.snr_db),
                "outputs": jsonable(self.outputs), "pareto": self.pareto, "moves": self.moves,
                "declined": self.declined, "per_delegate": jsonable(self.per_delegate)}


@dataclasses.dataclass
class CompareResult:
    model: str
    strategies: list[StrategyResult]
    inputs_seed: int
    runs: int
    rounds: int
    warmup: int
    export_seconds: float
    auto: bool = False
    per_delegate: bool = False
    tolerance: float = numerics.DEFAULT_TOLERANCE
    worker_groups: int = 1  # strategies were timed interleaved within each group (--max-workers)
    rpc: str | None = None  # the tracker of the devices (compare --rpc)
    #: key -> {"target": the tvm target built for it, and what a device of it said about itself}
    devices: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "rpc": self.rpc, "devices": self.devices, "inputs_seed": self.inputs_seed,
                "runs": self.runs, "rounds": self.rounds,
                "warmup": self.warmup, "export_seconds": round(self.export_seconds, 3), "auto": self.auto,
                "per_delegate": self.per_delegate, "tolerance": self.tolerance, "worker_groups": self.worker_groups,
                "pareto_objectives": list(PARETO_OBJECTIVES),
                "strategies": [s.to_json() for s in self.strategies],
                **({"by_key": {name: {key: _cell_json(r) for key, r in cells.items()}
                               for name, cells in self.by_key().items()}} if self.devices else {})}

    def by_key(self) -> dict[str, dict[str, StrategyResult]]:
        """The remote rows as a matrix: strategy name -> device key -> its row, in the order
        compared (``compare --rpc``; empty for a local compare)."""
        matrix: dict[str, dict[str, StrategyResult]] = {}
        for r in self.strategies:
            if r.key is not None:
                matrix.setdefault(r.strategy.name, {})[r.key] = r
        return matrix


#: What ``by_key`` in the JSON holds for each strategy and key (the row has the rest).
CELL_FIELDS = ("status", "reason", "program_bytes", "load_ms", "first_run_ms", "p50_ms", "p90_ms", "runs",
               "max_abs_error", "snr_db", "pareto")


def _cell_json(r: StrategyResult) -> dict[str, Any]:
    j = r.to_json()
    return {k: j[k] for k in CELL_FIELDS}


def compare(model: Any, strategies: Sequence[Strategy], *, runs: int = DEFAULT_RUNS, rounds: int = DEFAULT_ROUNDS,
            warmup: int = DEFAULT_WARMUP, seed: int = DEFAULT_SEED, per_delegate: bool = False,
            tolerance: float = numerics.DEFAULT_TOLERANCE, input_shapes: Sequence[Any] = (),
            runtime_options: Mapping[str, Mapping[str, str]] | None = None, on_lower_error: str = "fallback",
            use_cache: bool = True, auto: bool = False, max_workers: int | None = None, plugins: Any = None,
            trust_model: bool = False, devices: Devices | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> CompareResult:
    """Lower ``model`` with each of ``strategies`` and measure every program (see the module
    docstring). ``runs`` timed runs per strategy in ``rounds`` rounds, after ``warmup`` untimed
    ones; inputs drawn with ``seed``; ``runtime_options`` apply to every program using that
    backend. ``on_lower_error`` as for :func:`handoff.partition` (default ``fallback``: a partition
    that fails to lower moves to the next backend, and the strategy lists the move).
    ``max_workers`` caps the worker processes alive at once (each holds its backends' runtimes, a
    few hundred MB): strategies are then measured in consecutive groups, interleaved within each
    group only. Default: all at once. ``trust_model``: read a model file that runs code when
    loaded (a ``.pt2`` holding pickles). ``devices``: measure on remote devices, a row per
    strategy and device key (module docstring)."""
    from .plugins import get_plugins

    plugins = plugins or get_plugins()
    if max_workers is not None and max_workers < 1:
        raise HandoffError(f"--max-workers {max_workers}: need at least 1")
    if runs < 1 or rounds < 1 or warmup < 0:
        raise HandoffError(f"--runs {runs}, --rounds {rounds}, --warmup {warmup}: need runs and rounds >= 1, warmup >= 0")
    if not strategies:
        raise HandoffError("no strategies to compare; pass --strategy SPEC (e.g. xnnpack) or --strategies auto")
    for s in strategies:
        _check_strategy(s, plugins)
    if devices is not None and per_delegate:
        raise HandoffError("--per-delegate checks each delegate on this machine; run it without --rpc (the rows "
                           "measured here check the same programs' delegates)")
    say = progress or (lambda message, done, total: None)
    device_info = _ask_devices(devices, say) if devices is not None else {}
    builds = _device_builds(strategies, devices, device_info, plugins) if devices is not None else \
        [(s, s, None) for s in strategies]
    total = len(builds)

    say("exporting", 0, total)
    start = time.perf_counter()
    resolved, eager, inputs = _export_once(model, input_shapes, seed, plugins, trust_model)
    export_seconds = time.perf_counter() - start

    from .cache import CapabilityCache
    from .export import Decompositions

    results: list[StrategyResult] = []
    programs: dict[int, bytes] = {}
    cases: dict[int, list[numerics.DelegateCase]] = {}
    lowered: dict[Strategy, tuple[StrategyResult, bytes | None, list[numerics.DelegateCase]]] = {}
    capability = CapabilityCache(disk=use_cache)  # each backend is asked once per graph, not per strategy
    decompositions = Decompositions()  # the export decomposed once per set of ops the chain keeps whole
    for i, (s, build, key) in enumerate(builds):
        entry = lowered.get(build) if key is not None else None  # keys with the same target share one build
        if entry is None:
            say(f"lowering {s.name}" + (f" for {key}" if key else ""), i, total)
            entry = lowered[build] = _lower(build, resolved, inputs, per_delegate, on_lower_error, use_cache,
                                            plugins, lambda m, d, t, name=s.name, i=i: say(f"{name}: {m}", i, total),
                                            capability, decompositions)
        result, program, strategy_cases = entry
        if key is not None:
            result = _device_row(result, s, key, device_info[key])
        results.append(result)
        if program is not None:
            programs[i] = program
            cases[i] = strategy_cases
    order = list(programs)
    size = max_workers or len(order) or 1
    groups = [order[k:k + size] for k in range(0, len(order), size)]
    for group in groups:
        _measure(results, {i: programs[i] for i in group}, cases, inputs, eager, runs, rounds, warmup,
                 runtime_options or {}, plugins, say, devices)
    for r in results:
        r.per_delegate = numerics.mark(r.per_delegate, tolerance)
    _mark_pareto(results)
    say("done", total, total)
    return CompareResult(resolved.name, results, seed, runs, rounds, warmup, export_seconds, auto, per_delegate,
                         tolerance, len(groups), devices.rpc if devices else None, device_info)


# -- remote devices ---------------------------------------------------------------------------

def _ask_devices(devices: Devices, say: Callable[[str, int, int], None]) -> dict[str, dict[str, Any]]:
    """Each key's target and what a device of it says about itself (an unreachable tracker or an
    unregistered key stops the run here, before anything is lowered)."""
    from .remote import key_targets, remote_info

    infos = {}
    for n, key in enumerate(devices.keys):
        say(f"asking a device of {key}", n, len(devices.keys))
        infos[key] = remote_info(devices.rpc, key, devices.wait_s)
    targets = key_targets(devices.rpc, devices.keys, devices.key_targets, infos)
    return {key: {"target": targets[key], **{k: info.get(k) for k in ("hostname", "machine", "cpu_count", "handoff",
                                                                       "tvm", "runnable", "backends")}}
            for key, info in infos.items()}


def _device_builds(strategies: Sequence[Strategy], devices: Devices, info: Mapping[str, Mapping[str, Any]],
                   plugins: Any) -> list[tuple[Strategy, Strategy, str]]:
    """``(strategy, what to lower, key)`` for every strategy and key: the strategy with the key's
    ``tvm`` target when its chain has tvm (unless it sets one itself), and, when it tunes, its
    candidates measured on the key's devices."""
    from .pipeline import backend_chain

    out = []
    for s in strategies:
        for key in devices.keys:
            build = s
            if "tvm" in backend_chain(list(s.backends), plugins, s.fallback):
                tvm = {"target": info[key]["target"], **s.options.get("tvm", {})}
                if int(tvm.get("tune", 0) or 0) or tvm.get("tune_budget"):
                    tvm.setdefault("rpc", f"{devices.rpc}/{key}")
                build = dataclasses.replace(s, options={**s.options, "tvm": tvm})
            out.append((s, build, key))
    return out


def _device_row(lowered: StrategyResult, s: Strategy, key: str, info: Mapping[str, Any]) -> StrategyResult:
    """The row of ``s`` on ``key``: the lowering's figures, runnable as the device says."""
    row = copy.deepcopy(lowered)
    row.strategy, row.key = s, key
    if row.status == FAILED:
        return row
    backends = info.get("backends") or {}
    absent = [(b, backends[b]["runtime_reason"] if b in backends else "not installed on the device")
              for b in sorted(row.delegates) if not backends.get(b, {}).get("runtime")]
    row.status, row.reason = (NOT_RUNNABLE, "; ".join(f"{b}: {why}" for b, why in absent)) if absent else (OK, "")
    return row


# -- export and lowering ----------------------------------------------------------------------

def _check_strategy(s: Strategy, plugins: Any) -> None:
    """Unknown backends and options stop the run before anything is lowered, naming the strategy."""
    try:
        chain = plugins.registry.expand(list(s.backends))
        for b in chain:
            plugins.spec(b)
        for b, opts in s.options.items():
            if b not in chain:
                raise HandoffError(f"options given for '{b}', which it does not select")
            plugins.parse_options(b, opts)
    except HandoffError as exc:
        raise HandoffError(f"strategy {s.name!r}: {exc}") from exc


def _export_once(model: Any, input_shapes: Sequence[Any], seed: int, plugins: Any,
                 trust_model: bool) -> tuple[Any, list[Any], tuple]:
    """``(resolved model with its torch.export, eager outputs, fresh inputs)``."""
    import torch
    from torch.utils import _pytree

    from .export import resolve_model, torch_export
    from .zoo import ResolvedModel, random_inputs

    resolved = resolve_model(model, input_shapes, plugins, trust_model) if isinstance(model, str) else model
    if not isinstance(resolved, ResolvedModel):
        raise HandoffError(f"compare takes a MODEL string or a handoff.ResolvedModel, not {type(resolved).__name__}")
    exported = torch_export(resolved)
    if resolved.zoo is not None and not input_shapes:
        inputs = resolved.zoo.example_inputs(seed)
    else:
        specs = [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in resolved.example_inputs]
        inputs = random_inputs(specs, seed=seed, int_high=resolved.zoo.int_high if resolved.zoo else 8)
    reference = resolved.module if resolved.module is not None else exported.module()
    with torch.no_grad():
        eager = [t.detach().numpy() for t in _pytree.tree_leaves(reference(*inputs)) if isinstance(t, torch.Tensor)]
    shared = ResolvedModel(resolved.name, module=resolved.module, example_inputs=tuple(resolved.example_inputs),
                           exported=exported, zoo=resolved.zoo)
    return shared, eager, tuple(inputs)


def _lower(s: Strategy, resolved: Any, inputs: tuple, per_delegate: bool, on_lower_error: str, use_cache: bool,
           plugins: Any, progress: Callable[[str, int, int], None], capability: Any = None,
           decompositions: Any = None) -> tuple[StrategyResult, bytes | None, list[numerics.DelegateCase]]:
    from .pipeline import partition
    from .program import ProgramFile
    from .signing import local_key

    result = StrategyResult(s)
    try:
        part = partition(resolved, backends=list(s.backends), options=s.options, fallback=s.fallback, fold=s.fold,
                         on_lower_error=on_lower_error, use_cache=use_cache, plugins=plugins, progress=progress,
                         capability=capability, decompositions=decompositions)
    except HandoffError as exc:
        result.status, result.reason = FAILED, str(exc)
        return result, None, []
    report = part.report
    program = part.to_bytes()
    result.chain = list(report.backends)
    result.coverage = {b: report.coverage(b) for b, st in report.stats.items() if st.nodes}
    result.delegates = {b: st.partitions for b, st in report.stats.items() if st.partitions}
    result.crossings = report.crossings
    result.capability_seconds = report.timings.get("capability", 0.0)
    result.decompose_seconds = report.timings.get("export", 0.0)
    result.lower_seconds = report.timings.get("lower", 0.0)
    result.compile_seconds = sum(st.compile_seconds for st in report.stats.values())
    result.cached_partitions = sum(st.cached_partitions for st in report.stats.values())
    result.program_bytes = len(program)
    result.moves = list(report.moves)
    result.declined = _declined(report, s)
    used = sorted(set(result.delegates))
    absent = [(b, why) for b in used for ok, why in [plugins.runtime_available(b)] if not ok]
    if absent:
        result.status = NOT_RUNNABLE
        result.reason = "; ".join(f"{b}: {why}" for b, why in absent)
    cases = []
    if per_delegate:
        with ProgramFile.from_bytes(program, name=s.name) as pf:
            cases = numerics.delegate_cases(pf, part.exported, inputs, signer=local_key())  # made here
        unavailable = dict(absent)
        result.per_delegate = [{**numerics.summary(c), "skipped": f"backend '{c.backend}' cannot run here: "
                                f"{unavailable[c.backend]}"} for c in cases if c.backend in unavailable]
        cases = [c for c in cases if c.backend not in unavailable]
    return result, program, cases


def _declined(report: Any, s: Strategy) -> dict[str, dict[str, Any]]:
    """The ops the strategy's first backend declined: how many nodes, where they ran, and its
    reason (the first one given): what blocks its coverage."""
    first = report.backends[0] if report.backends else None
    out: dict[str, dict[str, Any]] = {}
    for d in report.declined:
        if first not in d["reasons"]:
            continue
        entry = out.setdefault(d["op"], {"count": 0, "ran_on": {}, "reason": d["reasons"][first]})
        entry["count"] += 1
        entry["ran_on"][d["ran_on"]] = entry["ran_on"].get(d["ran_on"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["count"]))


# -- measuring --------------------------------------------------------------------------------

def _measure(results: list[StrategyResult], programs: Mapping[int, bytes],
             cases: Mapping[int, list[numerics.DelegateCase]], inputs: tuple, eager: list[Any], runs: int,
             rounds: int, warmup: int, runtime_options: Mapping[str, Mapping[str, str]], plugins: Any,
             say: Callable[[str, int, int], None], devices: Devices | None = None) -> None:
    arrays = [x.numpy() for x in inputs]
    workers: dict[int, _Worker | _RemoteWorker] = {}
    total = len(results)
    try:
        for i, program in programs.items():
            r = results[i]
            if r.status != OK and not cases.get(i):
                continue
            say(f"loading {r.label}", i, total)
            used = set(r.delegates)
            options = {b: o for b, o in runtime_options.items() if b in used}
            worker: _Worker | _RemoteWorker
            if r.key is not None and devices is not None:
                worker = _RemoteWorker(program, options, devices, r.key, arrays, warmup)
            else:
                worker = _Worker(program if r.status == OK else None, options, plugins)
            workers[i] = worker
            try:
                if r.status == OK:
                    r.load_ms = worker.loaded() * 1e3
                    first_s, outs = worker.call("first", arrays)
                    r.first_run_ms = first_s * 1e3
                    figures = errors(outs, eager)
                    r.max_abs_error, r.snr_db, r.outputs = figures["max_abs_error"], figures["snr_db"], figures["outputs"]
                    if warmup:
                        worker.warm(warmup)
            except HandoffError as exc:
                r.status, r.reason = FAILED, str(exc)
                worker.close()
                del workers[i]
                if cases.get(i):  # one delegate failing to load says nothing of the others: check each alone
                    workers[i] = _Worker(None, options, plugins)
        timed: dict[int, _Worker | _RemoteWorker] = {i: w for i, w in workers.items() if results[i].status == OK}
        per_round = max(1, runs // rounds)

        def timer(i: int, w: _Worker | _RemoteWorker) -> Callable[[int], Sequence[float]]:
            def one_round(r: int) -> Sequence[float]:
                say(f"timing round {r + 1}/{rounds}", r, rounds)
                if results[i].status != OK:  # its worker died in an earlier round
                    return []
                try:
                    return w.call("time", per_round)
                except HandoffError as exc:
                    results[i].status, results[i].reason = FAILED, str(exc)
                    return []
            return one_round

        samples = interleaved({str(i): timer(i, w) for i, w in timed.items()}, rounds)
        for key, secs in samples.items():
            results[int(key)].samples_ms = [s * 1e3 for s in secs]
        for i, w in workers.items():
            if cases.get(i):
                say(f"checking delegates of {results[i].strategy.name}", i, total)
                try:
                    rows = w.call("cases", cases[i])
                except HandoffError as exc:
                    rows = [{**numerics.summary(c), "skipped": str(exc)} for c in cases[i]]
                results[i].per_delegate = sorted([*results[i].per_delegate, *rows], key=lambda row: row["delegate"])
    finally:
        for w in workers.values():
            w.close()


def _mark_pareto(results: list[StrategyResult]) -> None:
    """Mark the measured strategies no other one beats on every objective (latency p50, program
    size, max abs error) while beating it on one; rows measured on a device key compete with the
    rows of the same key only."""
    points = [(r, (r.p50_ms, float(r.program_bytes), r.max_abs_error)) for r in results
              if r.status == OK and r.samples_ms and r.max_abs_error is not None]
    for r, p in points:
        r.pareto = not any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                           for other, q in points if other.key == r.key)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def jsonable(x: Any) -> Any:
    """``x`` with non-finite floats as strings, in lists and dicts too: JSON has no infinity, and
    an exact result's SNR is ``inf`` (written ``"inf"``)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


# -- worker processes -------------------------------------------------------------------------

def _plugin_sources(plugins: Any) -> tuple[bool, list[str]]:
    """What a worker needs to see the same backends: whether entry points were loaded, and the
    modules registered from ``$HANDOFF_PLUGINS`` or Python."""
    autoload = any(o.source.startswith("entry point") for o in plugins.origins.values())
    modules = []
    for name, plugin in plugins.pm.list_name_plugin():
        origin = plugins.origins.get(name)
        if origin and origin.source != "built-in" and not origin.source.startswith("entry point") \
                and isinstance(plugin, types.ModuleType):
            modules.append(plugin.__name__)
    return autoload, modules


class _Worker:
    """One spawned process holding one loaded program (or none, for delegate checks only), which
    answers requests over a pipe: ``first`` (run once on the inputs it keeps, return outputs and
    seconds), ``time`` (N timed runs), ``cases`` (:func:`handoff.numerics.run_case` each). Its
    stderr (native libraries' chatter) goes to a file, quoted when it dies."""

    def __init__(self, program: bytes | None, options: Mapping[str, Mapping[str, str]], plugins: Any):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        fd, self.log = temp_file("compare", ".log")  # a killed run's is swept by the next one
        os.close(fd)
        autoload, modules = _plugin_sources(plugins)
        self.process = ctx.Process(target=_worker_main, args=(child, program, dict(options), autoload, modules,
                                                              self.log), daemon=True)
        self.process.start()
        child.close()

    def loaded(self) -> float:
        """Seconds the worker took to load its program (raises when loading failed)."""
        return self._answer()

    def warm(self, runs: int) -> None:
        """``runs`` untimed runs."""
        self.call("time", runs)

    def call(self, *request: Any) -> Any:
        try:
            self.conn.send(request)
        except (BrokenPipeError, OSError):
            raise HandoffError(self._death()) from None
        return self._answer()

    def _answer(self) -> Any:
        if not self.conn.poll(WORKER_TIMEOUT):
            self.process.kill()
            raise HandoffError(f"worker process did not answer within {WORKER_TIMEOUT:.0f} s and was stopped")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            raise HandoffError(self._death()) from None
        if kind == "error":
            raise HandoffError(value)
        return value

    def _death(self) -> str:
        self.process.join(5)
        tail = ""
        try:
            with open(self.log, errors="replace") as f:
                lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
            tail = " | ".join(lines[-3:])
        except OSError:
            pass
        return f"worker process died (exit code {self.process.exitcode})" + (f"; its last words: {tail}" if tail else "")

    def close(self) -> None:
        try:
            self.conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        try:
            os.unlink(self.log)
        except OSError:
            pass


class _RemoteWorker:
    """:class:`_Worker`'s requests answered by a device of ``key`` (:func:`handoff.remote.run_remote`):
    the first session loads the program (``loaded``) and runs it once on the inputs (``first``);
    each ``time`` request is a session of its own that ships and loads the program again, runs
    ``warmup`` untimed runs and returns the device's timings. A session's failure is a
    :class:`HandoffError` naming the key and the tracker."""

    def __init__(self, program: bytes, options: Mapping[str, Mapping[str, str]], devices: Devices, key: str,
                 inputs: Sequence[Any], warmup: int):
        self.program, self.options, self.devices, self.key = program, dict(options), devices, key
        self.inputs, self.warmup = list(inputs), warmup
        self.first: tuple[float, list[Any]] | None = None

    def _run(self, bench: int) -> Any:
        from .remote import run_remote

        return run_remote(self.program, self.devices.rpc, self.key, self.inputs, bench=bench,
                          warmup=self.warmup if bench else 0, options=self.options, wait_s=self.devices.wait_s,
                          timeout_s=self.devices.timeout_s)

    def loaded(self) -> float:
        result = self._run(0)
        self.first = (result.first_run_ms / 1e3, result.outputs)
        return result.load_ms / 1e3

    def call(self, kind: str, arg: Any) -> Any:
        if kind == "first" and self.first is not None:
            return self.first
        if kind == "time":
            return [t / 1e3 for t in self._run(int(arg)).times_ms]
        raise HandoffError(f"a remote device answers no {kind!r} request here")

    def warm(self, runs: int) -> None:
        """Nothing: every timing session warms the program up on the device first."""

    def close(self) -> None:
        pass


def _worker_main(conn: Any, program: bytes | None, options: Mapping[str, Mapping[str, str]], autoload: bool,
                 modules: Sequence[str], log: str) -> None:
    """The worker's loop (in the spawned process)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)  # native libraries print to fds 1 and 2; keep them off the user's terminal
    os.dup2(fd, 1)
    from .bench import time_calls
    from .plugins import Plugins
    from .runtime import load

    plugins = Plugins(autoload=autoload, extra=modules)
    loaded = None
    try:
        if program is not None:
            start = time.perf_counter()
            loaded = load(program, options=options, plugins=plugins)
            conn.send(("ok", time.perf_counter() - start))
        inputs: Any = None
        while True:
            request = conn.recv()
            kind = request[0]
            if kind == "close":
                break
            try:
                if kind == "first":
                    inputs = request[1]
                    start = time.perf_counter()
                    outs = loaded.run(inputs)
                    conn.send(("ok", (time.perf_counter() - start, outs)))
                elif kind == "time":
                    conn.send(("ok", time_calls(lambda: loaded.run(inputs), request[1])))
                elif kind == "cases":
                    conn.send(("ok", [numerics.run_case(c, options, plugins) for c in request[1]]))
                else:
                    conn.send(("error", f"unknown worker request {kind!r}"))
            except HandoffError as exc:
                conn.send(("error", str(exc)))
            except Exception as exc:
                conn.send(("error", one_line(exc, 400)))
    except HandoffError as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:
        conn.send(("error", one_line(exc, 400)))
    finally:
        if loaded is not None:
            loaded.close()
        conn.close()
