"""benchmarks/soak.py's measurements (not its numbers): per-run CPU time and context switches
beside the wall clock, so its table says whether a latency tail is the runtime or the scheduler;
what the slow runs had (a collection, page faults, a switch) and a fixed-work reference timed
beside them, so it says whether a CPU-time tail is the process's or the machine's."""

from __future__ import annotations

import gc
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
    # RSS read every 10 runs; the second half's growth is from the sample at run 100 to the end
    assert math.isfinite(r["growth_second_half"]) and abs(r["growth_second_half"]) < 0.01
    assert 0 < r["p50"] <= r["p99"] <= r["max"]
    assert 0 <= r["cpu_p50"] <= r["cpu_p99"] <= r["cpu_max"]
    assert r["cpu_ratio"] == (r["cpu_p99"] / r["cpu_p50"] if r["cpu_p50"] else math.inf)
    # every run that saw a switch counts at least one in the window's total
    assert 0 <= r["runs_switched"] <= min(r["runs"], r["involuntary"])
    if r["runs_switched"] < r["runs"]:
        assert r["p99_not_switched"] <= r["max"]
    else:
        assert math.isnan(r["p99_not_switched"])
    assert r["ref_p50"] > 0 and r["ref_ratio"] == r["ref_p99"] / r["ref_p50"]
    assert 0 <= r["slow_with_ref"] <= r["slow"] < r["runs"] / 2  # slow: over twice the median
    assert max(r["slow_collected"], r["slow_faulted"], r["slow_switched"]) <= r["slow"]


def test_soak_counts_collections_and_can_skip_the_reference(sink_plugins, tmp_path):
    import kitchen_sink

    path = tmp_path / "sink.hof"
    handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False).write(str(path))
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # a young collection at nearly every allocation: each run sees some
    try:
        r = _soak_module().soak(str(path), runs=50, seconds=0, warmup=2, distinct=2, threads=0, rounds=0,
                                reference=False)
    finally:
        gc.set_threshold(*threshold)
    assert r["runs"] == 50 and r["collections"] >= 50
    assert "ref_p50" not in r and "slow_with_ref" not in r


def test_programs_folder_partitions_each_program_once(sink_plugins, tmp_path, monkeypatch):
    """--programs DIR: the short estimating soak partitions, the long one after it reuses the file."""
    import kitchen_sink

    real, calls = handoff.partition, []

    def partition(model, backends):  # the zoo name stands for a small model the sink takes whole
        calls.append((model, backends))
        return real(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=backends, fallback=False)

    monkeypatch.setattr(handoff, "partition", partition)
    soak, path = _soak_module(), tmp_path / "net-sink.hof"
    assert soak.program_for("net", "sink", str(path)) is True
    written = path.read_bytes()
    assert soak.program_for("net", "sink", str(path)) is False
    assert calls == [("zoo:net", ["sink"])] and path.read_bytes() == written
    r = soak.soak(str(path), runs=20, seconds=0, warmup=2, distinct=2, threads=0, rounds=0, reference=False)
    assert r["runs"] == 20 and math.isfinite(r["growth_second_half"])


def test_reference_every_kth_run(sink_plugins, tmp_path):
    import kitchen_sink

    path = tmp_path / "sink.hof"
    handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False).write(str(path))
    r = _soak_module().soak(str(path), runs=40, seconds=0, warmup=2, distinct=2, threads=0, rounds=0,
                            reference_every=4)
    assert r["runs"] == 40 and r["ref_samples"] == 10  # after runs 0, 4, ..., 36
    assert r["ref_p50"] > 0 and r["ref_ratio"] == r["ref_p99"] / r["ref_p50"]
    assert 0 <= r["slow_with_ref"] <= r["slow_near_ref"] <= r["slow"]


def test_the_soaks_own_samples_are_not_counted_as_rss_growth(sink_plugins, tmp_path):
    """20,000 runs of a program that keeps nothing: the soak's per-run samples (appended to lists they
    took ~1.8 MB here, reported as the program's growth) are allocated before the first RSS reading."""
    import kitchen_sink

    path = tmp_path / "sink.hof"
    handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False).write(str(path))
    r = _soak_module().soak(str(path), runs=20_000, seconds=0, warmup=50, distinct=2, threads=0, rounds=0,
                            reference=False)
    assert r["runs"] == 20_000
    assert r["rss_after"] - r["rss_before"] < 256 * 1024
