"""handoff.bench: percentiles, interleaved timing, and the error figures compare reports."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from handoff import bench


def test_percentiles_interpolate_between_ranks():
    samples = [4.0, 1.0, 3.0, 2.0]
    assert bench.percentile(samples, 50) == 2.5
    assert bench.percentile(samples, 0) == 1.0 and bench.percentile(samples, 100) == 4.0
    assert bench.percentiles(list(range(11)), (50, 90)) == {"p50": 5.0, "p90": 9.0}
    with pytest.raises(ValueError, match="no samples"):
        bench.percentile([], 50)
    with pytest.raises(ValueError, match="between 0 and 100"):
        bench.percentile([1.0], 101)


def test_time_calls_runs_warmup_untimed():
    calls = []
    times = bench.time_calls(lambda: calls.append(1), runs=5, warmup=2)
    assert len(calls) == 7 and len(times) == 5 and all(t >= 0 for t in times)
    assert bench.median_ms(lambda: None, runs=3) >= 0


def _burn_in_another_thread(seconds: float) -> None:
    """Spin in a second thread until the process has used ``seconds`` more CPU time, then join."""
    import threading
    import time

    def spin():
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()


def test_time_calls_cpu_counts_every_thread_and_not_sleep():
    import time

    calls = []
    wall, cpu = bench.time_calls_cpu(lambda: (calls.append(1), _burn_in_another_thread(0.005)), runs=3, warmup=1)
    assert len(calls) == 4 and len(wall) == len(cpu) == 3
    assert all(c >= 0.005 for c in cpu)  # the other thread's CPU time is the process's
    wall, cpu = bench.time_calls_cpu(lambda: time.sleep(0.02), runs=2)
    assert all(w >= 0.02 for w in wall) and all(c < w for w, c in zip(wall, cpu))  # waiting is not CPU time


def test_interleaved_medians_pairs_wall_and_cpu():
    medians = bench.interleaved_medians_ms({"burn": lambda: _burn_in_another_thread(0.002), "idle": lambda: None},
                                           runs=4, rounds=2, warmup=1)
    assert set(medians) == {"burn", "idle"}
    wall, cpu = medians["burn"]
    assert cpu >= 2.0 and wall > 0 and medians["idle"][1] < cpu


def test_interleaved_rotates_the_order_each_round():
    order: list[str] = []

    def contender(name):
        def one_round(r):
            order.append(name)
            return [float(r)]
        return one_round

    samples = bench.interleaved({"a": contender("a"), "b": contender("b"), "c": contender("c")}, rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert samples == {"a": [0.0, 1.0, 2.0], "b": [0.0, 1.0, 2.0], "c": [0.0, 1.0, 2.0]}
    medians = bench.interleaved_median_ms({"x": lambda: None, "y": lambda: None}, runs=4, rounds=2, warmup=1)
    assert set(medians) == {"x", "y"}


def test_max_abs_error_and_snr():
    want = np.array([1.0, -2.0, 3.0], np.float32)
    got = want + np.array([0.0, 0.1, -0.2], np.float32)
    assert bench.max_abs_error(got, want) == pytest.approx(0.2, rel=1e-5)
    noise, signal = 0.1 ** 2 + 0.2 ** 2, 1 + 4 + 9
    assert bench.snr_db(got, want) == pytest.approx(10 * math.log10(signal / noise), rel=1e-4)
    assert bench.max_abs_error(want, want) == 0.0 and bench.snr_db(want, want) == math.inf
    # non-finite values must agree exactly; they are skipped when they do
    a = np.array([np.inf, np.nan, 1.0])
    assert bench.max_abs_error(a, np.array([np.inf, np.nan, 1.5])) == 0.5
    assert bench.max_abs_error(a, np.array([1.0, np.nan, 1.0])) == math.inf
    assert bench.snr_db(a, np.array([1.0, np.nan, 1.0])) == -math.inf
    assert bench.max_abs_error(np.zeros(3), np.zeros(4)) == math.inf  # shapes differ


def test_errors_summarise_outputs_and_count_integer_mismatches():
    want = [np.array([1.0, 2.0], np.float32), np.array([3, 1, 2], np.int64)]
    got = [np.array([1.0, 2.5], np.float32), np.array([3, 2, 2], np.int64)]
    e = bench.errors(got, want)
    assert e["max_abs_error"] == 0.5  # the float outputs decide the overall figures
    assert e["outputs"][1]["mismatch"] == pytest.approx(1 / 3) and "mismatch" not in e["outputs"][0]
    with pytest.raises(ValueError, match="2 outputs compared with 1"):
        bench.errors(got, want[:1])


def test_bench_imports_no_torch():
    code = "import sys, handoff.bench, handoff.compare, handoff.numerics; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
