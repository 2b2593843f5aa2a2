"""benchmarks/soak.py's measurements (not its numbers): per-run CPU time and context switches
beside the wall clock, so its table says whether a latency tail is the runtime or the scheduler."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

import handoff


def _soak_module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_reports_cpu_time_and_switches_beside_wall_time(sink_plugins, tmp_path):
    import kitchen_sink

    path = tmp_path / "sink.hof"
    handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False).write(str(path))
    r = _soak_module().soak(str(path), runs=200, seconds=0, warmup=5, distinct=4, threads=2, rounds=2)
    assert r["runs"] == 200 and r["threads"].startswith("ok (2 threads")
    assert 0 < r["p50"] <= r["p99"] <= r["max"]
    assert 0 <= r["cpu_p50"] <= r["cpu_p99"] <= r["cpu_max"]
    assert r["cpu_ratio"] == (r["cpu_p99"] / r["cpu_p50"] if r["cpu_p50"] else math.inf)
    # every run that saw a switch counts at least one in the window's total
    assert 0 <= r["runs_switched"] <= min(r["runs"], r["involuntary"])
    if r["runs_switched"] < r["runs"]:
        assert r["p99_not_switched"] <= r["max"]
    else:
        assert math.isnan(r["p99_not_switched"])
