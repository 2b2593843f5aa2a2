"""What MetaSchedule tuning buys the built-in TVM backend, against eager torch in the same run.

    python benchmarks/tvm_tuning.py [--model zoo:mobilenet_v2] [--trials 256] [--runs 30]

Partitions the model onto tvm untuned and with ``--tune N`` (into a fresh ``$HANDOFF_HOME``
unless one is set), then partitions it tuned a second time to show the database is reused, and
prints median latencies (after warm-up) as ratios to eager torch. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from _timing import median_ms  # benchmarks/, next to this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--trials", type=int, default=256)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    os.environ.setdefault("HANDOFF_HOME", tempfile.mkdtemp(prefix="handoff-bench-"))

    import torch

    import handoff
    from handoff.zoo import random_inputs

    zoo = handoff.get_plugins().zoo()[args.model.removeprefix("zoo:")]
    model = zoo.build()
    x = random_inputs(zoo.inputs, seed=5)
    with torch.no_grad():
        want = model(*x).numpy()
        eager = median_ms(lambda: model(*x), args.runs, warmup=5)

    rows = [("eager torch", eager, None, None)]
    for label, options in (("tvm untuned", {}), (f"tvm tuned ({args.trials} trials)", {"tune": str(args.trials)}),
                           ("tvm tuned, database reused", {"tune": str(args.trials)})):
        t0 = time.perf_counter()
        result = handoff.partition(args.model, backends=[], options={"tvm": options}, use_cache=False)
        compile_s = time.perf_counter() - t0
        with handoff.load(result.to_bytes()) as program:
            (got,) = program.run(x)
            err = float(np.abs(got - want).max() / (np.abs(want).max() or 1))
            rows.append((label, median_ms(lambda: program.run(x), args.runs, warmup=5), compile_s, err))

    print(f"{args.model}, {args.runs} runs after warm-up, HANDOFF_HOME={os.environ['HANDOFF_HOME']}")
    print(f"{'':32} {'median ms':>10} {'x eager':>8} {'compile s':>10} {'max rel err':>12}")
    for label, ms, compile_s, err in rows:
        c = f"{compile_s:10.1f}" if compile_s is not None else f"{'-':>10}"
        e = f"{err:12.1e}" if err is not None else f"{'-':>12}"
        print(f"{label:32} {ms:10.2f} {ms / eager:8.2f} {c} {e}")


if __name__ == "__main__":
    main()
