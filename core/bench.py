"""Timing, percentiles and numerical error: what ``handoff run --bench``, ``handoff compare`` and
the ``benchmarks/`` scripts measure with.

Imports only numpy and the standard library (the runtime side uses it: ``handoff compare``'s
worker processes time programs with it and never import torch).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["percentile", "percentiles", "time_calls", "time_calls_cpu", "median_ms", "interleaved",
           "interleaved_median_ms", "interleaved_medians_ms",
           "max_abs_error", "snr_db", "errors"]


def percentile(samples: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (0-100) of ``samples``, linearly interpolated between the closest
    ranks (numpy's default), so p50 of an even count is the mean of the middle two."""
    if not len(samples):
        raise ValueError("percentile of no samples")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct} is not between 0 and 100")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), pct))


def percentiles(samples: Sequence[float], pcts: Sequence[float] = (50, 90)) -> dict[str, float]:
    """``{"p50": ..., "p90": ...}`` of ``samples``."""
    return {f"p{pct:g}": percentile(samples, pct) for pct in pcts}


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 0) -> list[float]:
    """Wall seconds of each of ``runs`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_calls_cpu(fn: Callable[[], Any], runs: int, warmup: int = 0) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds of each of ``runs`` calls of ``fn``, after ``warmup`` untimed
    calls. CPU time is the whole process's (``time.process_time``: user + system time of every
    thread, a vendor runtime's thread pool included, spinning too), so time the scheduler gave
    another process, which a shared machine adds to the wall clock, does not count; the process's
    other threads' work during the call does."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        cpu.append(time.process_time() - c0)
        wall.append(t1 - t0)
    return wall, cpu


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 0) -> float:
    """Median wall time of ``runs`` calls of ``fn`` after ``warmup`` untimed calls, in ms."""
    return statistics.median(time_calls(fn, runs, warmup)) * 1e3


def interleaved(fns: Mapping[str, Callable[[int], Sequence[float]]], rounds: int) -> dict[str, list[float]]:
    """Samples of each contender, gathered in ``rounds`` rounds that each call every contender
    once, in rotated order: a machine that gets slower or faster during the measurement (clock
    scaling, a neighbour's load) shifts every contender alike instead of whichever happened to
    run then, and each contender follows every other one equally often (a thread pool still
    spinning from the previous one slows whoever comes next).

    :param fns: name -> ``fn(round)`` returning that round's samples (seconds); a contender may
        time several calls per round, or run in another process.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(rounds):
        k = r % len(order) if order else 0
        for name, fn in order[k:] + order[:k]:
            samples[name].extend(fn(r))
    return samples


def interleaved_median_ms(fns: Mapping[str, Callable[[], Any]], runs: int, rounds: int = 10,
                          warmup: int = 0) -> dict[str, float]:
    """Median wall time per call of each of ``fns``, in ms, timed :func:`interleaved`: ``rounds``
    rounds of ``runs / rounds`` calls of each. ``warmup`` untimed calls of each come first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, runs // rounds)
    samples = interleaved({name: (lambda r, fn=fn: time_calls(fn, per_round)) for name, fn in fns.items()}, rounds)
    return {name: statistics.median(t) * 1e3 for name, t in samples.items()}


def interleaved_medians_ms(fns: Mapping[str, Callable[[], Any]], runs: int, rounds: int = 10,
                           warmup: int = 0) -> dict[str, tuple[float, float]]:
    """Like :func:`interleaved_median_ms`, with CPU time: ``name -> (median wall ms, median CPU
    ms)`` per call (:func:`time_calls_cpu`). On a shared machine the CPU time is the steadier
    figure: a call that waited for a time slice shows it in wall time only."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, runs // rounds)
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}

    def timer(name: str, fn: Callable[[], Any]) -> Callable[[int], list[float]]:
        def one_round(r: int) -> list[float]:
            wall, cpu = time_calls_cpu(fn, per_round)
            pairs[name].extend(zip(wall, cpu))
            return wall
        return one_round

    interleaved({name: timer(name, fn) for name, fn in fns.items()}, rounds)
    return {name: (statistics.median(w for w, _ in p) * 1e3, statistics.median(c for _, c in p) * 1e3)
            for name, p in pairs.items()}


def max_abs_error(got: Any, want: Any) -> float:
    """Largest ``|got - want|`` over all elements, in float64. Non-finite elements must be equal
    on both sides (``inf`` matches ``inf``, NaN matches NaN) and are skipped; otherwise, or when
    the shapes differ, the error is ``inf``."""
    g, w = _pair(got, want)
    if g is None:
        return math.inf
    odd = ~np.isfinite(g) | ~np.isfinite(w)
    if odd.any() and not ((g[odd] == w[odd]) | (np.isnan(g[odd]) & np.isnan(w[odd]))).all():
        return math.inf
    return float(np.max(np.abs(g[~odd] - w[~odd]), initial=0.0))


def snr_db(got: Any, want: Any) -> float:
    """Signal-to-noise ratio of ``got`` against the reference ``want``, in dB:
    ``10 log10(sum(want^2) / sum((got - want)^2))``. ``inf`` when they are equal; ``-inf`` when
    the shapes differ or a non-finite value appears in only one."""
    g, w = _pair(got, want)
    if g is None or max_abs_error(g, w) == math.inf:
        return -math.inf
    finite = np.isfinite(g) & np.isfinite(w)
    noise = float(np.sum((g[finite] - w[finite]) ** 2))
    signal = float(np.sum(w[finite] ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def errors(got: Sequence[Any], want: Sequence[Any]) -> dict[str, Any]:
    """Per output and overall: ``max_abs_error`` and ``snr_db`` of ``got`` against ``want``
    (lists of arrays in output order). Integer and bool outputs (class ids, top-k indices) also
    get ``mismatch``, the fraction of elements that differ; ``max_abs_error`` and ``snr_db``
    overall are the worst over the floating-point outputs (over all outputs when none is)."""
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs compared with {len(want)} reference outputs")
    per = []
    for g, w in zip(got, want):
        g, w = _array(g), _array(w)
        entry: dict[str, Any] = {"max_abs_error": max_abs_error(g, w), "snr_db": snr_db(g, w)}
        if not np.issubdtype(w.dtype, np.floating):
            entry["mismatch"] = float(np.mean(g != w)) if g.shape == w.shape and w.size else float(g.shape != w.shape)
        per.append(entry)
    floats = [e for e in per if "mismatch" not in e] or per
    return {"max_abs_error": max((e["max_abs_error"] for e in floats), default=0.0),
            "snr_db": min((e["snr_db"] for e in floats), default=math.inf), "outputs": per}


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _pair(got: Any, want: Any) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    g, w = _array(got), _array(want)
    if g.shape != w.shape:
        return None, None
    return g.astype(np.float64), w.astype(np.float64)
