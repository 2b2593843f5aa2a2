"""Partition time with a cold and a warm cache, for this checkout and, optionally, another one.

    python benchmarks/partition_cache.py --model zoo:small_transformer --backends qnn
        [--compare-with DIR] [--rounds 2] [--warm-runs 5]

Each sample is one child process (run one after another) with a fresh ``$HANDOFF_HOME``: it
partitions the model and reports each call's wall time (``total``), the CPU time of the process
during it (``cpu``: user + system, all threads) and the report's phase ``timings``
(``capability`` includes every ``check_partition``):

* ``cold``: nothing cached (capability answers, blobs);
* ``warm``: the same again, every answer and blob cached on disk by ``cold`` (the median of
  ``--warm-runs`` calls);
* ``no-cache``: ``use_cache=False`` (``--no-cache``) after ``warm``: what a backend still keeps
  on its own is all that is reused.

``--compare-with DIR`` times another checkout of handoff too (``git worktree add DIR main``, or
``git archive main | tar -x -C DIR``): its core and plugins go first on ``PYTHONPATH`` of its
child processes. The two alternate round by round (:func:`handoff.bench.interleaved`), and the
table gives medians and the ratio this / other. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _checkout import tree_path  # benchmarks/, next to this script
from handoff.bench import interleaved

ROOT = Path(__file__).resolve().parent.parent
CASES = ("cold", "warm", "no-cache")
PHASES = ("total", "cpu", "export", "capability", "plan", "lower")

_CHILD = """
import json, statistics, sys, time, handoff
model, backends, warm_runs = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
out = {}
for case, use_cache, runs in (("cold", True, 1), ("warm", True, warm_runs), ("no-cache", False, 1)):
    calls = []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        result = handoff.partition(model, backends=backends, use_cache=use_cache)
        calls.append({"total": time.perf_counter() - start, "cpu": time.process_time() - cpu, **result.report.timings})
    out[case] = {k: statistics.median(c[k] for c in calls) for k in calls[0]}
    out[case]["delegates"] = len(result.assembled.manifest["delegates"])
print(json.dumps(out))
"""


def _sample(model: str, backends: str, warm_runs: int, path: list[str]) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="handoff-cache-bench-") as home:
        env = {**os.environ, "HANDOFF_HOME": home, "HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1",
               "HANDOFF_PLUGINS": ",".join(f"handoff_{b}.plugin" for b in backends.split(",")),
               "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", _CHILD, model, backends, str(warm_runs)], env=env, check=True,
                              capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:small_transformer")
    parser.add_argument("--backends", default="qnn")
    parser.add_argument("--compare-with", type=Path, help="another checkout of handoff (its root folder)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="handoff-cache-bench-") as scratch:
        trees = {"this": tree_path(ROOT, Path(scratch) / "this")}
        if args.compare_with:
            trees["other"] = tree_path(args.compare_with.resolve(), Path(scratch) / "other")
        start = time.perf_counter()
        samples = interleaved({name: (lambda r, p=p: [_sample(args.model, args.backends, args.warm_runs, p)])
                               for name, p in trees.items()}, args.rounds)
    print(f"{args.model} on {args.backends}: {args.rounds} round(s), {time.perf_counter() - start:.0f} s; "
          f"seconds, median per case (delegates)")
    header = f"{'case':9} {'phase':11}" + "".join(f"{name:>9}" for name in trees)
    print(header + ("  this/other" if len(trees) > 1 else ""))
    for case in CASES:
        for phase in PHASES:
            medians = {name: statistics.median(s[case].get(phase, 0.0) for s in samples[name]) for name in trees}
            row = f"{case:9} {phase:11}" + "".join(f"{medians[name]:9.2f}" for name in trees)
            if len(trees) > 1:
                row += f"  {medians['this'] / medians['other']:10.2f}" if medians["other"] else "         -"
            print(row)
        print(f"{case:9} {'delegates':11}" + "".join(f"{samples[n][0][case]['delegates']:9d}" for n in trees))


if __name__ == "__main__":
    main()
