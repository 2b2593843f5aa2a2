"""The cost of qnn's in-context search (``QnnCompiler.check_partition``) on one planned partition.

    python benchmarks/qnn_search.py --model zoo:bandwidth_gru --backends qnn,xnnpack
        [--call 1 | --holding NODE] [--compare-with DIR] [--rounds 1] [--limit-s 1200]

``check_partition`` compiles the partition the core plans for qnn as one graph; when QNN refuses
it, it searches for the nodes to decline (ONNX exports of sub-lists, and cuts out of the group's
one export, each compiled on QNN's HTP emulator). This script partitions ``--model`` with
``--backends`` (no capability cache), keeps the arguments of qnn's ``--call``-th
``check_partition`` call (the group; ``--holding NODE``: the first call whose group holds that
node), and times that call alone: wall time, how many ONNX
exports (``handoff_qnn.compiler.to_onnx``) and QNN compiles (session creations) it made and
their seconds, and the nodes it declined.

Each sample is one child process (run one after another, never at once). ``--compare-with DIR``
times another checkout of handoff too (``git archive REV | tar -x -C DIR``): its core and plugins
go first on ``PYTHONPATH`` of its child processes; the two alternate round by round
(:func:`handoff.bench.interleaved`), and the table gives medians and the ratio this / other, and
says whether both declined the same nodes. A child that runs past ``--limit-s`` is stopped and
reported as such (the search without cuts takes ~20 min on the GRU). Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _checkout import tree_path  # benchmarks/, next to this script
from handoff.bench import interleaved

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, sys, time
import handoff
from handoff.cache import CapabilityCache
import handoff_qnn.compiler as qc

model, backends, call, holding = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
calls, original = [], qc.QnnCompiler.check_partition

class _Captured(Exception):
    pass

def capture(self, ep, nodes):
    calls.append((self, ep, list(nodes)))
    if (holding in nodes) if holding else len(calls) == call:
        raise _Captured()
    return original(self, ep, nodes)

qc.QnnCompiler.check_partition = capture
try:
    handoff.partition(model, backends=backends, capability=CapabilityCache(disk=False))
except Exception:
    pass  # the partition stops at the captured call (as a lowering error or the exception itself)
qc.QnnCompiler.check_partition = original
if holding and not any(holding in c[2] for c in calls):
    sys.exit(f"{model} with {','.join(backends)}: no group qnn was asked to check holds {holding}")
if len(calls) < call:
    sys.exit(f"{model} with {','.join(backends)}: qnn's check_partition was called {len(calls)} time(s), not {call}")
compiler, ep, nodes = calls[-1] if holding else calls[call - 1]

stats = {"exports": 0, "export_s": 0.0, "compiles": 0, "compile_s": 0.0}
def counted(fn, key):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stats[key + "s"] += 1
            stats[key + "_s"] += time.perf_counter() - start
    return wrapper
qc.to_onnx = counted(qc.to_onnx, "export")
qc.QnnCompiler._session = counted(qc.QnnCompiler._session, "compile")

start = time.perf_counter()
declined = compiler.check_partition(ep, nodes)
print(json.dumps({"wall_s": time.perf_counter() - start, **stats, "nodes": len(nodes), "declined": list(declined)}))
"""


def _sample(args: argparse.Namespace, path: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="handoff-qnn-search-") as home:
        env = {**os.environ, "HANDOFF_HOME": home, "HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1",
               "HANDOFF_PLUGINS": ",".join(f"handoff_{b}.plugin" for b in args.backends.split(",")),
               "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")])}
        try:
            done = subprocess.run([sys.executable, "-c", _CHILD, args.model, args.backends, str(args.call),
                                   args.holding or ""],
                                  env=env, capture_output=True, text=True, timeout=args.limit_s)
        except subprocess.TimeoutExpired:
            return {"stopped": args.limit_s}
    if done.returncode:
        sys.exit(f"the child process failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:bandwidth_gru")
    parser.add_argument("--backends", default="qnn,xnnpack")
    parser.add_argument("--call", type=int, default=1, help="which of qnn's check_partition calls to time (1: the first)")
    parser.add_argument("--holding", metavar="NODE", help="time the first call whose group holds NODE instead")
    parser.add_argument("--compare-with", type=Path, help="another checkout of handoff (its root folder)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--limit-s", type=float, default=1200.0, help="stop a child after this many seconds")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()
    if "qnn" not in args.backends.split(","):
        parser.error("--backends must include qnn")

    trees = {"this": ROOT}
    if args.compare_with:
        trees["other"] = args.compare_with.resolve()
    with tempfile.TemporaryDirectory(prefix="handoff-qnn-search-paths-") as scratch:
        paths = {name: tree_path(tree, Path(scratch) / name) for name, tree in trees.items()}
        samples: dict[str, list[dict]] = {name: [] for name in trees}

        def contender(name: str):
            def one(_round: int) -> list[float]:
                sample = _sample(args, paths[name])
                samples[name].append(sample)
                return [sample.get("wall_s", float("nan"))]
            return one

        interleaved({name: contender(name) for name in trees}, args.rounds)

    first = samples["this"][0]
    which = f"the call whose group holds {args.holding}" if args.holding else f"call {args.call}"
    print(f"{args.model} with {args.backends}: qnn's check_partition {which} "
          f"({first.get('nodes', '?')} nodes), {args.rounds} round(s), medians")
    print(f"{'tree':<6} {'wall s':>8} {'exports':>8} {'export s':>9} {'compiles':>9} {'compile s':>10} {'declined':>9}")
    medians = {}
    for name, runs in samples.items():
        done = [s for s in runs if "wall_s" in s]
        if not done:
            print(f"{name:<6} stopped after {args.limit_s:.0f} s in every round")
            continue
        m = {k: statistics.median(s[k] for s in done) for k in ("wall_s", "exports", "export_s", "compiles", "compile_s")}
        medians[name] = m
        print(f"{name:<6} {m['wall_s']:>8.1f} {m['exports']:>8.0f} {m['export_s']:>9.1f} {m['compiles']:>9.0f} "
              f"{m['compile_s']:>10.1f} {len(done[-1]['declined']):>9}"
              + (f"  ({len(runs) - len(done)} round(s) stopped at {args.limit_s:.0f} s)" if len(done) < len(runs) else ""))
    for name, runs in samples.items():
        done = [s for s in runs if "wall_s" in s]
        if done:
            print(f"declined by {name}: {', '.join(done[-1]['declined']) or 'none'}")
    if len(medians) == 2:
        print(f"ratio this / other: wall {medians['this']['wall_s'] / medians['other']['wall_s']:.2f}")
        same = {tuple(s["declined"]) for runs in samples.values() for s in runs if "wall_s" in s}
        print("both declined the same nodes" if len(same) == 1 else "the trees declined different nodes")
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
