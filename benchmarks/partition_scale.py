"""How planning time grows with the graph: ``plan()`` on synthetic graphs of 1k to 16k nodes.

    python benchmarks/partition_scale.py [--sizes 1000,2000,4000,8000,16000] [--repeat 3]
        [--compare-with /tmp/old_partitioner.py] [--budget 60]

Builds :class:`GraphView` s without torch (capability is given, not computed, so only planning
is timed), times ``plan()`` (median of ``--repeat`` runs) and prints a table and, per graph kind,
the growth exponent: the least-squares slope of log time against log N (1 is linear, 2
quadratic). ``--compare-with`` times another ``partitioner.py`` too, imported by path, for a
before/after (``git show main:core/partitioner.py > /tmp/old_partitioner.py``); a size it is
predicted to need more than ``--budget`` seconds per run for is skipped. With a min size the
plans differ by design (before: small partitions released to the next backend; now: islands join
a neighbour), the other kinds plan the same partitions. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from types import ModuleType
from typing import Any, Callable

from _timing import median_ms  # benchmarks/, next to this script

from handoff import partitioner

#: Nodes per run of one backend in the ``alternating`` chain.
RUN = 8


def _chain(n: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    order = [f"n{i}" for i in range(n)]
    return {v: [order[i - 1]] if i else [] for i, v in enumerate(order)}, {v: "aten.relu.default" for v in order}


def _residual(n: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Residual blocks: conv, relu, conv, add (the block's input), relu."""
    preds: dict[str, list[str]] = {"stem": []}
    ops = {"stem": "aten.convolution.default"}
    last, block = "stem", 0
    while len(preds) < n:
        b = f"b{block}_"
        layers = [("conv1", "aten.convolution.default", [last]), ("relu1", "aten.relu.default", [b + "conv1"]),
                  ("conv2", "aten.convolution.default", [b + "relu1"]),
                  ("add", "aten.add.Tensor", [b + "conv2", last]), ("relu2", "aten.relu.default", [b + "add"])]
        for name, op, ps in layers:
            preds[b + name], ops[b + name] = ps, op
        last, block = b + "relu2", block + 1
    return preds, ops


def _all(ops: dict[str, str], backend: str) -> dict[str, dict[str, str | None]]:
    return {backend: {v: None for v in ops}}


def _alternating(ops: dict[str, str]) -> dict[str, dict[str, str | None]]:
    runs = {v: i // RUN % 2 for i, v in enumerate(ops)}
    return {b: {v: None if runs[v] == k else f"{b} takes every other run" for v in ops} for k, b in enumerate("xy")}


def _relu_add_first(ops: dict[str, str]) -> dict[str, dict[str, str | None]]:
    fast = {v: None if op in ("aten.relu.default", "aten.add.Tensor") else "only relu and add" for v, op in ops.items()}
    return {"fast": fast, **_all(ops, "tvm")}


#: kind -> (graph builder, backend support, min partition size per backend)
KINDS: dict[str, tuple[Callable[[int], Any], Callable[[dict[str, str]], Any], dict[str, int]]] = {
    "chain, one backend": (_chain, lambda ops: _all(ops, "x"), {}),
    f"chain, two backends in runs of {RUN}": (_chain, _alternating, {}),
    "residual, relu/add first": (_residual, _relu_add_first, {}),
    "residual, relu/add first, min size 3": (_residual, _relu_add_first, {"fast": 3}),
}


def _load(path: str) -> ModuleType:
    """Import a ``partitioner.py`` by path, inside the ``handoff`` package for its relative imports."""
    if not os.path.isfile(path):
        raise SystemExit(f"--compare-with {path}: no such file; make one with "
                         f"git show main:core/partitioner.py > {path}")
    spec = importlib.util.spec_from_file_location("handoff._partitioner_compared", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare-with {path}: not a .py file; pass a partitioner.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _time_plan(module: ModuleType, n: int, kind: str, repeat: int) -> tuple[int, float]:
    build, supports, min_sizes = KINDS[kind]
    preds, ops = build(n)
    view = module.GraphView(order=list(preds), preds=preds, ops=ops)
    support = supports(ops)
    limits = {b: module.Limits(min_size=min_sizes.get(b, 1)) for b in support}
    return len(preds), median_ms(lambda: module.plan(view, list(support), support, limits=limits), repeat) / 1e3


def _exponent(points: list[tuple[int, float]]) -> str:
    if len(points) < 2:
        return "-"
    xs, ys = [math.log(n) for n, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return f"{sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,2000,4000,8000,16000", help="comma-separated node counts")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size; the median is shown")
    ap.add_argument("--compare-with", metavar="PATH", help="another partitioner.py to time as 'before'")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="skip a size the compared partitioner is predicted to need more seconds than this for")
    args = ap.parse_args()
    try:
        sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--sizes {args.sizes!r}: not comma-separated integers; e.g. --sizes 1000,2000") from None
    contenders = {"now": partitioner}
    if args.compare_with:
        contenders["before"] = _load(args.compare_with)

    fits: dict[tuple[str, str], list[tuple[int, float]]] = {}
    skipped = False
    print(f"{'graph':40} {'nodes':>6} " + " ".join(f"{name + ' (s)':>11}" for name in contenders)
          + ("  speed-up" if len(contenders) > 1 else ""))
    for kind in KINDS:
        for module in contenders.values():  # untimed: the first call pays for warming up
            _time_plan(module, 100, kind, 1)
        for n in sizes:
            cells = []
            for name, module in contenders.items():
                done = fits.setdefault((kind, name), [])
                if done and name == "before":  # predicted from the last size at the growth so far
                    last_n, last_t = done[-1]
                    slope = float(_exponent(done)) if len(done) > 1 else 2.0
                    if last_t * (n / last_n) ** slope > args.budget:
                        cells.append(None)
                        skipped = True
                        continue
                nodes, seconds = _time_plan(module, n, kind, args.repeat)
                done.append((nodes, seconds))
                cells.append(seconds)
            row = " ".join(f"{'skipped':>11}" if t is None else f"{t:11.3f}" for t in cells)
            ratio = f"{cells[1] / cells[0]:9.1f}x" if len(cells) > 1 and cells[1] is not None else ""
            print(f"{kind:40} {nodes:6d} {row}{ratio}", flush=True)
    print("\ngrowth exponent (slope of log time vs log N; 1 = linear, 2 = quadratic)")
    for kind in KINDS:
        print(f"{kind:40} " + " ".join(f"{name} {_exponent(fits[(kind, name)]):>5}" for name in contenders))
    if skipped:
        print(f"skipped: sizes the compared partitioner was predicted to need over {args.budget:g} s per run for")


if __name__ == "__main__":
    main()
