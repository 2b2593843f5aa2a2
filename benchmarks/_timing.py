"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 0) -> float:
    """Median wall time of ``runs`` calls of ``fn`` after ``warmup`` untimed calls, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_median_ms(fns: Mapping[str, Callable[[], Any]], runs: int, rounds: int = 10,
                          warmup: int = 0) -> dict[str, float]:
    """Median wall time per call of each of ``fns``, in ms, timed in ``rounds`` rounds that each
    run every function ``runs / rounds`` times in turn (in rotated order): a machine that gets slower or faster
    during the measurement (clock scaling, a neighbour's load) shifts every contender alike
    instead of whichever happened to run then. ``warmup`` untimed calls of each come first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(rounds):
        # rotated each round, so each contender follows every other one equally often (a thread
        # pool still spinning from the previous one slows whoever comes next)
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
