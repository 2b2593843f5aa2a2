"""What MetaSchedule tuning buys the built-in TVM backend, against eager torch in the same run.

    python benchmarks/tvm_tuning.py [--model zoo:mobilenet_v2] [--trials 256] [--runs 30]
    python benchmarks/tvm_tuning.py --rpc HOST:PORT --key K1,K2 [--model ...] [--trials N]

Partitions the model onto tvm untuned and with ``--tune N`` (into a fresh ``$HANDOFF_HOME``
unless one is set), then partitions it tuned a second time to show the database is reused, and
prints median latencies (after warm-up) as ratios to eager torch. Not a test: numbers only.

With ``--rpc``: a tuning farm. For each key in turn, the same ``--tune N`` into a fresh tuning
database, candidates measured on the devices registered under that key (``handoff serve
--allow-tuning``); prints each key's server count, tuning wall time and its ratio to the first
key's, and the tuned program's median latency measured on a device of the key. Register one
server under K1 and two under K2 to see what a second device buys.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _timing import median_ms  # benchmarks/, next to this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--trials", type=int, default=256)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rpc", metavar="HOST:PORT", help="TVM RPC tracker of a tuning farm (see the docstring)")
    ap.add_argument("--key", default="", help="with --rpc: device keys, comma-separated")
    args = ap.parse_args()
    if args.rpc:
        farm(args)
        return
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


def farm(args: argparse.Namespace) -> None:
    import handoff
    from handoff.program import ProgramFile, io_specs
    from handoff.remote import Tracker, parse_keys, run_remote

    from handoff.signing import local_key

    signer = local_key().path  # the devices trust this key (handoff serve --trusted-keys)
    import tvm.s_tir.tensor_intrin  # noqa: F401  MetaSchedule imports it once per process: not in the first key's time
    rows = []
    for key in parse_keys(args.key):
        home = Path(tempfile.mkdtemp(prefix=f"handoff-bench-{key}-"))  # a fresh tuning database per key
        (home / "keys").mkdir(mode=0o700)
        shutil.copy2(signer, home / "keys" / signer.name)
        os.environ["HANDOFF_HOME"] = str(home)
        with Tracker(args.rpc) as tracker:
            servers = tracker.servers(key)
        t0 = time.perf_counter()
        result = handoff.partition(args.model, backends=[], use_cache=False,
                                   options={"tvm": {"tune": str(args.trials), "rpc": f"{args.rpc}/{key}"}})
        wall = time.perf_counter() - t0
        data = result.to_bytes()
        with ProgramFile.from_bytes(data) as pf:
            specs, _ = io_specs(pf.manifest)
        rng = np.random.default_rng(5)
        x = [rng.standard_normal(shape).astype(dtype) for _, shape, dtype in specs]
        remote = run_remote(data, args.rpc, key, x, bench=args.runs, warmup=5)
        rows.append((key, servers, wall, float(np.median(remote.times_ms))))
    print(f"{args.model}, {args.trials} trials per key, tracker {args.rpc}, {args.runs} runs on the device")
    print(f"{'key':16} {'servers':>8} {'tuning wall s':>14} {'x first key':>12} {'median ms':>10}")
    for key, servers, wall, ms in rows:
        print(f"{key:16} {servers:8d} {wall:14.1f} {wall / rows[0][2]:12.2f} {ms:10.2f}")


if __name__ == "__main__":
    main()
