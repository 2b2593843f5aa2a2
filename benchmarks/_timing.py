"""Timing shared by the benchmark scripts: the library's (:mod:`handoff.bench`)."""

from __future__ import annotations

from handoff.bench import interleaved_median_ms, interleaved_medians_ms, median_ms

__all__ = ["interleaved_median_ms", "interleaved_medians_ms", "median_ms"]
