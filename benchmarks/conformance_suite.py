"""One run of the conformance suite against a backend, for this checkout and, optionally, another.

    python benchmarks/conformance_suite.py --backend xnnpack [--cases add] [--compare-with DIR] [--rounds 2]

Each sample is ``pytest --handoff-backend BACKEND --handoff-cases CASES`` in float32, fixed dims
only (``--handoff-examples 0``), with the contract checks, in a child process, as
:func:`handoff.conformance.run_suite` runs it (the suite's own child processes included):
its wall time and the CPU time (user + system) of it and every process under it. The contract
checks' children import the backend's halves afresh (torch, the vendor SDK), so the CPU time
shows how many of them a suite run pays for.

``--compare-with DIR`` times another checkout of handoff too (``git archive REV | tar -x -C DIR``):
its core and plugins go first on ``PYTHONPATH``; the two alternate round by round
(:func:`handoff.bench.interleaved`), and the table gives medians and the ratio this / other.
Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _checkout import tree_path  # benchmarks/, next to this script
from handoff.bench import interleaved

ROOT = Path(__file__).resolve().parent.parent


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sample(backend: str, cases: str, path: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="handoff-suite-bench-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("HANDOFF_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")}
        env.update(HANDOFF_HOME=str(Path(tmp) / "home"),
                   PYTHONPATH=os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")]))
        start, cpu = time.perf_counter(), _children_cpu()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                               "--rootdir", tmp, "-c", os.devnull, "--handoff-backend", backend,
                               "--handoff-cases", cases, "--handoff-dtypes", "float32", "--handoff-examples", "0"],
                              cwd=tmp, env=env, capture_output=True, text=True)
        sample = {"wall": time.perf_counter() - start, "cpu": _children_cpu() - cpu}
    if done.returncode not in (0, 1):  # 1: a case or check failed, which costs the same
        raise SystemExit(f"pytest exit {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="xnnpack")
    parser.add_argument("--cases", default="add")
    parser.add_argument("--compare-with", type=Path, help="another checkout of handoff (its root folder)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    samples: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="handoff-suite-bench-") as scratch:
        trees = {"this": tree_path(ROOT, Path(scratch) / "this")}
        if args.compare_with:
            trees["other"] = tree_path(args.compare_with.resolve(), Path(scratch) / "other")

        def contender(name: str, path: list[str]):
            def one_round(r: int) -> list[float]:
                samples.setdefault(name, []).append(_sample(args.backend, args.cases, path))
                return [samples[name][-1]["wall"]]
            return one_round

        interleaved({name: contender(name, p) for name, p in trees.items()}, args.rounds)
    print(f"conformance suite, {args.backend}, cases {args.cases}: {args.rounds} round(s); seconds, median")
    print(f"{'':6}" + "".join(f"{name:>9}" for name in trees) + ("  this/other" if len(trees) > 1 else ""))
    for what in ("wall", "cpu"):
        medians = {name: statistics.median(s[what] for s in samples[name]) for name in trees}
        row = f"{what:6}" + "".join(f"{medians[name]:9.2f}" for name in trees)
        if len(trees) > 1:
            row += f"  {medians['this'] / medians['other']:10.2f}"
        print(row)


if __name__ == "__main__":
    main()
